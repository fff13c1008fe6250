"""Hardening (issue 14): one writer per directory, hashed and confined cache shards, no NaN
activations, no endless loops, full disks, stale temp files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saelab.data.cache import DIGEST, MANIFEST, CacheStream, Manifest, build_cache
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.storage.files import check_output_dir, is_temp, write_json, write_safetensors
from saelab.storage.lock import LOCK_FILE, hold

HOOK = "blocks.1.hook_resid_post"


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: a loop that makes no progress")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def lock_holder(directory: Path):
    """Another process holding `directory`'s lock until killed (SIGKILL on exit)."""
    code = textwrap.dedent(f"""
        import sys, time
        from saelab.storage.lock import hold
        with hold({str(directory)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> TokenData:
    """A small local text (this file): caching from it skips reading the whole stdlib."""
    f = tmp_path_factory.mktemp("text") / "code.txt"
    f.write_text(Path(__file__).read_text().replace("\n\n", "\n") * 3)
    return TokenData(str(f), context_length=64)


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dst


def _stream_all(directory: Path, batch: int = 1000) -> None:
    stream = CacheStream(directory, HOOK, batch)
    for _ in zip(range(5000 // batch + 1), stream, strict=False):
        pass


def _rewrite_manifest(directory: Path, edit) -> None:
    m = json.loads((directory / MANIFEST).read_text())
    edit(m)
    (directory / MANIFEST).write_text(json.dumps(m))


# --- one writer ---------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder_and_sigkill_releases(tmp_path):
    run = tmp_path / "run"
    with lock_holder(run) as proc:
        with pytest.raises(SaelabError, match=rf"is being written by pid {proc.pid} on "):
            with hold(run):
                pass
    with hold(run):  # the holder was SIGKILLed: the kernel released its lock
        assert f"pid {os.getpid()} " in (run / LOCK_FILE).read_text()


def test_lock_is_reentrant_in_one_process_and_a_refused_body_leaves_no_trace(tmp_path):
    run = tmp_path / "new"
    with hold(run), hold(run):  # a notebook resuming a run it trained: same process, no deadlock
        pass
    assert (run / LOCK_FILE).exists()  # after work, the (unlocked) lock file stays
    fresh = tmp_path / "fresh"
    with pytest.raises(SaelabError, match="bad input"), hold(fresh):
        raise SaelabError("bad input")
    assert not fresh.exists()  # it made the directory, wrote nothing else: both removed


def test_second_train_and_cache_into_one_directory_get_one_line(tmp_path, small_cache, capsys,
                                                                zoo_model, text_data):
    run = tmp_path / "run"
    with lock_holder(run) as proc:
        code, err = _cli(["train", "--cache", str(small_cache), "--out", str(run), "--n-latents", "64",
                          "--k", "4", "--tokens", "2000", "--batch-size", "500"], capsys)
        assert code == 2 and f"pid {proc.pid}" in err
        with pytest.raises(SaelabError, match=f"pid {proc.pid}"):
            build_cache(zoo_model, text_data, [HOOK], run, tokens=100)
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # neither wrote anything


def test_stale_temp_files_are_ignored_then_cleaned(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    stale = d / ".sae.safetensors.a1b2c3d4.tmp"
    stale.write_bytes(b"half a file")
    assert is_temp(stale)
    check_output_dir(d)  # a killed write's leftovers do not make a directory "not empty"
    with hold(d):
        assert not stale.exists()


# --- cache integrity ----------------------------------------------------------------------

def test_manifest_hash_is_the_files_sha256(small_cache):
    for shard in Manifest.read(small_cache).shards:
        data = (small_cache / shard["file"]).read_bytes()
        assert shard[DIGEST] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)


def test_changed_bytes_of_the_same_size_are_refused_when_read(small_cache, tmp_path):
    c = _copy_cache(small_cache, tmp_path / "c")
    f = c / "shard_00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x55  # one float's bits, deep in the data: the header still parses
    f.write_bytes(bytes(data))
    Manifest.read(c)  # sizes match: opening is fine ...
    with pytest.raises(SaelabError, match=f"{f}.*does not match its sha256"):
        _stream_all(c)  # ... the content check fires as the shard is loaded


def test_swapped_shard_is_refused(small_cache, tmp_path):
    c = _copy_cache(small_cache, tmp_path / "c")
    a, b = c / "shard_00000.safetensors", c / "shard_00001.safetensors"  # same size, other rows
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(SaelabError, match="does not match its sha256"):
        _stream_all(c)


@pytest.mark.parametrize("name", ["../other/shard_00000.safetensors", "ABS", "symlink"])
def test_shard_paths_are_confined_to_the_cache(small_cache, tmp_path, name):
    c = _copy_cache(small_cache, tmp_path / "c")
    other = _copy_cache(small_cache, tmp_path / "other")
    if name == "symlink":
        (c / "shard_00000.safetensors").unlink()
        (c / "shard_00000.safetensors").symlink_to(other / "shard_00000.safetensors")
    else:
        target = str(other / "shard_00000.safetensors") if name == "ABS" else name

        def edit(m):
            m["shards"][0]["file"] = target
        _rewrite_manifest(c, edit)
    with pytest.raises(SaelabError, match="not inside the cache directory"):
        Manifest.read(c)


def test_nan_shard_is_refused_when_read_naming_the_file(small_cache, tmp_path):
    c = _copy_cache(small_cache, tmp_path / "c")
    f = c / "shard_00001.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(f))
    tensors[HOOK][7, 3] = float("nan")
    save_file(tensors, str(f))

    def rehash(m):  # a consistent manifest: only the finiteness check can catch it
        m["shards"][1][DIGEST] = hashlib.sha256(f.read_bytes()).hexdigest()
        m["shards"][1]["bytes"] = f.stat().st_size
    _rewrite_manifest(c, rehash)
    with pytest.raises(SaelabError, match=rf"cache shard {f} \({HOOK}\) holds NaN or Inf"):
        _stream_all(c)


def test_nan_activations_are_refused_at_cache_time(zoo_model, text_data, tmp_path, monkeypatch):
    import saelab.data.cache as cache

    real = cache.model_activations

    def poisoned(*args, **kwargs):
        for i, acts in enumerate(real(*args, **kwargs)):
            if i == 1:
                acts[HOOK][0, 0] = float("inf")
            yield acts

    monkeypatch.setattr(cache, "model_activations", poisoned)
    out = tmp_path / "c"
    shard = rf"{out}/shard_0000\d.safetensors"
    with pytest.raises(SaelabError, match=rf"{HOOK} for cache shard {shard}.*NaN or Inf"):
        build_cache(zoo_model, text_data, [HOOK], out, tokens=3000, batch_rows=8, shard_rows=400)
    assert not (out / MANIFEST).exists()  # never looks complete


def test_old_manifest_without_hashes_is_read_with_a_warning(small_cache, tmp_path):
    c = _copy_cache(small_cache, tmp_path / "c")

    def strip(m):
        for s in m["shards"]:
            del s[DIGEST]
    _rewrite_manifest(c, strip)
    with pytest.warns(UserWarning, match="built before shard hashes"):
        stream = CacheStream(c, HOOK, 1000)
    assert next(iter(stream)).shape == (1000, 128)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("shards"), r"missing \['shards'\]"),
    (lambda m: m["hooks"].update({HOOK: 64}), rf"holds {HOOK} of shape \(1500, 128\).*\(1500, 64\)"),
    (lambda m: m["shards"][0].update(rows="many"), "each shard needs a file name, rows and bytes"),
    (lambda m: m.update(rows=1), "not the sum of its shards' rows"),
])
def test_inconsistent_manifest_is_one_error(small_cache, tmp_path, edit, match):
    c = _copy_cache(small_cache, tmp_path / "c")
    _rewrite_manifest(c, edit)
    with pytest.raises(SaelabError, match=match):
        _stream_all(c)


# --- loops that made no progress ----------------------------------------------------------

def test_batch_larger_than_the_cache_is_an_error_not_a_hang(small_cache, capsys):
    with deadline(60), pytest.raises(SaelabError, match="batch size 6000 is larger than the 5000 rows"):
        CacheStream(small_cache, HOOK, 6000, drop_last=True)
    code, err = _cli(["train", "--cache", str(small_cache), "--out", "unused", "--batch-size", "6000",
                      "--tokens", "12000"], capsys)
    assert code == 2 and "larger than the 5000 rows" in err
    assert not Path("unused").exists()


def test_data_too_short_for_one_row_is_an_error_not_a_hang(zoo_model, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("def f():\n    return 1\n")
    data = TokenData(str(f), context_length=128)
    with deadline(60):
        with pytest.raises(SaelabError, match=r"has \d+ tokens, fewer than one row of context_length 128"):
            next(data.rows(zoo_model.tokenizer))  # endless epochs: it used to spin forever
        with pytest.raises(SaelabError, match="fewer than one row"):
            build_cache(zoo_model, data, [HOOK], tmp_path / "c", tokens=100)
    assert not (tmp_path / "c").exists()


def test_empty_heldout_split_is_refused_before_training(tmp_path, capsys):
    from saelab.data.tokens import _in_split

    f = tmp_path / "train0.txt"  # one paragraph, which falls in the train split
    assert _in_split(f"{f.name}#0", "train")
    f.write_text("x = 1\n" * 2000)
    code, err = _cli(["train", "--data", str(f), "--out", str(tmp_path / "run"), "--tokens", "4096",
                      "--batch-size", "1024"], capsys)
    assert code == 2 and "no documents in split 'heldout'" in _one_line(err)
    assert not (tmp_path / "run").exists()  # found before any step, nothing left behind


# --- full disks ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs where the machine allows mounting one (root), else None."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True)
    yield d if r.returncode == 0 else None
    if r.returncode == 0:
        subprocess.run(["umount", str(d)], check=True)


def test_full_disk_keeps_the_old_file_and_says_so(small_disk, tmp_path, monkeypatch):
    disk = small_disk
    if disk is None:  # no tmpfs here: the same failure, raised by the write itself
        disk = tmp_path / "fake"
        disk.mkdir()

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        write_safetensors(disk / "w.safetensors", {"w": torch.ones(10)})
        monkeypatch.setattr("saelab.storage.files.save_file", full)
    else:
        write_safetensors(disk / "w.safetensors", {"w": torch.ones(10)})
    before = (disk / "w.safetensors").read_bytes()
    kept = r"no space left .*/w.safetensors; the previous w.safetensors is intact"
    with pytest.raises(SaelabError, match=kept):
        write_safetensors(disk / "w.safetensors", {"w": torch.ones(1_000_000)})  # 4 MB
    assert (disk / "w.safetensors").read_bytes() == before
    assert [p.name for p in disk.iterdir()] == ["w.safetensors"]  # no temp file left behind
    if small_disk is not None:
        with pytest.raises(SaelabError, match="no space left .* nothing was written"):
            write_json(disk / "big.json", list(range(100_000)))


def test_full_disk_during_cache_is_one_line(small_disk, zoo_model, text_data, tmp_path, monkeypatch):
    out = (small_disk or tmp_path) / "c"
    if small_disk is None:
        def full(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SaelabError, match="no space left on the device while writing .*shard_00000"):
        build_cache(zoo_model, text_data, [HOOK], out, tokens=2000, batch_rows=8)


# --- the command line ---------------------------------------------------------------------

def _cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `saelab ARGS`, run in this process."""
    from saelab.cli.app import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error: "), err
    return lines[0]
