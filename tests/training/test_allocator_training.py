"""Training every allocator end to end, gradient caches, and threshold-mode inference."""

import json

import pytest
import torch
from safetensors.torch import load_file

import saelab
from saelab.cli.pipeline import train_and_evaluate
from saelab.data.cache import CacheStream, build_cache
from saelab.data.heldout import heldout_activations
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.training import TrainConfig

HOOK = "blocks.1.hook_resid_post"
# lr pinned (Gao et al.'s rule at n = 256): 40 steps at the default rule's 2.3e-2 leave the
# thresholds of these tiny runs 12% off the batch L0 on held-out text, which the bounds here
# were not set for; benchmarks/allocators.py reports threshold-mode L0 at the tuned lrs.
SMALL = dict(hook=HOOK, n_latents=256, k=8, tokens=40_000, batch_size=1024, eval_tokens=4096,
             warmup_steps=5, lr=1.6e-3)


@pytest.fixture(scope="module")
def grad_cache(zoo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gcache")
    build_cache(zoo_model, TokenData(context_length=64), [HOOK], out, tokens=3000, batch_rows=8,
                shard_rows=1000, with_grads=True)
    return out


def test_grad_cache_stores_true_gradients(grad_cache, zoo_model):
    manifest = json.loads((grad_cache / "manifest.json").read_text())
    assert manifest["with_grads"] is True
    shard = load_file(str(grad_cache / "shard_00000.safetensors"))
    tokens = next(TokenData(context_length=64).batches(zoo_model.tokenizer, 8))
    ref = zoo_model.activations(tokens, [HOOK], with_grads=True)
    keep = tokens != 256
    m = min(int(keep.sum()), 1000)  # rows of the first batch that landed in the first shard
    torch.testing.assert_close(shard[HOOK][:m], ref[HOOK][keep][:m])
    torch.testing.assert_close(shard[f"{HOOK}:grad"][:m], ref[f"{HOOK}:grad"][keep][:m])
    x, g = next(iter(CacheStream(grad_cache, HOOK, 100, with_grads=True)))
    assert x.shape == g.shape == (100, 128)


def test_gradient_training_needs_a_gradient_cache(small_cache, tmp_path):
    with pytest.raises(SaelabError, match="has no gradients"):
        CacheStream(small_cache, HOOK, 10, with_grads=True)


def test_gradient_topk_trains_from_grad_cache(grad_cache, tmp_path):
    (r,) = train_and_evaluate(TrainConfig.of(cache=str(grad_cache), out=str(tmp_path / "g"),
                                             allocator="gradient_topk",
                                             **{**SMALL, "tokens": 12_000})).values()
    assert r.summary["heldout_fvu"] < 0.9
    assert saelab.load(str(tmp_path / "g")).cfg.allocator == "gradient_topk"


@pytest.mark.parametrize("allocator, extra", [
    ("feature_choice", {"capacity": "uniform"}),
    ("feature_choice", {}),
    ("mutual_choice", {"aux": "aux_zipf"}),
])
def test_batch_allocators_train_and_thresholds_agree(allocator, extra, small_cache, zoo_model, tmp_path):
    (r,) = train_and_evaluate(TrainConfig.of(cache=str(small_cache), out=str(tmp_path / "d"),
                                             allocator=allocator, **SMALL, **extra)).values()
    sae = saelab.load(str(tmp_path / "d"))
    assert sae.cfg.allocator == allocator and torch.isfinite(sae.threshold).all()
    assert r.summary["heldout_fvu"] < 0.6, r.summary
    x = heldout_activations(zoo_model, TokenData(split="heldout", context_length=64), HOOK, 4096)
    with torch.no_grad():
        codes = {}
        for mode in (True, False):
            idx, vals = sae.encode(x, batch=mode)
            codes[mode] = torch.zeros(x.shape[0], 256).scatter_add(1, idx, vals) > 0
    both = (codes[True] & codes[False]).sum().item()
    f1 = 2 * both / (codes[True].sum() + codes[False].sum()).item()
    l0_batch, l0_thr = codes[True].sum(1).float().mean(), codes[False].sum(1).float().mean()
    print(f"{allocator} {extra}: batch/threshold F1 {f1:.3f}, L0 {l0_batch:.2f} vs {l0_thr:.2f}")
    assert f1 > 0.75  # measured: 0.81 feature_choice, 0.87 zipf, 0.98 mutual_choice
    assert abs(l0_thr - l0_batch) / l0_batch < 0.1
    # a single token encodes on its own in threshold mode
    idx, vals = sae.encode(x[:1])
    assert idx.shape[0] == 1


@pytest.mark.parametrize("allocator, extra", [
    ("jumprelu", {}),
    ("matryoshka", {"matryoshka": "16,64"}),
])
def test_jumprelu_and_matryoshka_train_and_round_trip(allocator, extra, small_cache, tmp_path):
    """A short run of each: L0 near the target, a sane FVU, and the trained dictionary the same
    after saelab's save/load and after a SAELens export read back."""
    from saelab.formats.saelens import export_saelens

    (r,) = train_and_evaluate(TrainConfig.of(cache=str(small_cache), out=str(tmp_path / "d"),
                                             allocator=allocator, **{**SMALL, "tokens": 80_000},
                                             topk_warmup_steps=10, **extra)).values()
    assert r.summary["heldout_fvu"] < 0.6, r.summary  # measured: 0.12 jumprelu, 0.10 matryoshka
    assert 8 / 1.5 < r.summary["heldout_l0"] < 8 * 1.5, r.summary  # target 8; measured: 7.7, 8.5
    sae = saelab.load(str(tmp_path / "d"))
    assert sae.cfg.allocator == allocator and (sae.threshold > 0).all()
    assert sae.cfg.matryoshka == ([16, 64, 256] if extra else None)
    back = saelab.load(str(export_saelens(sae, tmp_path / "lens")))
    assert back.cfg == sae.cfg
    x = torch.randn(64, 128) * 3
    with torch.no_grad():
        assert torch.equal(sae.encode_dense(x), back.encode_dense(x))
        assert torch.equal(sae(x), back(x))
