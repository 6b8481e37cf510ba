"""The recipe reference, generated from the docstrings under each dataclass field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from launcher.recipe.convert import _type_name
from launcher.recipe.sections import Recipe


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the string literal right below it in the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else []
        )
        for sub in inner:
            out += _sections(sub, f"{prefix}.{f.name}" if prefix else f.name)
    return out


def reference_markdown() -> str:
    """docs/recipe-reference.md: every section and key with type, default and description."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from the field docstrings in `launcher/recipe/sections.py` by "
        "`launcher recipes docs`; do not edit by hand.",
        "",
    ]
    for prefix, cls in _sections(Recipe, ""):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        lines += [f"## `{prefix or '(top level)'}`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            desc = docs.get(f.name, "").replace("|", "\\|")
            typ = _type_name(hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{key}` | {typ} | `{_default(f)}` | {desc} |")
        lines.append("")
    return "\n".join(lines)
