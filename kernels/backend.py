"""Which implementation runs a primitive: the Triton kernels or the plain-torch ops.

``SAELAB_KERNEL_BACKEND`` (read at every call, so it can be changed at run time):

- ``auto`` (default): Triton when the tensors are on CUDA, or when ``TRITON_INTERPRET=1`` is set
  (Triton's CPU interpreter: correct but slow, for tests only), and triton imports; torch
  otherwise.
- ``torch``: always the torch ops.
- ``triton``: always Triton; an error if triton does not import or cannot run on the tensors.

triton is imported lazily, on the first call that picks it, so saelab imports fine where triton is
not installed (macOS, Windows, minimal installs).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

from . import torch_ops

ENV_VAR = "SAELAB_KERNEL_BACKEND"
CHOICES = ("auto", "torch", "triton")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_ops() -> ModuleType | str:
    """The Triton backend module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.triton_ops")
    except ImportError as e:  # triton missing, or a build that does not match this torch
        return f"{type(e).__name__}: {e}"


def requested() -> str:
    """The backend asked for by ``SAELAB_KERNEL_BACKEND``; a clear error for a bad value."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in CHOICES:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(CHOICES)}")
    return name


def select(device: torch.device) -> ModuleType:
    """The backend module (``torch_ops`` or ``triton_ops``) for tensors on ``device``."""
    name = requested()
    if name == "torch":
        return torch_ops
    runnable = device.type == "cuda" or _interpreter_on()
    if name == "auto":
        if not runnable:
            return torch_ops
        ops = _triton_ops()
        return ops if isinstance(ops, ModuleType) else torch_ops
    ops = _triton_ops()
    if not isinstance(ops, ModuleType):
        raise RuntimeError(f"{ENV_VAR}=triton, but triton cannot be imported ({ops})")
    if not runnable:
        raise RuntimeError(
            f"{ENV_VAR}=triton, but the tensors are on {device} and Triton runs only on CUDA "
            "(or on CPU under TRITON_INTERPRET=1, for testing); unset it to use the torch ops"
        )
    return ops


def name_for(device: torch.device) -> str:
    """``'torch'`` or ``'triton'``: which backend calls on ``device`` would use."""
    return select(device).__name__.rsplit(".", 1)[-1].removesuffix("_ops")
