"""Every bad command line is one `saelab: error: ...` line and exit code 2, found before any
model loads or anything is written: usage errors, a generated sweep over every numeric option
and flag of every command, and the inputs that used to end in a traceback (issue 14)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file

from saelab.cli.app import app, main

INT_OUT_OF_RANGE = str(2**63)  # no integer option may exceed int64 (tensors, seeds)
LOADERS = [importlib.import_module(m) for m in ("saelab.models", "saelab.training.sources",
                                                "saelab.data.heldout")]


def run(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, the one stderr line) of `saelab ARGS` in this process; fails unless stderr
    is exactly one `saelab: error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saelab: error: "), err
    return e.value.code, err[0]


def _commands(group=None, path=()):
    """(command path, click command) of every leaf command of the app, so new ones are swept too."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _kind(param) -> type:
    """int, float or another type: from typer's type descriptor (typer >= 0.26 vendors click),
    else from click's param type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation
    return {"integer": int, "float": float}.get(param.type.name, str)


def _required_args(cmd, tmp: Path) -> list[str]:
    """Placeholder values for a command's positional arguments (never used: the probed option
    must fail first)."""
    from saelab import zoo

    values = {"name": next(iter(zoo.RECIPES))}
    return [values.get(p.name, str(tmp / p.name)) for p in cmd.params
            if p.param_type_name == "argument"]


def _probes():
    for path, cmd in _commands():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            opt, kind = p.opts[0], _kind(p)
            if getattr(p, "is_flag", False):
                yield path, p.name, [f"{opt}=abc"]
            elif kind in (int, float):
                yield path, p.name, [opt, "abc"]  # wrong type
                yield path, p.name, [f"{opt}=-5"]  # negative
                if kind is int:
                    yield path, p.name, [opt, INT_OUT_OF_RANGE]
                else:
                    yield path, p.name, [opt, "nan"]
                    yield path, p.name, [opt, "inf"]


PROBES = list(_probes())


def test_sweep_covers_every_numeric_option():
    swept = {(path, name) for path, name, _ in PROBES}
    assert {(("train",), "k"), (("train",), "lr"), (("cache",), "tokens"), (("eval",), "batch_rows"),
            (("export",), "context_size"), (("zoo", "build"), "tokens"),
            (("train",), "overwrite")} <= swept


@pytest.mark.parametrize("path, name, probe", PROBES,
                         ids=[f"{' '.join(p)} {' '.join(a)}" for p, _, a in PROBES])
def test_every_option_refuses_bad_values_in_one_line(path, name, probe, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad option was refused")

    for module in LOADERS:  # every module that binds load_model at import
        monkeypatch.setattr(module, "load_model", no_model)
    monkeypatch.setattr(LOADERS[0], "_load_hf", no_model)  # where every model load ends up
    monkeypatch.chdir(tmp_path)
    cmd = dict(_commands())[path]
    code, line = run([*path, *_required_args(cmd, tmp_path), *probe], capsys)
    assert code == 2
    assert name in line or name.replace("_", "-") in line, line  # it names the option
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


NO_DEFAULT = {("train", "config"), ("train", "resume")}  # files to read, not settings


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=" ".join)
def test_help_lists_every_option_with_its_default(path, capsys, monkeypatch):
    """Every command's --help renders (help text is rich markup: a stray `[/X]` once crashed
    `export --help`) and shows each option (wide enough that rich cuts no name), its help
    ending in the default."""
    monkeypatch.setenv("COLUMNS", "200")
    cmd = dict(_commands())[path]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    shown = capsys.readouterr().out
    assert e.value.code == 0 and "Usage: saelab" in shown
    for p in cmd.params:
        if p.param_type_name != "option" or p.name == "help":
            continue
        assert p.opts[0] in shown, p.name
        if (path[-1], p.name) not in NO_DEFAULT:
            assert "(default: " in p.help, (p.name, p.help)


@pytest.mark.parametrize("args, match", [
    (["train", "--k", "abc"], "Invalid value for '--k'"),
    (["train", "--no-such-flag"], "No such option: --no-such-flag"),
    (["cache"], "Missing argument 'out'"),
    (["eval", "a", "b", "c"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line(args, match, capsys):
    code, line = run(args, capsys)
    assert code == 2 and match.lower() in line.lower()


def _dictionary(tmp: Path, cfg: dict | list, nan: bool = False) -> Path:
    d = tmp / "sae"
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    w = {"W_enc": torch.zeros(8, 4), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4),
         "b_dec": torch.zeros(4)}
    if nan:
        w["W_dec"][1, 2] = float("nan")
    save_file(w, str(d / "sae.safetensors"))
    return d


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Inputs from issue 14 that ended in a traceback: args -> expected words of the error."""
    (tmp / "empty").mkdir()
    killed = tmp / "killed-cache"
    killed.mkdir()
    (killed / "shard_00000.safetensors").write_bytes(b"\0" * 64)
    binary = tmp / "bin.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    notstr = tmp / "notstr.jsonl"
    notstr.write_text('{"text": 5}\n')
    listcfg = tmp / "list.yaml"
    listcfg.write_text("k: [1, 2]\n")
    pickled = tmp / "pickled-model"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "gpt2"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    ok_cfg = {"d_in": 4, "n_latents": 8, "k": 2}
    no_config = tmp / "no-config-run"
    no_config.mkdir()
    save_file({"x": torch.zeros(1)}, str(no_config / "checkpoint.safetensors"),
              metadata={"saelab_checkpoint": json.dumps({"seen": 0})})
    return {
        "negative lr": (["train", "--lr=-1"], "lr must be > 0"),
        "nan lr": (["train", "--lr", "nan"], "lr must be a finite number"),
        "empty dir as --model": (["train", "--model", str(tmp / "empty"), "--out", str(tmp / "r1")],
                                 "not a Hugging Face model directory"),
        "empty dir to info": (["info", str(tmp / "empty")], "not a Hugging Face model directory"),
        "killed cache dir to info": (["info", str(killed)], "not a Hugging Face model directory"),
        "binary jsonl": (["cache", str(tmp / "c1"), "--data", str(binary)], "is not UTF-8 text"),
        "text not a string": (["cache", str(tmp / "c2"), "--data", str(notstr)],
                              '"text" field holding a string'),
        "cuda without a GPU": (["train", "--device", "cuda"], "no CUDA GPU"),
        "unknown device": (["cache", str(tmp / "c3"), "--device", "tpu9"], "unknown device 'tpu9'"),
        "cfg.json not an object": (["eval", str(_dictionary(tmp / "a", [1, 2]))], "must be a JSON object"),
        "non-integer k": (["export", str(_dictionary(tmp / "b", {**ok_cfg, "k": 2.5})), str(tmp / "e1")],
                          "k must be of type int"),
        "nan weights": (["export", str(_dictionary(tmp / "c", ok_cfg, nan=True)), str(tmp / "e2")],
                        "NaN or Inf values in W_dec"),
        "list in config file": (["train", "--config", str(listcfg)], "k must be of type int"),
        "checkpoint without config": (["train", "--resume", str(no_config)], "no valid training config"),
        "pytorch_model.bin only": (["info", str(pickled)], "holds only pytorch_model.bin"),
        "negative warmup": (["train", "--warmup-steps=-3"], "warmup_steps must be >= 0"),
        "negative zipf exponent": (["train", "--zipf-alpha=-1"], "zipf_alpha must be >= 0"),
        "tokens below one batch": (["train", "--tokens", "100", "--batch-size", "4096"],
                                   "less than one batch"),
        "decay fraction above 1": (["train", "--decay-fraction", "2"], "decay_fraction must lie in [0, 1]"),
        "eval --out is a file": (["eval", str(tmp / "empty"), "--out", str(binary)], "is not a directory"),
    }



def test_former_traceback_inputs_are_one_line_each(tmp_path, capsys):
    failures = []
    for what, (args, match) in _bad_inputs(tmp_path).items():
        code, line = run(args, capsys)
        if code != 2 or match not in line:
            failures.append(f"{what}: exit {code}: {line}")
    assert not failures, "\n".join(failures)


# --- nothing replaced that a command did not make; unwritable output (issue 22) -----------------

WRITERS = {  # command -> (args before --out / OUT, how OUT is given): every command that writes
    ("train",): ([], "--out"),
    ("cache",): ([], None),  # OUT is its argument
    ("eval",): (["DICT"], "--out"),
    ("export",): (["DICT"], None),
    ("browse",): (["DICT"], "--out"),
    ("sparsity",): ([], "--out"),
    ("circuits",): ([], "--out"),
    ("zoo", "build"): (["pystdlib-4l-v2"], "--out"),
}


def _writer_args(path: tuple[str, ...], out: Path, tmp: Path) -> list[str]:
    before, flag = WRITERS[path]
    d = tmp / "dict" / "sae"
    if "DICT" in before and not d.exists():
        _dictionary(tmp / "dict", {"d_in": 4, "n_latents": 8, "k": 2})
    before = [str(d) if a == "DICT" else a for a in before]
    return [*path, *before, *([flag] if flag else []), str(out)]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (hidden ones included) with its bytes: what a refusal must keep."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or zoo training fails the test: a refusal must come before the work."""
    from saelab.zoo import build as zoo_build

    def work(*a, **k):
        raise AssertionError("work started before the output directory was refused")

    monkeypatch.setattr(LOADERS[0], "_load_hf", work)  # where every model load ends up
    monkeypatch.setattr(zoo_build, "byte_tokenizer", work)  # a zoo build's first step
    monkeypatch.setattr(zoo_build.task_corpus, "word_tokenizer", work)


def test_every_writing_command_is_covered():
    takes_out = {path for path, cmd in _commands()
                 if {"out", "overwrite"} & {p.name for p in cmd.params}}
    assert takes_out == set(WRITERS)
    assert all("overwrite" in {p.name for p in cmd.params} for path, cmd in _commands()
               if path in WRITERS)


@pytest.mark.parametrize("path", WRITERS, ids=" ".join)
def test_non_empty_out_is_refused_leaving_it_byte_for_byte(path, tmp_path, capsys, no_work):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("a user's file\n")
    (out / "sub").mkdir()
    (out / "sub" / "notes.md").write_text("more\n")
    args = _writer_args(path, out, tmp_path)
    before = _snapshot(out)
    code, line = run(args, capsys)
    assert code == 2 and str(out) in line and "not empty" in line, line
    assert _snapshot(out) == before  # no .saelab.lock, nothing replaced


@pytest.mark.parametrize("path", WRITERS, ids=" ".join)
def test_a_file_as_out_is_one_line_before_work(path, tmp_path, capsys, no_work):
    out = tmp_path / "a-file"
    out.write_text("keep me\n")
    code, line = run(_writer_args(path, out, tmp_path), capsys)
    assert code == 2 and f"{out} exists and is not a directory" in line, line
    assert out.read_text() == "keep me\n"


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory on a real read-only filesystem (a read-only tmpfs mount: chmod does
    not stop root); skipped where mounting is not allowed (the lock's own handling of EROFS is
    tested without a mount below)."""
    import subprocess

    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("path", WRITERS, ids=" ".join)
def test_read_only_out_is_one_line_before_work(path, read_only_dir, tmp_path, capsys, no_work):
    code, line = run(_writer_args(path, read_only_dir, tmp_path), capsys)
    assert code == 2 and f"{read_only_dir} is not writable (read-only filesystem)" in line, line
    code, line = run(_writer_args(path, read_only_dir / "new", tmp_path), capsys)
    assert code == 2 and f"{read_only_dir} is not a writable directory" in line, line


def test_lock_on_an_unwritable_directory_is_one_line(tmp_path, monkeypatch):
    """`hold` (which `train --resume` reaches without check_output_dir) turns EROFS from
    os.open (patched here; the real read-only case is the mount above) into one clear error."""
    import errno
    import os

    from saelab.errors import SaelabError
    from saelab.storage import lock

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(lock.os, "open", read_only)
    with pytest.raises(SaelabError, match=f"cannot write to output directory {run_dir} "
                                          r"\(Read-only file system\); pick a writable path"):
        with lock.hold(run_dir):
            pass
    assert list(run_dir.iterdir()) == []
    with pytest.raises(SaelabError, match="Read-only file system"), lock.hold(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # the directory it made is gone again


def test_a_failed_body_removes_only_the_lock_file_it_created(tmp_path):
    from saelab.errors import SaelabError
    from saelab.storage.lock import LOCK_FILE, hold

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("x")
    with pytest.raises(SaelabError), hold(mine):
        raise SaelabError("refused after the lock")
    assert [p.name for p in mine.iterdir()] == ["results.csv"]
    (mine / LOCK_FILE).write_text("an earlier run\n")
    with pytest.raises(SaelabError), hold(mine):
        raise SaelabError("refused after the lock")
    assert (mine / LOCK_FILE).exists()  # it was there before: not ours to remove


def test_eval_out_needs_overwrite_but_the_dictionary_dir_is_its_own(tmp_path, capsys, no_work):
    d = _dictionary(tmp_path / "d", {"d_in": 4, "n_latents": 8, "k": 2, "model": "zoo:pystdlib-4l",
                                     "hook": "blocks.0.hook_resid_post"})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.md").write_text("a user's notes")
    code, line = run(["eval", str(d), "--out", str(mine)], capsys)
    assert code == 2 and "not empty" in line and "--overwrite" in line
    assert (mine / "eval.md").read_text() == "a user's notes"
    for args in (["eval", str(d)], ["eval", str(d), "--out", str(d)], ["eval", str(d), "--out",
                                                                       str(mine), "--overwrite"]):
        with pytest.raises(AssertionError, match="work started"):  # past the check, into the work
            main(args)


def test_a_file_where_a_hook_directory_goes_is_refused_before_work(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    out.mkdir()
    (out / "blocks.0.mlp.hook_post").write_text("a user's file")
    before = _snapshot(out)
    code, line = run(["train", "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.0.mlp.hook_post",
                      "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and f"{out / 'blocks.0.mlp.hook_post'} exists and is not a directory" in line
    assert _snapshot(out) == before


def test_a_file_where_a_browse_section_goes_is_refused_before_the_pass(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from saelab.browse import site

    d = _dictionary(tmp_path / "d", {"d_in": 4, "n_latents": 8, "k": 2})
    hook = "blocks.0.hook_resid_post"
    monkeypatch.setattr(site, "load_dictionaries",  # the dictionary as loaded: its hook names its section
                        lambda *a: ([SimpleNamespace(name=hook)], None, None))
    monkeypatch.setattr(site, "collect", lambda *a: pytest.fail("the pass over the data started"))
    out = tmp_path / "site"
    out.mkdir()
    (out / site.section_dir(hook)).write_text("a user's file")
    code, line = run(["browse", str(d), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and f"{out / site.section_dir(hook)} exists and is not a directory" in line


@pytest.mark.parametrize("args, match", [
    (["--allocator", "matryoshka", "--matryoshka", "512,128"], "strictly increasing, got 512,128"),
    (["--allocator", "matryoshka", "--n-latents", "1024", "--matryoshka", "128,4096"],
     "matryoshka prefix 4096 is larger than the dictionary"),
    (["--matryoshka", "128,512"], "--matryoshka applies to --allocator matryoshka"),
])
def test_bad_matryoshka_prefixes_are_one_line_before_work(args, match, tmp_path, capsys, no_work):
    code, line = run(["train", "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2 and match in line, line
    assert list(tmp_path.iterdir()) == []
