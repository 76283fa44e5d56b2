"""Subcommand options typed once, in a function's signature and docstring (jsonargparse reads
both), with the command-line habits users and scripts have:

- a list option takes space-separated values, ``--rates 0 0.1 0.2`` (also ``--rates=0.1`` for one
  value, and jsonargparse's own ``--rates [0,0.1,0.2]``);
- one list parameter may be given positionally, anywhere among the options:
  ``nag bench train A.yaml B.yaml --steps 3`` or ``nag bench train --steps 3 A.yaml``;
- a boolean is a flag: ``--forward`` (and ``--no_forward``); ``--forward true`` and
  ``--forward false``, the form a signature alone would ask for, mean the same.
"""

from __future__ import annotations

import inspect
import json
import re
import typing

import docstring_parser
from jsonargparse import ActionYesNo

from nag_lightning.errors import NagError

_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_TRUTH = ("true", "false")


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def _is_value(token: str) -> bool:
    """A token that is a value, not an option: it does not start with ``-``, or it is a number."""
    return not token.startswith("-") or bool(_NUMBER.match(token)) or token == "-"


def _json_list(value: str) -> bool:
    try:
        return isinstance(json.loads(value), list)
    except ValueError:
        return False


class TypedCommand:
    """``function``'s parameters as a subcommand's options; ``positional``: the list parameter
    that values outside any option fill."""

    def __init__(self, function, positional: str | None = None) -> None:
        self.function, self.positional = function, positional
        hints = typing.get_type_hints(function)
        signature = inspect.signature(function)
        self.parameters = list(signature.parameters)
        self.defaults = {name: p.default for name, p in signature.parameters.items()}
        self.lists = {name for name in self.parameters if _is_list(hints.get(name))}
        self.flags = {name for name in self.parameters if hints.get(name) is bool}
        self.help = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
        self.summary = (function.__doc__ or "").strip().split("\n\n")[0]

    def add_to(self, parser) -> None:
        parser.description = self.summary
        parser.add_function_arguments(self.function, as_group=False, skip=self.flags)
        for name in sorted(self.flags):
            parser.add_argument(f"--{name}", action=ActionYesNo, default=self.defaults[name], help=self.help.get(name, ""))

    def normalise(self, argv: list[str]) -> list[str]:
        """``argv`` as jsonargparse reads it: each list option's values joined into one JSON list,
        values outside any option gathered into ``--POSITIONAL``, ``--flag true|false`` as
        ``--flag`` / ``--no_flag``. Anything it does not recognise is left for the parser to refuse."""
        argv, out, positional = list(argv), [], []
        while argv:
            token = argv.pop(0)
            if not token.startswith("--"):
                if self.positional is not None and _is_value(token):
                    positional.append(token)
                else:
                    out.append(token)  # -h, or a stray value: the parser's to answer
                continue
            name, equals, value = token[2:].partition("=")
            if name in self.flags:
                if not equals and argv and argv[0].lower() in _TRUTH:
                    value, equals = argv.pop(0), "="
                if equals and value.lower() in _TRUTH:
                    out.append(f"--{name}" if value.lower() == "true" else f"--no_{name}")
                else:
                    out.append(token)
            elif name in self.lists:
                values = [value] if equals else []
                while not equals and argv and _is_value(argv[0]):
                    values.append(argv.pop(0))
                out += [f"--{name}", self._list(name, values)]
            else:
                out.append(token)
                if not equals and argv and name in self.parameters and not self._is_option(argv[0]):
                    out.append(argv.pop(0))  # its one value, even one that starts with "-"
        if positional:
            out = [f"--{self.positional}", self._list(self.positional, positional), *out]
        return out

    def _is_option(self, token: str) -> bool:
        name = token[2:].partition("=")[0] if token.startswith("--") else None
        return name is not None and (name in self.parameters or name.removeprefix("no_") in self.flags
                                     or name == "help")

    def _list(self, name: str, values: list[str]) -> str:
        if len(values) == 1 and values[0].startswith("[") and _json_list(values[0]):
            return values[0]  # jsonargparse's own form
        if not values and self.defaults[name] != []:  # only an option whose default is empty may be empty
            raise NagError(f"--{name} needs at least one value, e.g. --{name} A B.")
        return json.dumps(values)

    def __call__(self, namespace):
        return self.function(**{name: namespace[name] for name in self.parameters})
