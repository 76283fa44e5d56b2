"""The one-line cause of a config the parser refused, found from the inputs themselves (the config
files and ``--key value`` arguments) against the signatures they name: a misspelt key with the
nearest valid one, or a value of the wrong type. jsonargparse's own message nests these several
levels deep; ``NagCLI`` prints this line first, its message after."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# Where a class's arguments live in the config, and the class a section holds when no class_path says.
SECTIONS = {
    "model": "nag_lightning.LanguageModel",
    "model.init_args.config": "nag_lightning.model.ModelConfig",
    "model.init_args.config.skip": "nag_lightning.model.skip_policy.SkipConfig",
    "model.init_args.config.residual": "nag_lightning.model.residual.PreNorm",
    "data": "nag_lightning.TokenShardDataModule",
}
SIMPLE_TYPES = (bool, int, float, str)
CONFIG_FLAGS = ("--config", "-c")


def given_settings(args: list[str]) -> dict[str, Any]:
    """Dotted key -> value, from each ``--config`` file and ``--key value`` in ``args``, later wins."""
    settings: dict[str, Any] = {}
    index = 0
    while index < len(args):
        flag, equals, value = args[index].partition("=")
        without_value = not equals and (index + 1 >= len(args) or args[index + 1].startswith("-"))
        if not flag.startswith("-") or without_value:  # a positional, or a flag such as --print_config
            index += 1
            continue
        if not equals:
            index += 1
            value = args[index]
        if flag in CONFIG_FLAGS:
            path = Path(value)
            try:
                content = yaml.safe_load(path.read_text()) if path.is_file() else None
            except yaml.YAMLError:
                content = None
            if isinstance(content, dict):
                settings.update(_flatten(content))
        elif flag.startswith("--"):
            try:
                settings[flag[2:]] = yaml.safe_load(value)
            except yaml.YAMLError:
                settings[flag[2:]] = value
        index += 1
    return settings


def _flatten(content: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in content.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "dict_kwargs":
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(target) -> dict[str, Any]:
    """Argument name -> its type (``inspect.Parameter.empty`` when unknown)."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        return {f.name: hints.get(f.name, inspect.Parameter.empty) for f in dataclasses.fields(target) if f.init}
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a hint that does not resolve: check names only
        hints = {}
    return {name: hints.get(name, inspect.Parameter.empty) for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _accepts(annotation, value) -> bool:
    """Whether ``value`` (as YAML gave it) fits ``annotation``; True where the type is not a simple one."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None:
        return type(None) in options
    simple = [option for option in options if option in SIMPLE_TYPES]
    if len(simple) != len([option for option in options if option is not type(None)]):
        return True  # a class, a list, a literal...: the parser's own message says it
    if isinstance(value, bool):
        return bool in simple
    if isinstance(value, int) and (int in simple or float in simple):
        return True
    if str in simple and isinstance(value, (int, float)):
        return True  # `--data_dir 2024`: YAML reads a number, the parser takes it as the text it was
    return any(type(value) is option for option in simple)


def _type_name(annotation) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in (typing.get_args(annotation) or (annotation,))
                      if a is not type(None))


def refused_setting(args: list[str]) -> str | None:
    """The first misspelt key or wrong-typed value among the settings in ``args``, as one line; None
    when none is found here (the parser's message then stands alone)."""
    settings = given_settings(args)
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        if not section.endswith("init_args") and section not in SECTIONS:
            continue
        owner_key = section.removesuffix(".init_args")
        if owner_key not in SECTIONS:
            continue
        named = settings.get(owner_key)  # `--model.init_args.config.residual NAG`: the class alone
        class_path = settings.get(f"{owner_key}.class_path") or (named if isinstance(named, str) else SECTIONS[owner_key])
        if isinstance(class_path, str) and "." not in class_path:
            continue  # a short class name: the parser resolves it
        target = _resolve(class_path) if isinstance(class_path, str) else None
        if target is None or name in ("class_path", "init_args", "dict_kwargs"):
            continue
        parameters = _parameters(target)
        if not parameters:
            continue
        if name not in parameters:
            nearest = difflib.get_close_matches(name, parameters, n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else f"; valid: {', '.join(parameters)}"
            return f"unknown option {name!r} for {class_path}{hint}"
        if not isinstance(value, (dict, list)) and not _accepts(parameters[name], value):
            return (f"{class_path}.{name} needs a value of type {_type_name(parameters[name])}, got {value!r}: fix it "
                    "in the config or on the command line")
    return None
