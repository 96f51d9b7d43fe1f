"""Configs are dataclasses; their field docstrings are the `--help`, and YAML files and flags both fill them.

Precedence: dataclass defaults < `--config FILE.yaml` < flags given on the command line. A YAML key or a
value that does not fit its field is an error naming the file and the key, never silently dropped.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints


from alignkit.errors import AlignkitError
from alignkit.io import read_yaml

C = TypeVar("C")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, from the class source (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, *, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or say why it cannot be."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"'{name}' cannot be empty")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ValueError(f"'{name}' must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if origin in (list, tuple):
        (item_type, *_) = get_args(inner) or (str,)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"'{name}' must be a list, not {value!r}")
        return [coerce(item, item_type, name=name) for item in items]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"'{name}' must be true or false, not {value!r}")
    if inner in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"'{name}' must be a number, not {value!r}")
        try:
            number = float(value) if inner is float else int(str(value).replace("_", ""))
        except ValueError:
            raise ValueError(f"'{name}' must be {'a number' if inner is float else 'an integer'}, not {value!r}") from None
        return number
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"'{name}' must be a string, not {value!r}")
        return str(value)
    return value


def flag_name(field_name: str) -> str:
    # A trailing underscore lets a field take a name Python reserves: `from_` is `--from`, `json_` is `--json`.
    return "--" + field_name.rstrip("_").replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; help text from the field's docstring, default shown."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = docs.get(f.name, "")
        if default not in (None, "", []):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(tp) is Literal:
            kwargs["choices"] = get_args(tp)
        elif get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
        kwargs["metavar"] = f.name.upper() if "choices" not in kwargs else None
        parser.add_argument(flag_name(f.name), **kwargs)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    loaded = read_yaml(path, what="config file", fix="check the path given to --config")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise AlignkitError("a config file must be a mapping of option names to values", where=str(path))
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def build_config(cls: type[C], values: dict[str, Any], *, source: str = "command line") -> C:
    """Fill the dataclass from a mapping, rejecting unknown keys and ill-typed values with a clear message."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in hints or key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise AlignkitError(
                f"unknown option '{key}'",
                where=source,
                fix=f"did you mean '{close[0]}'?" if close else "run with --help to list the options of this command",
            )
        try:
            kwargs[key] = coerce(value, hints[key], name=key)
        except ValueError as exc:
            raise AlignkitError(str(exc), where=source) from None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise AlignkitError(str(exc), where=source) from None


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    values: dict[str, Any] = {}
    source = "command line"
    if getattr(args, "config", None):
        values.update(read_yaml_config(args.config))
        source = args.config
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    values.update(flags)
    config = build_config(cls, values, source=source)
    if hasattr(config, "validate"):
        config.validate()  # type: ignore[attr-defined]
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
