"""Checks of user input shared by configs and commands: each fails as one `SaelabError` line.

They run before any model is loaded or anything is written, so a bad flag or config value
costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from saelab.errors import SaelabError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

INT64 = 2**63  # integers go into torch tensors and seeds: they must fit int64

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def doc_field(default, doc: str, default_doc: str | None = None, path: bool = False,
              flag: str | None = None):
    """A config field with its documentation: a command's `--help` shows `doc` as is, and its
    flag (`--NAME`, or `--FLAG`) is generated from the field (saelab.cli.options).

    `default_doc` describes a default that is computed later (the field's default is None);
    `path` marks fields the command line reads as paths."""
    return dataclasses.field(default=default, metadata={"doc": doc, "default_doc": default_doc,
                                                        "path": path, "flag": flag})


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


def check_field_types(obj: DataclassInstance) -> None:
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


# ---- memory ---------------------------------------------------------------------------------

MEMORY_ENV = "SAELAB_MEMORY_GB"  # a stated cap (or a larger budget, e.g. with swap) in GB
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Bytes one part of a run allocates, and the settings it grows in proportion to (a
    (batch, n_latents) matrix grows with both)."""

    what: str
    bytes: float
    scales: tuple[str, ...] = ()


def memory_budget(device: str = "cpu") -> tuple[float | None, str]:
    """(bytes, where the number comes from) a run may plan to hold, or (None, why) if unknown.

    `SAELAB_MEMORY_GB` wins. Else, for CUDA, the GPU's total memory; for the CPU, physical RAM
    (os.sysconf) lowered to a cgroup (container) limit if one is set. Total, not MemAvailable:
    the check refuses sizes this machine can never hold, the same way on every call, rather
    than guessing what other processes will free; a size that fits the machine but not its free
    memory at the moment is left to the OS, as before."""
    if os.environ.get(MEMORY_ENV):
        try:
            cap = float(os.environ[MEMORY_ENV])
        except ValueError:
            cap = float("nan")
        if not math.isfinite(cap) or cap <= 0:
            raise SaelabError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]!r} must be a positive number of GB")
        return cap * 1e9, f"{MEMORY_ENV}"
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        return float(torch.cuda.get_device_properties(dev.index or 0).total_memory), f"{device} memory"
    try:
        total = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None, "unknown"
    for limit in _CGROUP_LIMITS:
        try:
            total = min(total, float(Path(limit).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return total, f"physical memory; {MEMORY_ENV} overrides"


def gb(n_bytes: float) -> str:
    """A byte count as GB (10^9) for one-line messages."""
    g = n_bytes / 1e9
    return f"{g:,.2f} GB" if g < 10 else f"{g:,.0f} GB" if g < 1e7 else f"{g:.1e} GB"


def check_memory(costs: list[Cost], values: dict[str, int], context: str = "",
                 device: str = "cpu", lower_bound: bool = False) -> None:
    """Refuse, in one line, a plan whose `costs` sum beyond `memory_budget(device)`.

    The line blames the setting (a key of `values`) that the most bytes grow with, gives the
    estimate and its parts, and the largest value of that setting that would fit beside the
    rest. Call it before allocating anything, so a size that cannot fit costs nothing."""
    need = sum(c.bytes for c in costs)
    budget, source = memory_budget(device)
    if budget is None or need <= budget:
        return
    name = max(values, key=lambda s: sum(c.bytes for c in costs if s in c.scales))
    grows = sum(c.bytes for c in costs if name in c.scales)
    rest = need - grows
    fit = math.floor(values[name] * (budget - rest) / grows) if grows and budget > rest else 0
    parts = ", ".join(f"{c.what} ~{gb(c.bytes)}" for c in sorted(costs, key=lambda c: -c.bytes)
                      if c.bytes >= 0.01 * need)
    if fit < 1:
        fits = f"no {name} fits: the rest alone needs ~{gb(rest)}"
    else:
        fits = f"{name} <= {fit:,} {'at most' if lower_bound else 'would fit'}"
    where = f"; {context}" if context else ""
    raise SaelabError(f"{name}={values[name]} needs {'at least ' if lower_bound else ''}~{gb(need)} "
                      f"of memory ({parts}{where}); this machine has {gb(budget)} ({source}); {fits}")
