"""Command-line options generated from a config dataclass, so a field, its flag, its default
and its help are written once (in the dataclass, with `saelab.checks.doc_field`).

Every option defaults to None ("not given"), so the dataclass's default applies (and, for
`train`, values from a config file are only overridden by flags that were given); boolean
fields get --x/--no-x so a `true` default can be switched off; list and tuple fields are
repeatable flags. A field whose default is a nested config (its `default_factory` is a
dataclass) contributes that config's fields, listed under their own help panel.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

KINDS = {"int": int, "float": float, "bool": bool, "str": str}
Fields = Mapping[str, tuple[str | None, dataclasses.Field]]


def _options(f: dataclasses.Field) -> list[str]:
    """The kinds a field's annotation allows (written like `int | None`), None left out."""
    return [k.strip() for k in str(f.type).split("|") if k.strip() != "None"]


def _item(kind: str) -> str | None:
    """`X` of a `list[X]` or `tuple[X, ...]` annotation, else None."""
    for prefix in ("list[", "tuple["):
        if kind.startswith(prefix):
            return kind[len(prefix):-1].split(",")[0].strip()
    return None


def _kind(f: dataclasses.Field) -> Any:
    """The option's value type: a repeatable flag for list and tuple fields, else the one kind."""
    options = _options(f)
    for k in options:
        item = _item(k)
        if item is not None:
            return list[KINDS[item]]  # type: ignore[valid-type]  # built at run time for typer
    if f.metadata.get("path"):
        return Path
    (name,) = options
    return KINDS[name]


def default_text(f: dataclasses.Field) -> str:
    """How `--help` shows a field's default: its `default_doc`, else the value."""
    if f.metadata.get("default_doc") is not None:
        return f.metadata["default_doc"]
    value = f.default
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def flag(f: dataclasses.Field) -> str:
    """The field's flag: `--FLAG` from its metadata, else `--field-name`."""
    return f"--{(f.metadata.get('flag') or f.name).replace('_', '-')}"


def config_fields(cls: type, panel: str | None = None) -> Fields:
    """flat field name -> (help panel, field) of a config dataclass; a nested config's fields
    are listed under the panel its field's metadata names."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            out.update(config_fields(f.default_factory, f.metadata.get("panel", panel)))
        else:
            out[f.name] = (panel, f)
    return out


def field_options(fields: Fields) -> list[inspect.Parameter]:
    """One keyword parameter (typer option) per field; `fields`: flat name -> (the help panel
    it is listed under, the dataclass field). Help: the field's doc and its default."""
    params = []
    for panel, f in fields.values():
        kind, name = _kind(f), flag(f)
        decls = [f"{name}/--no-{name[2:]}"] if kind is bool else [name]
        help_text = f"{f.metadata['doc']} (default: {default_text(f)})"
        option = typer.Option(None, *decls, help=help_text, show_default=False, rich_help_panel=panel)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=kind | None))
    return params


def argument(name: str, kind: type, help_text: str) -> inspect.Parameter:
    """A required positional argument, for what a command acts on (not a config field)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                             default=typer.Argument(..., help=help_text, show_default=False))


def given(flags: dict) -> dict:
    """The flags that were given (not None), paths as strings, a one-item list as its item."""
    out = {}
    for name, value in flags.items():
        if value is None or value == []:
            continue
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        out[name] = value
    return out


def from_flags(cls: type, flags: dict):
    """`cls` built from the flags that were given (not None), by flat field name, nested
    configs included; paths as strings, repeated flags as tuples. Its `__post_init__` checks
    them, before any work."""
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            values[f.name] = from_flags(f.default_factory, flags)
        elif flags.get(f.name) not in (None, []):
            value = flags[f.name]
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list) and "tuple[" in str(f.type):
                value = tuple(value)
            values[f.name] = value
    return cls(**values)


def with_options(func: Callable, params: list[inspect.Parameter]) -> Callable:
    """`func` presented with the signature `params` (which is what typer reads to build the
    command); it is called with them as keywords."""
    setattr(func, "__signature__", inspect.Signature(params))  # noqa: B010  # typer reads it
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func
