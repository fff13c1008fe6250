"""Atomic file writes: a crash mid-write never leaves a half-written file in place."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saelab.errors import SaelabError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` into a temp file beside `path`, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: object) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    write_atomic(path, write)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: Path, keys: list[str] | None = None, what: str = "",
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (only `keys` if given), never a pickle.

    A truncated or corrupt file is one clear error naming it (`what` says what it is).
    """
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
            return tensors, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SaelabError(f"{what + ' ' if what else ''}{path} is truncated or corrupt ({e})") from None


def check_output_dir(path: Path, overwrite: bool = False) -> Path:
    """Fail before any long work if `path` cannot take our output; creates nothing.

    An existing non-empty directory is only accepted with `overwrite`, so earlier results are
    never clobbered by accident.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaelabError(f"output path {path} exists and is not a directory; pick a new path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SaelabError(f"output directory {path} is not empty; pick a new path or pass --overwrite")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SaelabError(f"output directory {path} cannot be created: {parent} is not a writable directory")
    return path
