"""Train from a cache and on the fly, reload in a 'notebook', and the CLI's error contract."""

import json
import sys

import pytest
import torch

import saelab
from saelab.cli.app import main
from saelab.cli.pipeline import train_and_evaluate
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.evals import reconstruction_stats
from saelab.training import TrainConfig
from saelab.zoo import DEFAULT_MODEL

SMALL = dict(n_latents=256, k=8, tokens=30_000, batch_size=1024, eval_tokens=4096, warmup_steps=5)


def test_eval_command_writes_report(trained, tmp_path, monkeypatch, capsys):
    code, cap = run_cli(["eval", str(trained.out), "--tokens", "2048", "--out", str(tmp_path)],
                        monkeypatch, capsys)
    assert code == 0, cap.err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["tokens"] >= 2048 and 0 < report["fvu"] < 1
    assert report["ce_sae"] >= report["ce_clean"] - 0.05
    assert (tmp_path / "latent_density.png").stat().st_size > 1000
    assert "CE" in cap.out


def run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["saelab", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def trained(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sae"
    (result,) = train_and_evaluate(TrainConfig.of(cache=str(small_cache), hook="blocks.1.hook_resid_post",
                                  out=str(out), **SMALL)).values()
    return result


def test_training_from_cache_learns(trained):
    s = trained.summary
    assert s["heldout_fvu"] < 0.5, s  # an untrained (init) SAE sits near or above 1
    assert s["heldout_l0"] == pytest.approx(8, abs=0.5)
    log = json.loads((trained.out / "metrics.json").read_text())["log"]
    assert log[-1]["fvu"] < log[0]["fvu"]


def test_dictionary_records_provenance_and_eval_defaults_to_it(trained):
    from saelab.evals import evaluate

    cfg = saelab.load(str(trained.out)).cfg
    assert (cfg.data, cfg.context_length, cfg.eval_tokens) == ("builtin:stdlib", 64, 4096)
    assert cfg.train_tokens == 30_000 // 1024 * 1024 and cfg.saelab_version == saelab.__version__
    report = evaluate(str(trained.out))  # no data, window or context given: the run's own
    s = trained.summary
    assert (report["data"], report["split"], report["context_length"]) == ("builtin:stdlib", "heldout", 64)
    assert report["tokens"] == s["heldout_tokens"]  # the same dead-latent window
    assert report["fvu"] == pytest.approx(s["heldout_fvu"], rel=1e-6)
    assert report["dead_frac"] == s["heldout_dead_frac"]


def test_notebook_reload_reproduces_summary_fvu(trained, zoo_model):
    sae = saelab.load(str(trained.out))
    assert sae.cfg.hook == "blocks.1.hook_resid_post" and sae.cfg.model == "zoo:pystdlib-4l"
    # the held-out rows the end-of-run eval used, run through the model by hand
    rows = heldout_rows(zoo_model.tokenizer, TokenData(split="heldout", context_length=64), 4096)
    x = zoo_model.activations(rows, [sae.cfg.hook])[sae.cfg.hook][rows != 256]
    assert x.shape[0] == trained.summary["heldout_tokens"]
    with torch.no_grad():
        idx, vals = sae.encode(x)
        x_hat = sae.decode(idx, vals)
        torch.testing.assert_close(sae(x), x_hat)
    fvu = ((x - x_hat).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(trained.summary["heldout_fvu"], rel=1e-4)
    assert reconstruction_stats(sae, x)["fvu"] == pytest.approx(fvu, rel=1e-9)
    for name in ("eval.json", "eval.md", "latent_density.png", "l0_histogram.png"):
        assert (trained.out / name).exists(), name


def test_on_the_fly_training_via_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fly"
    args = ["train", "--out", str(out), "--n-latents", "256", "--k", "8", "--tokens", "20000",
            "--batch-size", "1024", "--eval-tokens", "2048", "--context-length", "64"]
    code, cap = run_cli(args, monkeypatch, capsys)
    assert code == 0, cap.err
    assert "held-out FVU" in cap.out and "tok/s" in cap.out and "CE recovered" in cap.out
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["hook"] == "blocks.2.hook_resid_post" and cfg["n_latents"] == 256


@pytest.mark.parametrize("args, message", [
    (["train", "--hook", "blocks.9.hook_resid_post"], "unknown hook 'blocks.9.hook_resid_post'"),
    (["train", "--n-latents", "16", "--k", "32"], "k=32 is larger than the dictionary"),
    (["train", "--cache", "{tmp}/nocache"], "no activation cache at"),
    (["train", "--cache", "{cache}", "--hook", "blocks.3.hook_resid_post"], "holds hooks"),
    (["train", "--cache", "{cache}", "--model", "zoo:other"], "was built from model zoo:pystdlib-4l"),
    (["cache", "{tmp}/c", "--hook", "nope"], "unknown hook 'nope'"),
    (["info", "zoo:nope"], "zoo model 'nope' is not installed"),
    (["info", "runs/sea"], "no such directory; for the Hugging Face hub write hf:runs/sea"),
    (["train", "--model", "gpt2"], "no such directory; for the Hugging Face hub write hf:gpt2"),
    (["eval", "runs/sea"], "no dictionary directory 'runs/sea'"),
    (["train", "--context-length", "999"], f"context length 999 does not fit model {DEFAULT_MODEL}"),
    (["cache", "{tmp}/c", "--context-length", "999"], "context length 999 does not fit"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, small_cache, monkeypatch, capsys):
    args = [a.format(tmp=tmp_path, cache=small_cache) for a in args]
    out = tmp_path / "out"
    if args[0] == "train":
        args += ["--out", str(out)]
    code, cap = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert message in cap.err
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_or_occupied_output_leaves_files_untouched(tmp_path, monkeypatch, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "cfg.json").write_text("{\"mine\": true}")
    code, cap = run_cli(["train", "--out", str(occupied)], monkeypatch, capsys)
    assert code == 2 and "not empty" in cap.err
    assert (occupied / "cfg.json").read_text() == "{\"mine\": true}"

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, cap = run_cli(["train", "--out", str(blocker / "sub")], monkeypatch, capsys)
    assert code == 2 and "saelab: error:" in cap.err
    assert blocker.read_text() == "x"


def test_usage_error_exits_2(monkeypatch, capsys):
    code, cap = run_cli(["train", "--k", "many"], monkeypatch, capsys)
    assert code == 2 and "Invalid value for '--k'" in cap.err and "Traceback" not in cap.err


def test_several_hooks_one_forward_pass(tmp_path, monkeypatch, capsys):
    """Two --hook flags: one SAE per hook in OUT/HOOK, fed by a single forward pass per batch."""
    from saelab.models import HookedModel

    calls = []
    real = HookedModel.activations

    def counting(self, tokens, hooks, with_grads=False):
        calls.append(list(hooks))
        return real(self, tokens, hooks, with_grads)

    monkeypatch.setattr(HookedModel, "activations", counting)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    args = ["train", "--out", str(tmp_path / "multi"), "--expansion", "2", "--k", "8",
            "--tokens", "8192", "--batch-size", "1024", "--eval-tokens", "1024",
            "--context-length", "64", "--buffer-tokens", "4096"]
    code, cap = run_cli(args + [x for h in hooks for x in ("--hook", h)], monkeypatch, capsys)
    assert code == 0, cap.err
    training_calls = [c for c in calls if len(c) == 2]
    assert training_calls and all(c == hooks for c in training_calls)
    for hook, d in zip(hooks, (128, 512), strict=True):
        sae = saelab.load(str(tmp_path / "multi" / hook))
        assert sae.cfg.hook == hook and sae.cfg.d_in == d and sae.cfg.n_latents == 2 * d
        assert (tmp_path / "multi" / hook / "eval.json").exists()
    assert cap.out.count("Trained topk SAE") == 2
    run = saelab.load(tmp_path / "multi")  # the run directory: {hook: SAE}, beside the checkpoint
    assert {h: s.cfg.hook for h, s in run.items()} == {h: h for h in hooks}



def test_bad_kernel_backend_setting_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_KERNEL_BACKEND", "gpu-please")
    code, cap = run_cli(["info", "zoo:pystdlib-4l"], monkeypatch, capsys)
    assert code == 2 and "SAELAB_KERNEL_BACKEND='gpu-please' is not one of" in cap.err
    assert cap.err.count("\n") == 1
