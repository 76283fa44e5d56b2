"""Subcommand options typed once, in a function's signature and docstring (jsonargparse reads
both), with the command-line habits users and scripts have:

- a list option takes space-separated values, ``--rates 0 0.1 0.2`` (jsonargparse's own
  ``--rates [0,0.1,0.2]`` works too);
- one list parameter may be given positionally: ``nag bench train A.yaml B.yaml``;
- a boolean is a flag: ``--forward`` (and ``--no_forward``); ``--forward true`` and
  ``--forward false``, the form a signature alone would ask for, mean the same.
"""

from __future__ import annotations

import inspect
import json
import typing

import docstring_parser
from jsonargparse import ActionYesNo


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation))


class TypedCommand:
    """``function``'s parameters as a subcommand's options; ``positional``: the list parameter
    that leading values fill."""

    def __init__(self, function, positional: str | None = None) -> None:
        self.function, self.positional = function, positional
        hints = typing.get_type_hints(function)
        self.parameters = list(inspect.signature(function).parameters)
        self.lists = {name for name in self.parameters if _is_list(hints.get(name))}
        self.flags = {name for name in self.parameters if hints.get(name) is bool}
        self.help = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
        self.summary = (function.__doc__ or "").strip().split("\n\n")[0]

    def add_to(self, parser) -> None:
        parser.description = self.summary
        parser.add_function_arguments(self.function, as_group=False, skip=self.flags)
        defaults = {name: p.default for name, p in inspect.signature(self.function).parameters.items()}
        for name in sorted(self.flags):
            parser.add_argument(f"--{name}", action=ActionYesNo, default=defaults[name], help=self.help.get(name, ""))

    def normalise(self, argv: list[str]) -> list[str]:
        """``argv`` with leading values moved into ``--POSITIONAL`` and every list option's
        space-separated values joined into one JSON list."""
        argv, out = list(argv), []
        if self.positional is not None:
            leading = []
            while argv and not argv[0].startswith("-"):
                leading.append(argv.pop(0))
            if leading:
                argv = [f"--{self.positional}", *leading, *argv]
        while argv:
            token = argv.pop(0)
            name, _, value = token[2:].partition("=")
            spelled = value.lower() in ("true", "false") or (not value and argv and argv[0].lower() in ("true", "false"))
            if token.startswith("--") and name in self.flags and spelled:
                value = value or argv.pop(0)
                out.append(f"--{name}" if value.lower() == "true" else f"--no_{name}")
                continue
            out.append(token)
            if token.startswith("--") and "=" not in token and token[2:] in self.lists:
                values = []
                while argv and not argv[0].startswith("--"):
                    values.append(argv.pop(0))
                single_json = len(values) == 1 and values[0].startswith("[")
                out.append(values[0] if single_json else json.dumps(values))
        return out

    def __call__(self, namespace):
        return self.function(**{name: namespace[name] for name in self.parameters})
