"""saelab <-> sparsify checked against EleutherAI's sparsify itself (`pip install eai-sparsify`).
CI installs it in the transformer-lens 3.x side venv beside sae-lens and asserts it imports before
running this (.ci/run); where it is not installed this file is skipped."""

import os

import pytest
import torch

import saelab
from saelab.formats.sparsify import export_sparsify

# sparsify decodes with Triton whenever triton imports, which on a CPU-only machine fails; its
# own switch selects its eager (embedding_bag) decoder instead
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = pytest.importorskip("sparsify")

from test_saelens import D, K, N, dense_code, random_sae  # noqa: E402


def sparsify_code(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's own encode as a dense code, and its decode of it."""
    out = coder.encode(x)
    z = torch.zeros(x.shape[0], coder.num_latents).scatter(1, out.top_indices, out.top_acts)
    return z, coder.decode(out.top_acts, out.top_indices)


def random_coder(seed: int, **cfg) -> "sparsify.SparseCoder":
    """A sparsify SAE with random weights, biases included, decoder rows not unit norm."""
    torch.manual_seed(seed)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(**cfg))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p))
    return coder


@pytest.mark.parametrize("allocator", ["topk", "gradient_topk"])
def test_sparsify_loads_saelab_exports(tmp_path, allocator):
    sae = random_sae(allocator, processing="raw")  # only raw dictionaries export to sparsify
    coder = sparsify.SparseCoder.load_from_disk(export_sparsify(sae, tmp_path / "layers.1"))
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D, N, K)
    x = torch.randn(64, D)
    with torch.no_grad():
        z, x_hat = sparsify_code(coder, x)
        assert (z != 0).any()
        torch.testing.assert_close(dense_code(sae, x), z)
        torch.testing.assert_close(sae(x), x_hat)


def test_saelab_imports_what_sparsify_saves(tmp_path):
    """One dictionary sized by num_latents, one by expansion_factor, and a run directory of both
    laid out as sparsify's trainer does (one subdirectory per hookpoint)."""
    coders = {"h.1": random_coder(0, num_latents=N, k=K), "h.2.mlp": random_coder(1, expansion_factor=3, k=K)}
    for hookpoint, coder in coders.items():
        coder.save_to_disk(tmp_path / "run" / hookpoint)
    x = torch.randn(64, D)
    run = saelab.load(tmp_path / "run")
    assert set(run) == {"blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"}
    with torch.no_grad():
        for hookpoint, coder in coders.items():
            sae = saelab.load(tmp_path / "run" / hookpoint)
            assert (sae.cfg.allocator, sae.cfg.k, sae.cfg.n_latents) == ("topk", K, coder.num_latents)
            z, x_hat = sparsify_code(coder, x)
            assert (z != 0).any()
            for s in (sae, run[sae.cfg.hook]):
                torch.testing.assert_close(dense_code(s, x), z, msg=hookpoint)
                torch.testing.assert_close(s(x), x_hat, msg=hookpoint)


def test_saelab_loads_a_sparsify_training_run(tmp_path):
    """A real (short) sparsify training run on the zoo model, at a block output and an MLP output:
    saelab.load of the run directory gives, per hook, sparsify's own codes on the activations it
    trained on, and the hook names point where sparsify hooked. The imports are recorded raw: a
    raw saelab model reads exactly sparsify's activations and its `latents` are sparsify's own
    codes, while a folded one (whose activations are sparsify's minus their per-token mean) refuses
    them."""
    from datasets import Dataset
    from transformers import AutoModel

    from saelab.formats.sparsify import hook_from_hookpoint
    from saelab.models import load_model
    from saelab.zoo import DEFAULT_MODEL, model_dir

    hf = AutoModel.from_pretrained(model_dir(DEFAULT_MODEL.removeprefix("zoo:"))).eval()
    torch.manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(1, 256, (32, 16)).tolist()}).with_format("torch")
    cfg = sparsify.TrainConfig(sparsify.SaeConfig(expansion_factor=2, k=8), batch_size=8,
                               hookpoints=["h.1", "h.2.mlp"], log_to_wandb=False,
                               save_dir=str(tmp_path), run_name="run")
    sparsify.Trainer(cfg, data, hf).fit()
    coders = sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)
    saes = saelab.load(tmp_path / "run")
    assert set(saes) == {"blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"}
    assert {hook_from_hookpoint(h) for h in coders} == set(saes)

    tokens = torch.randint(1, 256, (4, 16))
    seen = {}

    def capture(hookpoint):
        def hook(module, args, out):
            seen[hookpoint] = out[0] if isinstance(out, tuple) else out
        return hook

    for hookpoint in coders:
        hf.get_submodule(hookpoint).register_forward_hook(capture(hookpoint))
    assert {sae.cfg.processing for sae in saes.values()} == {"raw"}
    model = load_model(DEFAULT_MODEL, processing="raw")
    ours = model.activations(tokens, list(saes))
    folded_model = load_model(DEFAULT_MODEL)
    folded = folded_model.activations(tokens, list(saes))
    with torch.no_grad():
        hf(tokens)
        for hookpoint, coder in coders.items():
            hook = hook_from_hookpoint(hookpoint)
            x = seen[hookpoint].reshape(-1, coder.d_in)
            z, x_hat = sparsify_code(coder, x)
            assert (z != 0).any()
            torch.testing.assert_close(dense_code(saes[hook], x), z, msg=hookpoint)
            torch.testing.assert_close(saes[hook](x), x_hat, msg=hookpoint)
            torch.testing.assert_close(ours[hook], seen[hookpoint], atol=1e-4, rtol=1e-4, msg=hookpoint)
            centered = seen[hookpoint] - seen[hookpoint].mean(-1, keepdim=True)
            torch.testing.assert_close(folded[hook], centered, atol=1e-4, rtol=1e-4, msg=hookpoint)
        # the run's {hook: SAE} goes straight into the raw model's splicing helpers, and its
        # latents are sparsify's codes of what sparsify hooked
        latents = model.latents(tokens, saes)
        for hookpoint, coder in coders.items():
            hook = hook_from_hookpoint(hookpoint)
            z = sparsify_code(coder, seen[hookpoint].reshape(-1, coder.d_in))[0]
            torch.testing.assert_close(latents[hook].to_dense().reshape(z.shape), z, atol=1e-5, rtol=1e-4)
        with pytest.raises(saelab.SaelabError,
                           match="trained on raw activations, but model .* is loaded folded"):
            folded_model.latents(tokens, saes)
        clean = model.logits(tokens)
        torch.testing.assert_close(model.run_with_saes(tokens, saes, error_term=True), clean)
        assert not torch.allclose(model.run_with_saes(tokens, saes), clean)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_both_ways(tmp_path, skip):
    """sparsify's transcoders (transcode, skip_connection) with random weights import with its own
    codes and outputs (its forward with the skip), and saelab's exports load in sparsify alike."""
    from test_transcoder_formats import random_transcoder

    coder = random_coder(0, num_latents=N, k=K, transcode=True, skip_connection=skip)
    coder.save_to_disk(tmp_path / "h.1.mlp")
    sae = saelab.load(tmp_path / "h.1.mlp")
    assert (sae.cfg.hook, sae.cfg.target_hook, sae.cfg.skip) == \
        ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", skip)
    x = torch.randn(64, D)
    with torch.no_grad():
        z, _ = sparsify_code(coder, x)
        assert (z != 0).any()
        torch.testing.assert_close(dense_code(sae, x), z)
        torch.testing.assert_close(sae(x), coder(x).sae_out)
        mine = random_transcoder("topk", skip, d_out=D, processing="raw",
                                 hooks=("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"))
        theirs = sparsify.SparseCoder.load_from_disk(export_sparsify(mine, tmp_path / "layers.1.mlp"))
        assert theirs.cfg.transcode and theirs.cfg.skip_connection == skip
        torch.testing.assert_close(dense_code(mine, x), sparsify_code(theirs, x)[0])
        torch.testing.assert_close(mine(x), theirs(x).sae_out)
