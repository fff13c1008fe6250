"""`saelab eval DICT --probes`: the probing report on disk, the browser showing each latent's best
label, and bad input as one line before anything is written."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pytest
import torch
from test_end_to_end import run_cli

from saelab.browse import build_site
from saelab.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, n_latents=64, k=4, hook=HOOK, model="zoo:pystdlib-4l",
                        data="builtin:stdlib", context_length=64))
    return sae.save(tmp_path_factory.mktemp("probes") / "sae")


def test_eval_probes_writes_the_report_and_the_browser_shows_labels(dictionary, zoo_model, tmp_path,
                                                                     monkeypatch, capsys):
    args = ["eval", str(dictionary), "--tokens", "512", "--probes", "--probe-tokens", "3000"]
    code, out = run_cli(args, monkeypatch, capsys)
    assert code == 0, out.err
    assert "absorption: mean rate" in out.out
    for name in ("probing.json", "probing.md", "probing.png", "eval.json"):
        assert (dictionary / name).stat().st_size > 0, name
    report = json.loads((dictionary / "probing.json").read_text())
    assert report["files_skipped"] == 0 and report["files"] >= 12 and report["positions"] >= 3000
    assert set(report["labels"]["NAME"]["sparse"]) == {"1", "2", "5", "20"}
    best = report["latent_labels"]
    j = max(range(64), key=lambda i: best["f1"][i])
    build_site(dictionary, tmp_path / "site", tokens=256, latents=[j], model=zoo_model, progress=False)
    page = (tmp_path / "site" / "blocks.1.hook_resid_post" / f"{j}.html").read_text()
    assert f"{html.escape(best['names'][best['best'][j]])} (F1 {best['f1'][j]:.2f}" in page
    stale = dictionary / "sae.safetensors"  # weights newer than the probes: no label shown
    os.utime(stale, (stale.stat().st_atime, (dictionary / "probing.json").stat().st_mtime + 10))
    build_site(dictionary, tmp_path / "site2", tokens=256, latents=[j], model=zoo_model, progress=False)
    assert "best label" not in (tmp_path / "site2" / "blocks.1.hook_resid_post" / f"{j}.html").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--probe-tokens", "0"], "probe_tokens"),
    (["--probe-labels", "bogus"], "unknown probe labels 'bogus'; use one of python, letters, tasks"),
    (["--data", "{txt}"], "tokenizes as Python"),
])
def test_bad_probe_input_is_one_line_and_writes_nothing(dictionary, tmp_path, extra, message, monkeypatch,
                                                        capsys):
    txt = tmp_path / "prose.txt"
    txt.write_text("\n\n".join(f"paragraph {i} (of plain prose, unclosed" for i in range(400)))
    out = tmp_path / "out"
    args = ["eval", str(dictionary), "--out", str(out), "--probes", *(a.format(txt=txt) for a in extra)]
    code, got = run_cli(args, monkeypatch, capsys)
    lines = got.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("saelab: error: ") and message in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_probes_refuse_a_transcoder_before_the_eval_runs(tmp_path, monkeypatch, capsys):
    sae = SAE(SAEConfig(d_in=128, n_latents=64, k=4, hook="blocks.1.ln2.hook_normalized",
                        target_hook="blocks.1.hook_mlp_out", model="zoo:pystdlib-4l"))
    saved = sae.save(tmp_path / "tc")
    before = sorted(p.name for p in saved.iterdir())
    code, got = run_cli(["eval", str(saved), "--probes"], monkeypatch, capsys)
    assert code == 2 and "transcoder" in got.err and len(got.err.strip().splitlines()) == 1, got.err
    assert sorted(p.name for p in saved.iterdir()) == before  # no eval.json: refused before the eval
