"""One writer per output directory: an advisory lock held while a run or a cache build writes.

The lock is `fcntl.flock` on `LOCK_FILE` inside the directory. The kernel releases it when the
holding process exits for any reason (SIGKILL included), so a killed run can be resumed at
once and nothing stale ever has to be cleaned by hand. After a run that wrote, the file stays
behind; it holds the holder's pid, host and command, which a second writer quotes in its
one-line error. A run that fails removes the lock file it created, so a refused command leaves
the directory as it found it (`_acquire` re-checks the file's inode after locking, so removing
it never lets two writers in).

Within one process the lock is re-entrant (a notebook may train into a directory, then resume
it), and each `hold` releases it when its outermost holder is done.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saelab.errors import SaelabError
from saelab.storage.files import remove_stale_temps

LOCK_FILE = ".saelab.lock"

_held: dict[Path, tuple[int, int]] = {}  # resolved directory -> (fd, depth)


def holder(directory: Path) -> str:
    """Who holds (or last held) the lock of `directory`, as written in its lock file."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text().strip()
    except OSError:
        text = ""
    return text or "another process (it has not written its name yet)"


def _acquire(directory: Path) -> int:
    path = directory / LOCK_FILE
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)  # a failed holder may have just removed it
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only filesystem, no permission, a file in the way
            raise SaelabError(f"cannot write to output directory {directory} ({e.strerror}); "
                              "pick a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SaelabError(
                f"{directory} is being written by {holder(directory)}; wait for it to finish or "
                "pick another path"
            ) from None
        except OSError as e:  # a filesystem without flock support
            os.close(fd)
            raise SaelabError(f"cannot lock {path} ({e.strerror})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we opened it (see `hold`): take the new one
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    note = (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n")
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)
    return fd


@contextmanager
def hold(directory: str | Path) -> Iterator[Path]:
    """Hold the write lock of `directory` (created if missing) for the body, or fail at once
    with a one-line error naming the holder. Temp files left by a killed writer are removed
    once the lock is ours (nobody else can be writing them).

    If the body fails, the lock file goes if this `hold` created it, and the directory too if
    `hold` made it and it is left empty: a refused command leaves no trace."""
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaelabError(f"cannot create output directory {directory} ({e.strerror})") from None
    key = directory.resolve()
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        ours = False  # the outermost `hold` decides about the file
    else:
        ours = not (directory / LOCK_FILE).exists()
        try:
            _held[key] = (_acquire(directory), 1)
        except BaseException:
            _remove_if_empty(directory, created)
            raise
        remove_stale_temps(directory)
    failed = True
    try:
        yield directory
        failed = False
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            if failed and ours:
                (directory / LOCK_FILE).unlink(missing_ok=True)  # still ours: nobody else can lock it
                _remove_if_empty(directory, created)
            os.close(fd)  # closing the only descriptor releases the flock


def _remove_if_empty(directory: Path, created: bool) -> None:
    """Remove `directory` if `hold` created it and nothing was written into it."""
    if created and not any(directory.iterdir()):
        directory.rmdir()
