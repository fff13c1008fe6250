"""Command-line options generated from a config dataclass, so a field, its flag, its default
and its help are written once (in the dataclass).

Every option defaults to None ("not given"), so values from a config file are only overridden
by flags that were given; boolean fields get --x/--no-x so a `true` from a file can be
switched off; list fields are repeatable flags.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

import typer

KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def _kind(f: dataclasses.Field) -> type:
    """The option's value type from the field's annotation (written like `int | None`)."""
    options = [k.strip() for k in str(f.type).split("|") if k.strip() != "None"]
    if "list[str]" in options:
        return list[str]
    if f.metadata.get("path"):
        return Path
    (name,) = options
    return KINDS[name]


def field_options(fields: dict[str, tuple[str, dataclasses.Field]],
                  docs: dict[str, str]) -> list[inspect.Parameter]:
    """One keyword parameter (typer option) per field; `fields`: flat name -> (the help panel
    it is listed under, the dataclass field); `docs`: flat name -> help."""
    params = []
    for panel, f in fields.values():
        kind = _kind(f)
        flag = f"--{f.name.replace('_', '-')}"
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(None, *decls, help=docs[f.name], show_default=False,
                              rich_help_panel=panel)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=kind | None))
    return params


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


def with_options(func: Callable, params: list[inspect.Parameter]) -> Callable:
    """`func` presented with the signature `params` (which is what typer reads to build the
    command); it is called with them as keywords."""
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func
