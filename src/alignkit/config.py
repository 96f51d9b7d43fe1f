"""Configs are dataclasses; their field docstrings are the `--help`, and YAML files and flags both fill them.

Precedence: dataclass defaults < `--config FILE.yaml` < flags given on the command line. A YAML key or a
value that does not fit its field is an error naming the file and the key, never silently dropped.

A numeric field declares the values it takes next to its default (`batch_size: int = at_least(1, 4)`,
`warmup_ratio: float = within("[0, 1]", 0.05)`); `build_config` checks them for flags, YAML files and pipeline
stages alike, before anything loads, and `--help` shows them. A float is never NaN or infinite.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints


from alignkit.errors import AlignkitError
from alignkit.io import read_yaml

C = TypeVar("C")
SEEDS = "[0, 4294967295]"
"""numpy, which `accelerate.utils.set_seed` seeds too, takes only 32-bit unsigned seeds"""


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of allowed values, each end open or closed; None for an unbounded end."""

    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    """what a value outside it would break, told with the error"""
    count: int | None = None
    """for a list: how many values it holds"""

    @classmethod
    def parse(cls, interval: str, *, why: str = "", count: int | None = None) -> Range:
        """`"[0, 1)"`, `"(0, inf)"`: as written in mathematics, `inf` for an unbounded end."""
        text = interval.strip()
        low, _, high = text[1:-1].partition(",")
        if text[0] not in "[(" or text[-1] not in ")]" or not high:
            raise ValueError(f"not an interval: {interval!r}")

        def end(word: str) -> float | None:
            word = word.strip()
            return None if word in ("inf", "-inf") else (int(word) if word.lstrip("-").isdigit() else float(word))

        return cls(end(low), end(high), text[0] == "(", text[-1] == ")", why, count)

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: Any, flag: str) -> None:
        """Raise ValueError saying what is wrong when `value` (a number, or a list of them) is outside the range."""
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item not in self:
                each = "each value of " if isinstance(value, list) else ""
                raise ValueError(f"{each}{flag} must be {self}, not {item!r}" + (f": {self.why}" if self.why else ""))
        if self.count is not None and len(values) != self.count:
            raise ValueError(f"{flag} takes {self.count} values, not {len(values)}")


def within(interval: str, default: Any = dataclasses.MISSING, *, default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
           why: str = "", count: int | None = None) -> Any:
    """A dataclass field whose values must lie in `interval` (e.g. `"[0, 1)"`); `why` is told with the error."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"range": Range.parse(interval, why=why, count=count)})  # fmt: skip


def at_least(low: float, default: Any, *, why: str = "") -> Any:
    """A dataclass field whose values must be ≥ `low`."""
    return within(f"[{low}, inf)", default, why=why)


def above(low: float, default: Any, *, why: str = "") -> Any:
    """A dataclass field whose values must be > `low`."""
    return within(f"({low}, inf)", default, why=why)


def declared(cls: type, name: str, key: str) -> Any:
    """The `key` metadata of field `name` (its "range", its "check"), also when a subclass redeclares the field
    only to change its default or its docstring; None when the field declares none."""
    for klass in cls.__mro__:
        found = vars(klass).get("__dataclass_fields__", {}).get(name)
        if found is not None and key in found.metadata:
            return found.metadata[key]
    return None


Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
"""the experiment trackers accelerate reports to"""


def trackers_installed(names: list[str]) -> str | None:
    """Accelerate drops a tracker whose package is missing with a mere warning: the run would go untracked."""
    if not names:
        return None
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        return f"the package of tracker '{missing[0]}' is not installed, so the run would go untracked (pip install {missing[0]}, or leave it out)"
    return None


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
        if not math.isfinite(number):
            raise ValueError(f"'{name}' must be a finite number, not {value!r}")
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
        notes = [str(r) for r in [declared(cls, f.name, "range")] if r is not None]
        if default not in (None, "", []):
            notes.append(f"default: {default}")
        if notes:
            help_text += f" ({'; '.join(notes)})"
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


def build_config(cls: type[C], values: dict[str, Any], *, source: str = "command line",
                 where_of: Callable[[str], str] | None = None) -> C:
    """Fill the dataclass from a mapping, rejecting unknown keys, ill-typed values and values out of their field's
    range with a clear message; `where_of(key)` locates a key's value (a flag, a YAML line), else `source` does."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        where = where_of(key) if where_of is not None else source
        if key not in hints or key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise AlignkitError(
                f"unknown option '{key}'",
                where=where,
                fix=f"did you mean '{close[0]}'?" if close else "run with --help to list the options of this command",
            )
        label = flag_name(key) if where == "command line" else key
        try:
            kwargs[key] = coerce(value, hints[key], name=label)
            allowed, check = declared(cls, key, "range"), declared(cls, key, "check")
            if allowed is not None and kwargs[key] is not None:
                allowed.check(kwargs[key], f"'{label}'")
            problem = check(kwargs[key]) if check is not None else None
        except ValueError as exc:
            raise AlignkitError(str(exc), where=where) from None
        if problem:
            raise AlignkitError(f"'{label}': {problem}", where=where)
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
    config = build_config(cls, values, source=source, where_of=lambda key: "command line" if key in flags else source)
    if hasattr(config, "validate"):
        config.validate()  # type: ignore[attr-defined]
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
