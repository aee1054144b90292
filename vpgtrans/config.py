"""Dataclass configs: validated construction from dicts and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field carrying a help string (shown by `--help` and `components --json`)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{where}: unknown key '{key}'", hint)
        tp = hints[key]
        if tp is bool and isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            value = _YAML11_BOOLS[value.lower()]  # what YAML 1.1 read as booleans still reads so where one is wanted
        if not _type_ok(value, tp):
            raise ConfigError(
                f"{where}: '{key}' should be {_type_name(tp)}, got {type(value).__name__} {value!r}",
                f"fix the value of '{key}'",
            )
        kwargs[key] = _coerce(value, tp)
        _check_value(key, kwargs[key], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}", "add the missing key") from None


def _is_count(key: str) -> bool:
    """Fields that count things (layers, queries, tokens, batch sizes): zero or negative is never meaningful."""
    return (key.startswith(("num_", "max_")) and key != "num_workers") or key.endswith("_size") or \
        key == "cross_attention_frequency"


def _check_value(key: str, value: Any, where: str) -> None:
    """Values no config wants: NaN/inf anywhere (also inside lists), counts below 1."""
    import math

    items = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}", f"give '{key}' a finite value")
    if _is_count(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ConfigError(f"{where}: '{key}' must be >= 1, got {value}", f"set '{key}' to 1 or more")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a dataclass config (JSON-serialisable)."""
    return dataclasses.asdict(obj)


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every field of a config dataclass."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append({"name": f.name, "type": _type_name(f.type) if not isinstance(f.type, str) else f.type,
                    "default": default, "help": f.metadata.get("help", "")})
    return out


def core_schema(loader: Any) -> Any:
    """A subclass of yaml `loader` whose booleans are only true/false (YAML 1.2), so `no`, `on`, `off` stay text."""
    import re

    class Core(loader):
        pass

    # PyYAML follows YAML 1.1, where yes/no/on/off are booleans: `mixed_precision=no`, the documented value,
    # arrived as False and was refused as "should be str". YAML 1.2 (and JSON) keep only true/false.
    bool_tag = "tag:yaml.org,2002:bool"
    Core.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in loader.yaml_implicit_resolvers.items()
    }
    Core.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Core


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as YAML 1.2 (numbers, true/false, lists)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value", "write it as key=value, e.g. lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=core_schema(yaml.SafeLoader)) if raw != "" else ""  # a SafeLoader
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string; numbers written that way are still numbers to a user.
    if isinstance(value, str):
        try:
            # nan/inf parse too, so that validation can say "must be finite" rather than "got str".
            numeric = any(c in value for c in ".eE") or value.strip().lower().lstrip("+-") in ("nan", "inf")
            value = float(value) if numeric else int(value)
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c=value` inside nested dicts."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section", "override a leaf key instead")
    node[parts[-1]] = value
