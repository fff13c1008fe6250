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

from saelab.cli import app, main

INT_OUT_OF_RANGE = str(2**63)  # no integer option may exceed int64 (tensors, seeds)
LOADERS = [importlib.import_module(m) for m in ("saelab.models", "saelab.training.sources",
                                                "saelab.heldout")]


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
