"""Sizes whose memory this machine cannot hold are one-line errors before any work (issue 22,
item 3): prompt counts, dictionary sizes and batch shapes from flags, n_latents from cfg.json,
shard rows from cache manifests. The budget is physical memory, or SAELAB_MEMORY_GB."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from test_hardening_cli import run  # tests/cli is on the path (pyproject)

import saelab
from saelab.allocators import get as allocator
from saelab.checks import MEMORY_ENV, Cost, check_memory, memory_budget
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.training.config import TrainConfig

HUGE = "1000000000"
LOADERS = [importlib.import_module(m) for m in ("saelab.models", "saelab.training.sources",
                                                "saelab.evals.circuits.discover")]


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the size must be refused before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the size was refused")

    for module in LOADERS:
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(LOADERS[0], "_load_hf", refuse)




@pytest.mark.parametrize("args, name", [
    (["circuits", "--prompts", HUGE], "prompts"),
    (["circuits", "--train-prompts", HUGE], "train_prompts"),
    (["circuits", "--truth-prompts", HUGE], "truth_prompts"),
    (["circuits", "--task", "greater-than", "--prompts", HUGE], "prompts"),
    (["train", "--n-latents", HUGE], "n_latents"),
    (["train", "--expansion", HUGE], "expansion"),
    (["train", "--batch-size", "10000000000000", "--tokens", "10000000000000"], "batch_size"),
    (["train", "--buffer-tokens", "10000000000000000"], "buffer_tokens"),
])
def test_huge_sizes_are_one_line_before_the_model(args, name, tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    code, line = run([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert line.startswith(f"saelab: error: {name}=") and " GB of memory" in line, line
    assert "this machine has" in line and "at most" in line  # a bound: d_in / the model are not known yet
    assert list(tmp_path.iterdir()) == []


def test_default_sizes_pass_the_early_checks():
    TrainConfig.of()  # the default run's config: no refusal
    TrainConfig.of().check_memory(128)  # and on the default model's width


def _dictionary(tmp_path, n_latents: int):
    d = tmp_path / "sae"
    SAE(SAEConfig(d_in=4, n_latents=8, k=2)).save(d)
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "n_latents": n_latents}))
    return d


def test_cfg_json_with_huge_n_latents(tmp_path, capsys):
    d = _dictionary(tmp_path, 10**18)
    with pytest.raises(SaelabError, match=r"n_latents=1000000000000000000 needs ~.* GB .*d_in 4"):
        saelab.load(d)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, line = run(["export", str(d), str(tmp_path / "exported")], capsys)
    assert code == 2 and "n_latents=1000000000000000000" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_check_memory_against_a_stated_cap(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "2")
    assert memory_budget() == (2e9, MEMORY_ENV)
    costs = [Cost("a", 1.5e9, ("x",)), Cost("b", 1e9, ("y",))]
    check_memory([Cost("a", 1.5e9, ("x",))], {"x": 3})  # fits: no error
    with pytest.raises(SaelabError) as e:
        check_memory(costs, {"x": 3, "y": 7})
    # x grows the most; beside y's 1 GB, x may use 1 GB: 3 * 1 / 1.5 = 2
    assert str(e.value).startswith("x=3 needs ~2.50 GB") and "x <= 2 would fit" in str(e.value)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(SaelabError, match=f"{MEMORY_ENV}='lots' must be a positive number"):
        memory_budget()


def test_training_estimate_once_d_in_is_known(monkeypatch):
    """A size that passes before the model opens (d_in taken as 1) is refused once d_in is
    known, and the estimate is the documented sum, computed here independently."""
    n, d, batch, buffer = 8192, 512, 4096, 2**17
    cfg = TrainConfig.of(n_latents=n)
    expected = (16 * (2 * n * d + n + d) + 4 * allocator("topk").step_matrices * batch * n
                + 8 * batch * d + 4 * buffer * d)
    monkeypatch.setenv(MEMORY_ENV, str(expected / 1e9 * 1.01))
    cfg.check_latents(d)  # just fits
    monkeypatch.setenv(MEMORY_ENV, str(expected / 1e9 * 0.99))
    with pytest.raises(SaelabError, match=rf"n_latents={n} needs ~{expected / 1e9:.2f} GB .*d_in {d}"):
        cfg.check_latents(d)


def test_manifest_rows_must_be_in_the_shard(tmp_path):
    """A manifest claiming more rows than its shard's bytes hold is refused before any read."""
    from saelab.data.cache import MANIFEST, Manifest

    save_file({"h": torch.zeros(4, 3)}, str(tmp_path / "shard_00000.safetensors"))
    size = (tmp_path / "shard_00000.safetensors").stat().st_size
    manifest = {"model": "zoo:x", "hooks": {"h": 3}, "dtype": "float32", "rows": 4,
                "data": {"spec": "builtin:stdlib", "context_length": 8}, "saelab_version": "0",
                "shards": [{"file": "shard_00000.safetensors", "rows": 4, "bytes": size}],
                "format": "saelab-activation-cache/1"}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert Manifest.read(tmp_path).rows == 4  # the honest manifest reads
    huge = 10**15
    manifest.update(rows=huge, shards=[{**manifest["shards"][0], "rows": huge}])
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SaelabError, match=f"claims {huge} rows of 12 bytes, more than its {size}"):
        Manifest.read(tmp_path)


def test_circuits_estimate_with_the_model(monkeypatch):
    """A truth-prompt count that passes before the model loads (its text fits) is refused once
    the model's head grid and prompt length are known, before any forward pass."""
    from saelab.evals.circuits import DiscoverConfig
    from saelab.evals.circuits.discover import check_prompt_memory
    from saelab.models import load_model

    monkeypatch.setenv(MEMORY_ENV, "1")
    cfg = DiscoverConfig(truth_prompts=20_000)
    check_prompt_memory(cfg, "ioi", None)  # 20k prompts' text: a few MB
    model = load_model("zoo:tasks-4l")
    with pytest.raises(SaelabError, match=r"truth_prompts=20000 needs ~.* GB .*zoo:tasks-4l") as e:
        check_prompt_memory(cfg, "ioi", None, model, tokens=24)
    fit = int(str(e.value).rsplit("truth_prompts <= ", 1)[1].split()[0].replace(",", ""))
    assert 0 < fit < 20_000
    check_prompt_memory(DiscoverConfig(truth_prompts=fit), "ioi", None, model, tokens=24)
    assert math.isfinite(memory_budget()[0])
