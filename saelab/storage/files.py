"""Atomic file writes: a crash mid-write never leaves a half-written file in place.

A write goes to a hidden temp file beside its target (`.NAME.XXXXXXXX.tmp`) and is renamed
over it; a full disk removes the temp file and leaves the old target as it was. Temp files left
by a killed process are ignored by `check_output_dir` and removed by the next writer that takes
the directory's lock (`saelab.storage.lock`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save, save_file

from saelab.errors import SaelabError

_UMASK = os.umask(0)
os.umask(_UMASK)


_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # write_atomic's mkstemp names (its alphabet)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_temp(path: Path) -> bool:
    """Whether `path` is one of write_atomic's temp files (left behind only by a killed write)."""
    return bool(_TEMP.match(Path(path).name))


def remove_stale_temps(directory: Path) -> None:
    """Delete temp files of killed writes in `directory`; call only while holding its lock."""
    for p in Path(directory).iterdir():
        if is_temp(p) and p.is_file():
            p.unlink(missing_ok=True)


def _no_space(path: Path, existed: bool) -> SaelabError:
    kept = f"the previous {path.name} is intact" if existed else "nothing was written"
    return SaelabError(f"no space left on the device while writing {path}; {kept}; free some space and retry")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(tmp)` into a temp file beside `path`, then rename over it.

    Out of space, the temp file is removed and the old `path` (if any) is left untouched."""
    path = Path(path)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise _no_space(path, existed) from None
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in _NO_SPACE:
            raise _no_space(path, existed) from None
        raise
    except SafetensorError as e:  # safetensors reports a full disk as its own error type
        Path(tmp).unlink(missing_ok=True)
        if "os error 28" in str(e) or "No space left" in str(e):
            raise _no_space(path, existed) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: object) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    write_atomic(path, write)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                      digest: str | None = None) -> str | None:
    """Write `tensors` atomically; with `digest` (a hashlib name, e.g. "sha256"), also return
    the hex digest of the file's bytes, hashed from the buffer that is written (no re-read)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if digest is None:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return None
    data = save(tensors, metadata=metadata)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return hashlib.new(digest, data).hexdigest()


def read_safetensors(path: Path, keys: list[str] | None = None, what: str = "",
                     device: str = "cpu", expect: tuple[str, str] | None = None, whole: bool = False,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (only `keys` if given), never a pickle.

    A truncated or corrupt file is one clear error naming it (`what` says what it is). With
    `whole` the file is read into memory with one read() rather than memory-mapped (cheaper for
    a file used end to end once, such as a cache shard); with `expect` = (hashlib name, hex
    digest) it is also hashed and refused unless it matches.
    """
    if whole or expect is not None:
        return _read_whole(Path(path), keys, what, device, expect)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
            return tensors, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SaelabError(f"{what + ' ' if what else ''}{path} is truncated or corrupt ({e})") from None


def _read_whole(path: Path, keys: list[str] | None, what: str, device: str,
                expect: tuple[str, str] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    name = what + " " if what else ""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SaelabError(f"{name}{path} cannot be read ({e.strerror})") from None
    if expect is not None and hashlib.new(expect[0], data).hexdigest() != expect[1]:
        raise SaelabError(f"{name}{path} does not match its {expect[0]} recorded when it was written: "
                          "its contents changed or it was swapped; rebuild it")
    try:
        tensors = load_bytes(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError) as e:
        raise SaelabError(f"{name}{path} is truncated or corrupt ({e})") from None
    if keys is not None:
        missing = sorted(set(keys) - set(tensors))
        if missing:
            raise SaelabError(f"{name}{path} lacks tensor(s) {missing}")
        tensors = {k: tensors[k] for k in keys}
    return {k: v.to(device) for k, v in tensors.items()}, header.get("__metadata__") or {}


def check_output_dir(path: Path, overwrite: bool = False) -> Path:
    """Fail before any long work if `path` cannot take our output; creates nothing.

    An existing non-empty directory is only accepted with `overwrite`, so earlier results are
    never clobbered by accident (a lock file and temp files of a killed write do not count).
    An unwritable directory (permissions, a read-only filesystem) is refused here too.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaelabError(f"output path {path} exists and is not a directory; pick a new path")
    if path.is_dir() and not overwrite and any(_is_content(p) for p in path.iterdir()):
        raise SaelabError(f"output directory {path} is not empty; pick a new path or pass --overwrite")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if parent == path and not _writable(path):
        raise SaelabError(f"output directory {path} is not writable ({_why_unwritable(path)}); "
                          "pick a writable path")
    if not parent.is_dir() or not _writable(parent):
        raise SaelabError(f"output directory {path} cannot be created: {parent} is not a writable "
                          "directory; pick a writable path")
    return path


def _writable(directory: Path) -> bool:
    """Whether files can be created in `directory` (access(2) also sees a read-only mount)."""
    return os.access(directory, os.W_OK | os.X_OK)


def _why_unwritable(directory: Path) -> str:
    try:
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError:
        read_only = False
    return "read-only filesystem" if read_only else "permission denied"


def _is_content(p: Path) -> bool:
    """Whether `p` is a result someone may want kept (not a lock file, not a dead temp file)."""
    from saelab.storage.lock import LOCK_FILE  # saelab.storage.lock builds on this module

    return p.name != LOCK_FILE and not is_temp(p)
