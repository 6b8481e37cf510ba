"""Turn a plain dict into the typed recipe dataclasses, strictly.

Unknown keys fail with their full path and a did-you-mean; wrong types name the key and the
expected type. Written by hand rather than with OmegaConf structured configs so that every
message names the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from launcher.errors import RecipeError


class FromEnv:
    """A recipe value that came from the environment through `${oc.env:...}`: it acts as the value
    in memory, while `reference` keeps the recipe's text, which is all that is ever written
    (recipe.yaml, W&B config, checkpoint fingerprint) or shown by repr()."""

    __slots__ = ()
    reference: str

    def __repr__(self) -> str:
        return repr(self.reference)

    def __reduce__(self) -> tuple:
        return (type(self), (_BASES[type(self)](self), self.reference))

    def __new__(cls, value: Any, reference: str) -> "FromEnv":
        obj = _BASES[cls].__new__(cls, value)  # the one constructor of EnvStr, EnvInt, EnvFloat
        obj.reference = reference
        return obj

    def __copy__(self) -> "FromEnv":
        return self  # immutable, like the value it wraps

    def __deepcopy__(self, memo: dict) -> "FromEnv":
        return self


class EnvStr(FromEnv, str):
    pass


class EnvInt(FromEnv, int):
    pass


class EnvFloat(FromEnv, float):
    pass


_BASES: dict[type, type] = {EnvStr: str, EnvInt: int, EnvFloat: float}


def from_env(value: Any, reference: str) -> Any:
    """`value` marked as read through `reference`. None and booleans cannot carry the mark (and
    cannot hold a secret): they stay plain and are written as they are."""
    if isinstance(value, FromEnv) or isinstance(value, bool) or value is None:
        return value
    for marked, base in _BASES.items():
        if isinstance(value, base):
            return marked(value, reference)
    return value


def redact(node: Any, *, keep_values: bool = False) -> Any:
    """Plain data with every value read from the environment replaced by its reference (or,
    with `keep_values`, by the plain value: YAML and JSON writers want exact types)."""
    if isinstance(node, FromEnv):
        return _BASES[type(node)](node) if keep_values else node.reference
    if isinstance(node, dict):
        return {k: redact(v, keep_values=keep_values) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact(v, keep_values=keep_values) for v in node]
    return node


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def did_you_mean(key: str, choices: list[str], otherwise: str | None = None) -> str:
    """A suggestion for a misspelt `key`; `otherwise` (default: all choices) when none is close."""
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return otherwise if otherwise is not None else f"known keys: {', '.join(sorted(choices))}"


def convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; `key` is its dotted path."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise RecipeError(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is str:
            value = [value]  # a single path is a list of one
        if not isinstance(value, (list, tuple)):
            raise RecipeError(key, f"expected a list, got {value!r}")
        return [convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads `1e-4` as a string
                number = float(value)
            except ValueError:
                pass
            else:
                return from_env(number, value.reference) if isinstance(value, FromEnv) else number
        raise RecipeError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = str(value)
            return from_env(text, value.reference) if isinstance(value, FromEnv) else text
        raise RecipeError(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in the schema, not user input


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _accepts_none(tp: Any) -> bool:
    union = typing.get_origin(tp) in (Union, types.UnionType)
    return tp is Any or (union and type(None) in typing.get_args(tp))


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from mapping `data`, rejecting unknown and missing keys."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(where, f"expected a mapping of keys, got {data!r}")
    upgrade = getattr(cls, "upgrade_legacy", None)  # a section that still reads an old key's spelling
    if upgrade is not None:
        data = upgrade(data, prefix or where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else str(k)
            raise RecipeError(full, f"unknown key; {did_you_mean(str(k), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data and data[name] is None and _has_default(f) and not _accepts_none(hints[name]):
            continue  # `key: null` (or `key=null`) clears an inherited value back to the default
        if name in data:
            kwargs[name] = convert(hints[name], data[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build(hints[name], {}, full)
            else:
                raise RecipeError(full, "required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError as e:
        if prefix and not e.key.startswith(prefix.split(".")[0]):
            raise RecipeError(f"{prefix}.{e.key}", e.message) from None
        raise
