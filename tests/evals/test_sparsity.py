"""Activation sparsity: measure against an independent dense computation, hand-built cases,
the CLI contract, and bad input."""

import json
import shutil
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_end_to_end import run_cli
from torch.testing import assert_close

from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity import Sparsifier, format_summary, measure, mlp_hooks, run, sweep, write_report
from saelab.evals.sparsity.decode import Decoder, PredictedMLP, compare, synthetic
from saelab.evals.sparsity.emergence import checkpoint_dirs
from saelab.evals.sparsity.measure import SMOOTH_THRESHOLD, LayerStats, default_threshold
from saelab.evals.sparsity.modes import Calibration, stat_topk_threshold
from saelab.evals.sparsity.predictor import LayerPredictor, evaluate_predictors, mlp_weights, train_predictors
from saelab.kernels import SparseMLP, mask_code
from saelab.kernels.cost import MARGIN, CostModel
from saelab.models import HookedModel, load_model
from saelab.zoo import ZooRecipe, model_dir
from saelab.zoo.build import build, checkpoint_steps

DATA = TokenData(split="heldout", context_length=64)
TOKENS = 600


@pytest.fixture(scope="module")
def zoo_report(zoo_model):
    return measure(zoo_model, data=DATA, tokens=TOKENS, batch_rows=4)


def _dense_reference(model, threshold=0.0, tokens=TOKENS):
    """Per layer: (N, d_ff) activity of every non-BOS held-out position, straight from the model
    (threshold None: the activations themselves)."""
    rows = heldout_rows(model.tokenizer, DATA, tokens)
    keep = positions_to_keep(rows, model.tokenizer)
    hooks = [f"blocks.{i}.mlp.hook_post" for i in range(model.n_layers)]
    acts = model.activations(rows, hooks)
    return [acts[h][keep] if threshold is None else acts[h][keep].abs() > threshold for h in hooks]


def test_measure_matches_dense_reference(zoo_model, zoo_report):
    ref = _dense_reference(zoo_model)
    r = zoo_report
    assert r["tokens"] == ref[0].shape[0] >= TOKENS and r["threshold"] == 0.0
    for layer, act in zip(r["layers"], ref, strict=True):
        counts = act.sum(1).numpy()
        assert layer["density"] == pytest.approx(act.double().mean().item(), rel=1e-12)
        for q in (10, 50, 90):
            want = np.percentile(counts, q, method="inverted_cdf") / act.shape[1]
            assert layer["density_percentiles"][f"p{q}"] == want
        freq = act.double().mean(0)
        assert layer["dead_neurons"] == int((freq == 0).sum())
        assert layer["always_on_neurons"] == int((freq == 1).sum())
        assert np.allclose(layer["firing_frequency"], freq.numpy(), atol=1e-6)
        union = [layer["union_density"][s] for s in ("1", "8", "64")]
        assert union[0] == pytest.approx(layer["density"], rel=1e-12)  # a batch of one token
        assert union[0] <= union[1] <= union[2] <= 1
    total = sum(a.sum().item() for a in ref) / sum(a.numel() for a in ref)
    assert r["density"] == pytest.approx(total, rel=1e-12)
    assert r["flops_fraction_sparse_down"] == pytest.approx((1 + total) / 2)
    assert 0 < r["density"] < 0.5  # the zoo model's ReLU MLPs are lazy


def test_union_hand_computed():
    gen = torch.Generator().manual_seed(0)
    # every token fires the same 5 neurons: the union is 5 whatever the batch
    same = torch.zeros(1024, 100, dtype=torch.bool)
    same[:, :5] = True
    s = LayerStats(100, (1, 8, 64))
    s.update(same, gen)
    assert all(v == pytest.approx(0.05) for v in s.result()["union_density"].values())
    # token i fires neuron i alone: a batch of N distinct tokens fires N neurons
    one_hot = torch.eye(512, dtype=torch.bool)
    s = LayerStats(512, (1, 8, 64, 512))
    s.update(one_hot, gen)
    res = s.result()
    assert res["union_density"] == {"1": 1 / 512, "8": 8 / 512, "64": 64 / 512, "512": 1.0}
    assert res["union_groups"] == {"1": 512, "8": 64, "64": 8, "512": 1}
    assert res["dead_neurons"] == 0 and res["density_percentiles"]["p50"] == 1 / 512


def test_report_files_and_summary(zoo_report, tmp_path):
    paths = write_report(zoo_report, tmp_path)
    assert json.loads((tmp_path / "sparsity.json").read_text())["density"] == zoo_report["density"]
    assert {p.name for p in paths} >= {"sparsity.md", "density_per_layer.png", "union_vs_batch.png"}
    assert all(p.stat().st_size > 500 for p in paths)
    text = format_summary(zoo_report)
    assert "union 512" in text and f"{100 * zoo_report['layers'][2]['density']:.2f}%" in text


@pytest.fixture(scope="module")
def gelu_model(tmp_path_factory):
    """A tiny random GPT-2 with GELU MLPs (never exactly zero) and the zoo's byte tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gelu")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               n_inner=96, activation_function="gelu_new", bos_token_id=256,
                               eos_token_id=256)).save_pretrained(path)
    for f in model_dir("zoo:pystdlib-4l").glob("tokenizer*"):
        shutil.copy(f, path)
    return load_model(str(path))



@pytest.mark.parametrize(("act_fn", "exact"),
                         [("relu", True), ("relu2", True), ("gelu_new", False), ("silu", False)])
def test_default_threshold_is_zero_where_inactive_units_are_exactly_zero(act_fn, exact):
    from types import SimpleNamespace

    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    stub = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(act_fn=act_fn)))
    h = SUPPORTED_ACTIVATIONS[act_fn](torch.randn(4000))  # what transformer-lens applies
    assert bool((h == 0).float().mean() > 0.4) == exact  # about half the units exactly off, or none
    assert default_threshold(stub) == (0.0 if exact else SMOOTH_THRESHOLD)

def test_gelu_counts_magnitudes_above_threshold(gelu_model):
    r = measure(gelu_model, data=DATA, tokens=200, batch_rows=4)
    assert r["activation"].startswith("gelu") and r["threshold"] == 0.01
    ref = _dense_reference_gelu(gelu_model, 0.01)
    assert r["layers"][1]["density"] == pytest.approx(ref.double().mean().item(), rel=1e-12)
    exact = measure(gelu_model, data=DATA, tokens=200, batch_rows=4, threshold=0.0)
    assert exact["density"] > 0.99 > r["density"]  # smooth activations are almost never exactly 0


def test_gelu_new_mlp_weights_reproduce_the_model(gelu_model):
    rows = heldout_rows(gelu_model.tokenizer, DATA, 50)
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    acts = {h: a.flatten(0, 1) for h, a in gelu_model.activations(rows, hooks).items()}
    assert_close(mlp_weights(gelu_model, 1).dense(acts[hooks[0]]), acts[hooks[1]], rtol=1e-5, atol=1e-5)


def _dense_reference_gelu(model, threshold):
    rows = heldout_rows(model.tokenizer, DATA, 200)
    h = model.activations(rows, ["blocks.1.mlp.hook_post"])["blocks.1.mlp.hook_post"]
    return h[positions_to_keep(rows, model.tokenizer)].abs() > threshold


def test_model_without_mlp_hooks_is_one_line_error():
    attn_only = HookedModel("attn-only", SimpleNamespace(
        cfg=SimpleNamespace(n_layers=2), hook_dict={"blocks.0.hook_resid_post": None}), None)
    with pytest.raises(SaelabError, match="no hookable MLP hidden activation.*blocks.0.mlp.hook_post"):
        mlp_hooks(attn_only)
    for call in (lambda: measure(attn_only), lambda: run(attn_only)):
        with pytest.raises(SaelabError, match="no hookable MLP hidden activation"):
            call()


def test_cli_writes_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sp"
    code, cap = run_cli(["sparsity", "--tokens", "300", "--context-length", "64", "--out", str(out),
                         "--mode", "relu", "--mode", "topk", "--density", "0.05",
                         "--sweep-tokens", "200", "--calibration-tokens", "200",
                         "--predictor-tokens", "256"], monkeypatch, capsys)
    assert code == 0, cap.err
    r = json.loads((out / "sparsity.json").read_text())
    assert r["tokens"] >= 300 and len(r["layers"]) == 4
    assert "union 64" in cap.out and (out / "union_vs_batch.png").exists()
    assert [(m["mode"], m["target"]) for m in r["modes"]["runs"]] == [("relu", None), ("topk", 0.05)]
    assert (out / "loss_vs_density.png").stat().st_size > 1000 and "stat_topk" not in cap.out
    assert r["predictor"]["train_tokens"] >= 256 and "mass recall" in (out / "sparsity.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "0"], "tokens must be >= 1"),
    (["--threshold", "-1"], "threshold must be >= 0"),
    (["--model", "/nonexistent/model"], "not a Hugging Face model directory"),
])
def test_cli_bad_input(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sp"
    code, cap = run_cli(["sparsity", *args, "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not out.exists()


# --- sparsification modes -------------------------------------------------------------------

def test_topk_and_threshold_modes_hand_computed():
    h = torch.tensor([[[0.0, 3.0, -5.0, 1.0, 2.0]]])
    assert Sparsifier("topk", 0.4).apply(0, h).tolist() == [[[0.0, 3.0, -5.0, 0.0, 0.0]]]
    s = Sparsifier("cats", 0.5, (1.5, 2.5))
    assert s.apply(0, h).tolist() == [[[0.0, 3.0, -5.0, 0.0, 2.0]]]
    assert s.apply(1, h).tolist() == [[[0.0, 3.0, -5.0, 0.0, 0.0]]]
    assert Sparsifier("relu", None).apply(0, h) is h


def test_calibration_quantiles_hand_computed():
    values = torch.arange(1.0, 101.0)  # 1..100
    calib = Calibration([values, values * 10], tokens=1)
    assert calib.layer_threshold(0, 0.1) == 90.0  # 10 values (91..100) lie above it
    assert calib.layer_threshold(1, 0.1) == 900.0
    assert calib.layer_threshold(0, 1.0) == -1.0  # keep everything
    pooled = calib.global_threshold(0.25)  # 50 of 200 pooled values above: 110..1000
    assert sum(int((v > pooled).sum()) for v in calib.per_layer) == 50


def test_stat_topk_threshold_matches_normal_quantile():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 16384, generator=gen, dtype=torch.float64) * 2 + 0.5
    theta = stat_topk_threshold(pre, 0.1)
    want = pre.mean(-1) + pre.std(-1, correction=0) * NormalDist().inv_cdf(0.9)
    assert torch.allclose(theta[:, 0], want, rtol=1e-10)
    h = pre.relu()
    kept = Sparsifier("stat_topk", 0.1).apply(0, h, pre)
    assert (kept != 0).double().mean().item() == pytest.approx(0.1, abs=0.005)  # Gaussian: exact


@pytest.fixture(scope="module")
def zoo_sweep(zoo_model):
    return sweep(zoo_model, DATA, TokenData(split="train", context_length=64),
                 densities=(1.0, 0.1, 0.02), tokens=TOKENS, calibration_tokens=2000, batch_rows=4)


def test_sweep_on_zoo(zoo_sweep, zoo_report):
    runs = {(r["mode"], r["target"]): r for r in zoo_sweep["runs"]}
    assert zoo_sweep["calibration_tokens"] >= 2000
    # exact zeros change nothing and reach exactly the measured density (same rows)
    assert runs["relu", None]["delta_ce"] == 0 and runs["relu", None]["kl"] == 0
    assert runs["relu", None]["density"] == pytest.approx(zoo_report["density"], rel=1e-12)
    for mode in ("threshold", "cats", "topk", "stat_topk"):
        assert runs[mode, 1.0]["delta_ce"] == 0  # a target of 1 keeps every neuron
        assert runs[mode, 0.02]["density"] < runs[mode, 0.1]["density"] <= zoo_report["density"]
        assert runs[mode, 0.02]["delta_ce"] > runs[mode, 0.1]["delta_ce"] - 0.01
        assert runs[mode, 0.02]["kl"] > 0.01  # 2% of the neurons cost the model something
    assert runs["topk", 0.02]["density"] <= 0.02  # round(0.02 * 512) = 10 per token at most
    cats = runs["cats", 0.02]
    assert len(set(cats["thresholds"])) == 4 and cats["density"] == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(modes=("relu", "magic")), "unknown sparsification mode 'magic'"),
    (dict(densities=(0.1, 0.0)), r"target density 0.0 is outside \(0, 1\]"),
    (dict(densities=(1.5,)), r"target density 1.5 is outside \(0, 1\]"),
    (dict(target_recall=0.0), r"target_recall must be > 0 and <= 1, got 0.0"),
])
def test_sweep_bad_input(kwargs, message):
    with pytest.raises(SaelabError, match=message):  # checked before the model is even loaded
        run("zoo:not-a-model", **kwargs)


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "magic"], "unknown sparsification mode"),
    (["--density", "-0.1"], "target density -0.1 is outside (0, 1]"),
])
def test_cli_sweep_bad_input(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sp"
    code, cap = run_cli(["sparsity", *args, "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not out.exists()


# --- active-set predictor ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictors(zoo_model):
    return train_predictors(zoo_model, TokenData(split="train", context_length=64), tokens=2048,
                            epochs=8, batch=256, lr=1e-2, batch_rows=8)


def test_mlp_weights_reproduce_the_models_mlp(zoo_model):
    rows = heldout_rows(zoo_model.tokenizer, DATA, 100)
    hooks = ["blocks.2.ln2.hook_normalized", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out"]
    acts = {h: a.flatten(0, 1) for h, a in zoo_model.activations(rows, hooks).items()}
    mlp = mlp_weights(zoo_model, 2)
    assert_close(mlp.hidden(acts[hooks[0]]), acts[hooks[1]], rtol=1e-5, atol=1e-5)
    assert_close(mlp.sparse_down(acts[hooks[0]]), acts[hooks[2]], rtol=1e-5, atol=1e-5)


def test_predictor_on_zoo(zoo_model, predictors):
    preds, seen = predictors
    assert seen >= 2048 and len(preds) == 4 and preds[0].rank == 32
    r = evaluate_predictors(zoo_model, preds, DATA, tokens=TOKENS, batch_rows=4)
    for layer in r["layers"]:
        assert layer["recall"] > 0.8  # the cut was set for 95% recall on train tokens
        assert layer["precision"] > 1.5 * layer["true_density"]  # far better than guessing
        assert layer["true_density"] < layer["predicted_density"] < 0.8
    assert r["tokens"] >= TOKENS and 0 < r["density"] < r["flops_fraction"] < 1
    assert abs(r["delta_ce"]) < 0.2 and r["kl"] > 0  # some active neurons are missed


def test_at_recall_moves_the_cut_hand_computed():
    """Scores are x itself (A = I, B = I, c = 0); active train scores 1..5 kept sorted."""
    eye = torch.eye(5)
    pred = LayerPredictor(eye, eye, torch.zeros(5), 3.0, torch.arange(1.0, 6.0))
    x = torch.arange(1.0, 6.0).view(1, 5)
    assert pred.predict(x).tolist() == [[False, False, False, True, True]]
    assert pred.at_recall(1.0).predict(x).all()  # below the lowest active score
    assert pred.at_recall(0.6).predict(x).tolist() == [[False, True, True, True, True]]  # 40% quantile: 2
    assert pred.at_recall(0.2).cut == pytest.approx(4.0 - 1e-6)  # 80% quantile, lower: 4 (2 of 5 kept)
    assert pred.at_recall(1.0).A is pred.A  # the weights are shared, not copied
    with pytest.raises(ValueError, match="outside"):
        pred.at_recall(0.0)


def test_at_recall_on_zoo_raises_recall(zoo_model, predictors):
    """Higher target recall: at least as many units computed and at least the recall, held out."""
    preds = predictors[0]
    rows = heldout_rows(zoo_model.tokenizer, DATA, 200)
    hooks = ["blocks.2.ln2.hook_normalized", "blocks.2.mlp.hook_post"]
    acts = {h: a.flatten(0, 1) for h, a in zoo_model.activations(rows, hooks).items()}
    true = acts[hooks[1]] != 0
    recalls, sizes = [], []
    for target in (0.9, 0.99, 1.0):
        chosen = preds[2].at_recall(target).predict(acts[hooks[0]])
        recalls.append(float((chosen & true).sum() / true.sum()))
        sizes.append(int(chosen.sum()))
    assert recalls == sorted(recalls) and sizes == sorted(sizes) and recalls[-1] > 0.97
    assert preds[2].positives.numel() > 0 and bool((preds[2].positives.diff() >= 0).all())


def test_predicted_forward_is_what_the_splice_computes(zoo_model, predictors):
    """Only the predicted neurons computed by the kernel == the MLP with the others zeroed."""
    rows = heldout_rows(zoo_model.tokenizer, DATA, 100)
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post"]
    acts = {h: a.flatten(0, 1) for h, a in zoo_model.activations(rows, hooks).items()}
    x, h = acts[hooks[0]], acts[hooks[1]]
    mlp, chosen = mlp_weights(zoo_model, 1), predictors[0][1].predict(x)
    want = (h * chosen) @ mlp.W_out + mlp.b_out
    assert_close(mlp.active(x, *mask_code(chosen)), want, rtol=1e-5, atol=1e-5)
    assert_close(mlp.active(x[:1], *mask_code(chosen[:1])), want[:1], rtol=1e-5, atol=1e-5)


# --- emergence: checkpoints kept by zoo builds ----------------------------------------------------

def test_checkpoint_steps():
    assert checkpoint_steps(976, 4) == [0, 61, 122, 244, 488, 976]
    assert checkpoint_steps(3, 4) == [0, 1, 3]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    recipe = ZooRecipe("tiny", n_layer=2, d_model=16, n_head=2, d_mlp=48, context_length=32,
                       tokens=16 * 4 * 32, batch_size=4, checkpoints=2)
    return build(recipe, tmp_path_factory.mktemp("zoo") / "tiny", heldout_rows=8)


def test_build_keeps_loadable_checkpoints(tiny_build):
    dirs = checkpoint_dirs(str(tiny_build))
    assert [json.loads((d / "checkpoint.json").read_text())["step"] for d in dirs] == [0, 4, 8, 16]
    final = load_model(str(dirs[-1]))
    shipped = load_model(str(tiny_build))
    rows = torch.randint(0, 256, (2, 16))
    assert torch.equal(final.logits(rows), shipped.logits(rows))  # the last checkpoint is the model
    assert not torch.equal(load_model(str(dirs[0])).logits(rows), final.logits(rows))


def test_density_over_training(tiny_build, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sp"
    code, cap = run_cli(["sparsity", "--model", str(tiny_build), "--checkpoints", "--tokens", "200",
                         "--context-length", "32", "--checkpoint-tokens", "200", "--no-modes",
                         "--no-predictor", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, cap.err
    r = json.loads((out / "sparsity.json").read_text())
    assert [c["step"] for c in r["checkpoints"]] == [0, 4, 8, 16]
    assert r["checkpoints"][-1]["density"] == pytest.approx(r["density"], rel=1e-12)  # same rows
    assert (out / "density_vs_step.png").stat().st_size > 1000 and "tokens seen" in cap.out


def test_checkpoints_missing_is_one_line_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sp"
    code, cap = run_cli(["sparsity", "--checkpoints", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "has no training checkpoints" in cap.err and "saelab zoo build" in cap.err
    assert len(cap.err.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def silu_model(tmp_path_factory):
    """A tiny random GPT-2 with SiLU MLPs (negative inputs give small nonzero outputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("silu")
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               n_inner=96, activation_function="silu", bos_token_id=256,
                               eos_token_id=256)).save_pretrained(path)
    for f in model_dir("zoo:pystdlib-4l").glob("tokenizer*"):
        shutil.copy(f, path)
    return load_model(str(path))


def test_silu_counts_magnitudes_above_threshold(silu_model):
    r = measure(silu_model, data=DATA, tokens=200, batch_rows=4)
    assert r["activation"] == "silu" and r["threshold"] == 0.01
    h = _dense_reference(silu_model, None, tokens=200)[1]
    assert r["layers"][1]["density"] == pytest.approx((h.abs() > 0.01).double().mean().item(), rel=1e-12)
    assert (h != 0).double().mean() > 0.99 > r["density"]  # threshold 0 would call all active


def _namespace_model(act_fn, hooks):
    return HookedModel("m", SimpleNamespace(cfg=SimpleNamespace(n_layers=2, act_fn=act_fn),
                                            hook_dict=dict.fromkeys(hooks)), None)


@pytest.mark.parametrize(("act_fn", "threshold"), [("relu", 0.0), ("gelu", 0.01), ("gelu_new", 0.01),
                                                   ("silu", 0.01), ("solu_ln", 0.01)])
def test_only_relu_counts_exact_zeros(act_fn, threshold):
    hooks = [f"blocks.{i}.mlp.{h}" for i in range(2) for h in ("hook_post", "hook_mid")]
    assert default_threshold(_namespace_model(act_fn, hooks)) == threshold


def test_solu_is_read_before_its_layernorm():
    """SoLU-LN's hook_post follows a LayerNorm (dense); its h is hook_mid, or a one-line error."""
    both = [f"blocks.{i}.mlp.{h}" for i in range(2) for h in ("hook_post", "hook_mid")]
    assert mlp_hooks(_namespace_model("solu_ln", both)) == ["blocks.0.mlp.hook_mid", "blocks.1.mlp.hook_mid"]
    assert mlp_hooks(_namespace_model("gelu", both)) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    post_only = [f"blocks.{i}.mlp.hook_post" for i in range(2)]
    with pytest.raises(SaelabError, match="needs blocks.L.mlp.hook_mid"):
        mlp_hooks(_namespace_model("solu_ln", post_only))


def test_decoder_reproduces_the_models_logits(zoo_model):
    """The token-by-token decoder (KV cache, folded LayerNorms) against the hooked model's forward."""
    row = heldout_rows(zoo_model.tokenizer, DATA, 64)[0, :24]
    decoder = Decoder.of(zoo_model)
    caches = [[] for _ in decoder.attention]
    logits = torch.stack([decoder.step(int(t), p, caches, decoder.mlps) for p, t in enumerate(row.tolist())])
    assert_close(logits, zoo_model.logits(row.unsqueeze(0))[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("branch", ["never sparse", "sparse", "past break-even"])
def test_predicted_mlp_matches_float64_reference(zoo_model, predictors, monkeypatch, branch):
    """PredictedMLP computes the MLP with only the predicted units (dense float64 reference), or
    the dense MLP where its cost model says prediction does not pay."""
    mlp, pred = mlp_weights(zoo_model, 1), predictors[0][1]
    x = heldout_rows(zoo_model.tokenizer, DATA, 64)[:1, :8]
    x = zoo_model.activations(x, ["blocks.1.ln2.hook_normalized"])["blocks.1.ln2.hook_normalized"][0, 5:6]
    chosen = pred.predict(x)
    rows = int(chosen.sum())
    model = {"never sparse": CostModel(1.0, 1.0, 0.0), "sparse": CostModel(1.0, 0.0, 0.0),
             "past break-even": CostModel(1.0, 0.0, 1.0)}[branch]
    monkeypatch.setattr(PredictedMLP, "costs", lambda self, batch: model)
    W_in, b_in, W_out, b_out = (t.double() for t in (mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out))
    h = torch.relu(x.double() @ W_in + b_in)
    want = (h * chosen if branch == "sparse" else h) @ W_out + b_out
    assert 0 < rows < chosen.numel() and (h * chosen != h).any()  # the predictor changes something
    assert_close(PredictedMLP(mlp, pred)(x).double(), want, rtol=1e-5, atol=1e-5)


def test_predicted_mlp_counts_padded_rows_not_nonzeros(monkeypatch):
    """13 predicted units over 4 tokens, 40 rows once padded: past a break-even of 20, dense runs."""
    mlp = SparseMLP.of(torch.eye(16), None, torch.randn(16, 16), None)
    x, mask = torch.randn(4, 16), torch.zeros(4, 16, dtype=torch.bool)
    mask[0, :10] = mask[1:, 11] = True
    monkeypatch.setattr(PredictedMLP, "costs", lambda self, batch: CostModel(1.0, 0.0, MARGIN / 20))

    class Fixed:
        def predict(self, x):
            return mask[: x.shape[0]]

    calls = []
    monkeypatch.setattr(SparseMLP, "active", lambda self, *a: calls.append(1) or self.dense(a[0]))
    PredictedMLP(mlp, Fixed())(x)
    assert calls == []
    PredictedMLP(mlp, Fixed())(x[:1])  # the one 10-unit token alone: 10 rows, sparse
    assert calls == [1]


def test_synthetic_layers_and_compare():
    """Synthetic layers fire at their densities; exact sparse MLPs generate dense's tokens; the
    differ rate counts positions whose token differs from the first contender's."""
    decoder, mlps = synthetic(64, 512, [0.05, 0.3], seed=3)
    x = decoder._norm(torch.randn(4096, 64, generator=torch.Generator().manual_seed(4)))
    for mlp, want in zip(mlps, [0.05, 0.3], strict=True):
        assert (mlp.hidden(x) > 0).double().mean().item() == pytest.approx(want, abs=0.01)
    W_U = decoder.W_U.clone()
    shifted = [lambda x, m=m: m.dense(x) + 0.5 for m in mlps]  # a different model: tokens differ
    prompts = [[1, 2, 3], [4, 5]]
    got = compare(decoder, {"dense": [m.dense for m in mlps], "sparse": [m.sparse_down for m in mlps],
                            "shifted": shifted}, prompts, steps=6)
    assert got["contenders"]["sparse"]["token_differ_rate"] == 0
    assert got["contenders"]["sparse"]["identical_prompts"] == 1
    dense_out = [decoder.generate(p, 6, [m.dense for m in mlps])[0] for p in prompts]
    shift_out = [decoder.generate(p, 6, shifted)[0] for p in prompts]
    differ = sum(a != b for x, y in zip(dense_out, shift_out, strict=True)
                 for a, b in zip(x, y, strict=True)) / 12
    assert got["contenders"]["shifted"]["token_differ_rate"] == pytest.approx(differ)
    assert torch.equal(decoder.W_U, W_U)
