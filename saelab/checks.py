"""Checks of user input shared by configs and commands: each fails as one `SaelabError` line.

They run before any model is loaded or anything is written, so a bad flag or config value
costs nothing.
"""

from __future__ import annotations

import dataclasses
import math

from saelab.errors import SaelabError

INT64 = 2**63  # integers go into torch tensors and seeds: they must fit int64

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def check_number(name: str, value: int | float | None, minimum: float | None = None,
                 maximum: float | None = None, strict_minimum: bool = False) -> None:
    """`value` (None passes) must be finite, fit int64 if an integer, and lie in
    [minimum, maximum] ((minimum, maximum] with `strict_minimum`)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SaelabError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SaelabError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and not -INT64 <= value < INT64:
        raise SaelabError(f"{name}={value} is out of range (integers must fit in 64 bits)")
    low = minimum is not None and (value <= minimum if strict_minimum else value < minimum)
    if low or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f"{'>' if strict_minimum else '>='} {minimum:g}"
        hi = "" if maximum is None else f"<= {maximum:g}"
        raise SaelabError(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, got {value}")


def check_field_types(obj: object) -> None:
    """Every field of dataclass `obj` holds a value of its annotated type (annotations written
    like `int | None`, `float`, `str | list[str] | None`); ints pass for floats, bools never
    pass for numbers. Catches config files and cfg.json holding a list where a number belongs."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = str(f.type)
        options = [k.strip() for k in kind.split("|")]
        if value is None and "None" in options:
            continue
        if isinstance(value, list) and "list[str]" in options and all(isinstance(v, str) for v in value):
            continue
        allowed = tuple(_TYPES[k] for k in options if k in _TYPES)
        if not allowed:
            continue  # a type this check does not know (dict, ...): left to the field's own check
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise SaelabError(f"{f.name} must be of type {kind}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_number(f.name, value)


def check_device(device: str) -> None:
    """A torch device this machine has: a clear line for `cuda` without a GPU or a typo."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SaelabError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SaelabError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SaelabError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SaelabError(f"device {device!r} asked for, but MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SaelabError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
