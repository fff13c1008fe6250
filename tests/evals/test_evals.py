"""Evals against hand-computed or independently computed values (zoo model, few tokens)."""

import importlib
import json

import numpy as np
import pytest
import torch

from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals import evaluate, format_summary, reconstruction_stats, write_report
from saelab.evals.latents import LatentStats
from saelab.evals.reconstruction import ReconstructionStats
from saelab.sae import SAE, SAEConfig

RESID = "blocks.2.hook_resid_post"
DATA = TokenData(split="heldout", context_length=64)
TOKENS = 400


def _sae(hook, d=128, n=256, k=8, seed=0, model="zoo:pystdlib-4l"):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, hook=hook, model=model))
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec)
    return sae


def _identity_sae(hook, d=128):
    """An exact SAE: latents +e_i and -e_i, k = d; relu keeps the signed part, decode is exact."""
    sae = _sae(hook, d=d, n=2 * d, k=d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


@pytest.mark.parametrize("hook", [RESID, "blocks.1.attn.hook_z"])
def test_perfect_reconstruction_recovers_everything(zoo_model, hook):
    """(B, T, heads, d_head) hooks are flattened for the SAE and reshaped back when spliced."""
    r = evaluate(_identity_sae(hook), tokens=TOKENS, model=zoo_model, data=DATA)
    assert r["fvu"] == pytest.approx(0, abs=1e-12)
    assert r["explained_variance"] == pytest.approx(1, abs=1e-12)
    assert r["cosine_similarity"] == pytest.approx(1, abs=1e-9)
    assert r["ce_sae"] == r["ce_clean"]
    assert r["ce_loss_recovered"] == 1
    assert r["kl_sae"] == 0 and r["kl_div_score"] == 1
    assert r["ce_zero"] > r["ce_clean"] + 0.01 and r["ce_mean"] > r["ce_clean"]


def test_zero_reconstruction_is_zero_ablation(zoo_model):
    sae = _sae(RESID)
    with torch.no_grad():
        sae.W_dec.zero_()
    r = evaluate(sae, tokens=TOKENS, model=zoo_model, data=DATA)
    assert r["ce_sae"] == r["ce_zero"]
    assert r["ce_loss_recovered"] == 0
    assert r["kl_sae"] == r["kl_zero"] > 0
    assert r["cosine_similarity"] == 0


def _kept_and_predicted(rows):
    """Independent masks: token 256 is the zoo model's BOS = EOS = pad."""
    keep = rows != 256
    return keep, keep[:, :-1] & keep[:, 1:]


@pytest.fixture(scope="module")
def random_report(zoo_model):
    return evaluate(_sae(RESID), tokens=TOKENS, model=zoo_model, data=DATA)


def test_clean_loss_matches_huggingface_model(zoo_model, random_report):
    from transformers import AutoModelForCausalLM

    from saelab.models import resolve_spec

    r = random_report
    rows = heldout_rows(zoo_model.tokenizer, DATA, TOKENS)
    keep, pred = _kept_and_predicted(rows)
    assert r["tokens"] == int(keep.sum()) >= TOKENS and r["rows"] == rows.shape[0]
    assert r["predicted_positions"] == int(pred.sum())
    hf = AutoModelForCausalLM.from_pretrained(resolve_spec(zoo_model.spec)).eval()
    with torch.no_grad():
        logits = hf(rows).logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][pred], rows[:, 1:][pred])
    assert r["ce_clean"] == pytest.approx(ce.item(), abs=2e-4)


def test_ablation_losses_match_direct_hooks(zoo_model, random_report):
    """Zero and mean ablation at non-BOS positions, recomputed with plain transformer-lens hooks."""
    r = random_report
    rows = heldout_rows(zoo_model.tokenizer, DATA, TOKENS)
    keep, pred = _kept_and_predicted(rows)
    acts = zoo_model.activations(rows, [RESID])[RESID]
    mean = acts[keep].double().mean(0).float()

    def run(value):
        def hook_fn(x, hook):
            x = x.clone()
            x[keep] = value
            return x

        logits = zoo_model.model.run_with_hooks(rows, fwd_hooks=[(RESID, hook_fn)], return_type="logits")
        return logits[:, :-1][pred].double().log_softmax(-1)

    with torch.no_grad():
        clean = zoo_model.model(rows, return_type="logits")[:, :-1][pred].double().log_softmax(-1)
        zero, mean_abl = run(0.0), run(mean)
    targets = rows[:, 1:][pred]
    nll = lambda lp: -lp.gather(1, targets[:, None]).mean().item()  # noqa: E731
    assert r["ce_clean"] == pytest.approx(nll(clean), abs=1e-5)
    assert r["ce_zero"] == pytest.approx(nll(zero), abs=1e-5)
    assert r["ce_mean"] == pytest.approx(nll(mean_abl), abs=1e-5)
    kl_zero = (clean.exp() * (clean - zero)).sum(-1).mean().item()
    assert r["kl_zero"] == pytest.approx(kl_zero, rel=1e-4)


def _crafted_set():
    """Chunks far from zero with different means, and errors larger where tokens sit near the mean."""
    g = torch.Generator().manual_seed(0)
    chunks, hats = [], []
    for offset in (1000.0, 1003.0, 997.0):
        x = offset + torch.randn(50, 6, generator=g, dtype=torch.float64)
        x[0] = x[1:].mean(0) + 1e-3  # a token almost at the mean: its per-token ratio explodes
        hats.append(x + 1.5 * torch.randn(50, 6, generator=g, dtype=torch.float64))
        chunks.append(x)
    return [c.float() for c in chunks], [h.float() for h in hats]


def test_explained_variance_is_over_the_whole_set():
    chunks, hats = _crafted_set()
    x, x_hat = np.concatenate(chunks).astype(np.float64), np.concatenate(hats).astype(np.float64)
    err = ((x - x_hat) ** 2).sum()
    correct = 1 - err / ((x - x.mean(0)) ** 2).sum()
    about_zero = 1 - err / (x**2).sum()
    per_token = 1 - np.mean(((x - x_hat) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1))
    per_chunk_mean = 1 - err / sum(((c.double().numpy() - c.double().numpy().mean(0)) ** 2).sum()
                                   for c in chunks)
    stats = ReconstructionStats()
    for c, h in zip(chunks, hats, strict=True):
        stats.update(c, h)
    r = stats.result()
    assert r["explained_variance"] == pytest.approx(correct, rel=1e-12, abs=1e-12)
    assert r["fvu"] == pytest.approx(1 - correct, rel=1e-10)
    for wrong in (about_zero, per_token, per_chunk_mean):
        assert abs(wrong - correct) > 0.1
    assert r["mse"] == pytest.approx(err / x.size, rel=1e-12)
    cos = (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert r["cosine_similarity"] == pytest.approx(cos.mean(), rel=1e-12)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-13)


def test_reconstruction_stats_matches_numpy():
    sae = _sae(None, d=16, n=40, k=4)
    x = 5 + torch.randn(300, 16)
    r = reconstruction_stats(sae, x, chunk=64)
    with torch.no_grad():
        x_hat = sae(x).double().numpy()
    xn = x.double().numpy()
    ev = 1 - ((xn - x_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert set(r) == {"tokens", "fvu", "explained_variance", "mse", "l0", "dead_frac", "rare_frac",
                      "dense_frac_10pct"}
    assert r["explained_variance"] == pytest.approx(ev, rel=1e-9) and r["tokens"] == 300
    assert r["l0"] == pytest.approx(4)


def test_dead_rare_and_dense_latents_on_a_hand_built_pattern():
    """100 tokens, 6 latents: fires on 100, 11, 10, 1, 2, 0 tokens; unused slots carry 0."""
    fires = [100, 11, 10, 1, 2, 0]
    idx = torch.full((100, 3), 5)  # latent 5 sits in unused slots (value 0): never active
    vals = torch.zeros(100, 3)
    idx[:, 0], vals[:, 0] = 0, 1.0
    idx[:11, 1], vals[:11, 1] = 1, 0.5
    idx[11:21, 1], vals[11:21, 1] = 2, 0.5
    idx[21, 1], vals[21, 1] = 3, 2.0
    idx[:2, 2], vals[:2, 2] = 4, 0.1
    stats = LatentStats(6)
    stats.update(idx[:60], vals[:60])
    stats.update(idx[60:], vals[60:])
    r = stats.result()
    assert r["dead_latents"] == 1 and r["dead_frac"] == pytest.approx(1 / 6)
    assert r["rare_latents"] == 2 and r["rare_frac"] == pytest.approx(2 / 6)  # 1 and 2; 10 is not rare
    assert r["dense_latents_10pct"] == 2  # 100 and 11 tokens; exactly 10% is not more than 10%
    assert r["dense_latents_1pct"] == 4  # also 10 and 2; exactly 1% is not more than 1%
    assert r["latent_density"] == [f / 100 for f in fires]
    assert r["l0"] == pytest.approx(sum(fires) / 100)
    assert r["l0_histogram"] == [0, 78, 20, 2]  # tokens with 1, 2 and 3 active latents


def test_report_from_dictionary_directory(zoo_model, tmp_path, monkeypatch):
    """cfg.json alone names model and hook; the model loader is stubbed to the loaded zoo model."""
    heldout = importlib.import_module("saelab.data.heldout")
    loaded = []
    monkeypatch.setattr(heldout, "load_model",
                        lambda spec, device, processing: loaded.append(spec) or zoo_model)
    path = _sae(RESID, k=4).save(tmp_path / "sae")
    r = evaluate(str(path), tokens=TOKENS, data=DATA)
    assert loaded == ["zoo:pystdlib-4l"] and r["dictionary"] == str(path) and r["hook"] == RESID
    assert len(r["latent_density"]) == 256 and sum(r["l0_histogram"]) == r["tokens"]
    paths = write_report(r, tmp_path / "out")
    assert [p.name for p in paths] == ["eval.json", "eval.md", "latent_density.png", "l0_histogram.png"]
    assert json.loads(paths[0].read_text()) == r
    assert "| CE loss recovered |" in paths[1].read_text()
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[2:])
    summary = format_summary(r)
    assert "CE loss recovered" in summary and f"never active in the {r['tokens']:,}-token window" in summary
    assert f"active on 1-9 of the {r['tokens']:,} tokens" in summary and "rare latents" in summary
    assert len(summary.splitlines()) <= 24


def test_bad_input_is_a_clear_error(zoo_model, tmp_path):
    with pytest.raises(SaelabError, match="names no hook"):
        evaluate(_sae(None), model=zoo_model)
    with pytest.raises(SaelabError, match="expects d_in=128, but blocks.1.mlp.hook_post"):
        evaluate(_sae("blocks.1.mlp.hook_post"), model=zoo_model)
    with pytest.raises(SaelabError, match="tokens and batch_rows must be positive"):
        evaluate(_sae(RESID), tokens=0, model=zoo_model)
    with pytest.raises(SaelabError, match="no dictionary directory"):
        evaluate(str(tmp_path / "nothing"))


def test_logits_probe_and_splice(zoo_model):
    tokens = torch.tensor([[256] + list(b"import os\n")])
    plain = zoo_model.model(tokens, return_type="logits")
    torch.testing.assert_close(zoo_model.logits(tokens), plain)
    seen = []
    probed = zoo_model.logits(tokens, {"blocks.0.attn.hook_z": lambda a: seen.append(a.shape) or a})
    assert seen == [(1, tokens.shape[1], 128)]
    torch.testing.assert_close(probed, plain)
    keep = positions_to_keep(tokens, zoo_model.tokenizer)
    assert not keep[0, 0] and keep[0, 1:].all()


def test_l0_histogram_grows_with_wider_batches():
    """Threshold-mode encoders return a different k_max per batch; the histogram keeps up."""
    stats = LatentStats(8)
    stats.update(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]))
    stats.update(torch.tensor([[2, 3, 4, 5]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    r = stats.result()
    assert r["l0_histogram"] == [0, 1, 0, 0, 1] and r["l0"] == 2.5 and r["dead_latents"] == 3
