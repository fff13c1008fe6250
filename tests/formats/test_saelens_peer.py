"""saelab <-> SAELens checked against sae-lens itself. sae-lens needs transformer-lens 3.x, so this
runs only where it imports (the side venv of benchmarks/saelens_crosscheck.py)."""

import pytest
import torch

import saelab
from saelab.formats.saelens import export_saelens

sae_lens = pytest.importorskip("sae_lens")

from test_saelens import PRE_6, PRE_6_CASES, D, K, N, dense_code, random_sae, write_saelens  # noqa: E402


def assert_same_codes(sae, lens) -> None:
    """sae-lens's own encode and decode equal saelab's on random inputs (and some latent fires)."""
    x = torch.randn(64, D)
    with torch.no_grad():
        z = lens.encode(x)
        assert (z != 0).any()
        torch.testing.assert_close(dense_code(sae, x), z)
        torch.testing.assert_close(sae(x), lens.decode(z))


@pytest.mark.parametrize(("allocator", "lens_class"), [
    ("topk", "TopKSAE"), ("gradient_topk", "TopKSAE"),
    ("mutual_choice", "JumpReLUSAE"), ("feature_choice", "JumpReLUSAE"),
    ("relu", "StandardSAE"), ("jumprelu", "JumpReLUSAE"), ("matryoshka", "JumpReLUSAE"),
])
def test_sae_lens_loads_saelab_exports(tmp_path, allocator, lens_class):
    sae = random_sae(allocator)
    lens = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "lens")))
    assert type(lens).__name__ == lens_class
    assert (lens.cfg.metadata.hook_name, lens.cfg.metadata.model_name) == (sae.cfg.hook, sae.cfg.model)
    assert_same_codes(sae, lens)


def _random(lens):
    """Random weights with decoder rows far from unit norm, so rescale_acts_by_decoder_norm bites."""
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn_like(p))
    return lens


def test_saelab_imports_what_sae_lens_saves(tmp_path):
    """TopK (rescale_acts_by_decoder_norm, SAELens's training default), BatchTopK, standard (ReLU)
    and JumpReLU (random thresholds, some negative), each as an inference save and as a training
    checkpoint."""
    torch.manual_seed(0)
    topk = _random(sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)))
    batch = _random(sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)))
    batch.topk_threshold.fill_(2.0)
    standard = _random(sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=D, d_sae=N)))
    jump = _random(sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(d_in=D, d_sae=N)))
    assert topk.cfg.rescale_acts_by_decoder_norm and batch.cfg.rescale_acts_by_decoder_norm
    assert (jump.threshold < 0).any() and (jump.threshold > 0).any()
    for name, lens in {"topk": topk, "batchtopk": batch, "standard": standard, "jumprelu": jump}.items():
        lens.save_inference_model(tmp_path / name)  # SAELens saves BatchTopK as JumpReLU
        lens.save_model(tmp_path / f"{name}-checkpoint")
    # SAELens's inference classes, as it loads these saves; a JumpReLU's differs from its training
    # form (pre * (pre > theta), no relu) where a threshold is negative, and saelab follows it
    inference = {name: sae_lens.SAE.load_from_disk(str(tmp_path / name))
                 for name in ("batchtopk", "jumprelu")}
    assert {type(lens).__name__ for lens in inference.values()} == {"JumpReLUSAE"}
    x = torch.randn(64, D)
    refs = {"topk": (topk, "topk", K), "batchtopk": (inference["batchtopk"], "mutual_choice", K),
            "standard": (standard, "relu", 0), "jumprelu": (inference["jumprelu"], "jumprelu", 0)}
    refs |= {f"{name}-checkpoint": ref for name, ref in refs.items()}
    with torch.no_grad():
        for name, (lens, allocator, k) in refs.items():
            sae = saelab.load(str(tmp_path / name))
            assert (sae.cfg.allocator, sae.cfg.k) == (allocator, k), name
            z = lens.encode(x)
            assert (z != 0).any()
            torch.testing.assert_close(dense_code(sae, x), z, msg=name)
            torch.testing.assert_close(sae(x), lens.decode(z), msg=name)
        # batch mode is BatchTopK itself (the training SAE's encode), not its threshold form
        sae = saelab.load(str(tmp_path / "batchtopk-checkpoint"))
        z = batch.encode(x)
        torch.testing.assert_close(dense_code(sae, x, batch=True), z)
        torch.testing.assert_close(sae.decode(*sae.encode(x, batch=True)), batch.decode(z))


@pytest.mark.parametrize("case", PRE_6_CASES)
def test_saelab_reads_pre_6_saves_as_sae_lens_does(tmp_path, case):
    """sae-lens 6 converts a cfg.json written before 6.0 when it loads it; saelab reads it alike."""
    cfg, _, allocator = PRE_6_CASES[case]
    write_saelens(tmp_path / case, None, PRE_6 | cfg, {"scaling_factor": torch.ones(N)})
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / case))
    sae = saelab.load(tmp_path / case)
    assert type(lens).__name__ == {"relu": "StandardSAE", "topk": "TopKSAE"}[allocator]
    assert (sae.cfg.allocator, sae.cfg.hook) == (allocator, lens.cfg.metadata.hook_name)
    assert_same_codes(sae, lens)


@pytest.mark.parametrize("processing", ["folded", "centred", "raw"])
def test_sae_lens_model_kwargs_give_the_activations_saelab_records(tmp_path, processing):
    """SAELens loads a dictionary's model as HookedTransformer.from_pretrained_no_processing(
    **metadata.model_from_pretrained_kwargs) (that refuses local directories, so its defaults are
    read from its signature and applied as it applies them); for each export that model's
    activations equal those of saelab's model loaded with the dictionary's processing."""
    import inspect

    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saelab.models import load_model, resolve_spec

    model, hooks = "zoo:pystdlib-4l", ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    out = export_saelens(random_sae(processing=processing), tmp_path / "lens")
    kwargs = sae_lens.SAE.load_from_disk(str(out)).cfg.metadata.model_from_pretrained_kwargs
    signature = inspect.signature(HookedTransformer.from_pretrained_no_processing).parameters
    flags = {f: kwargs.get(f, signature[f].default)
             for f in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")}
    name = resolve_spec(model)
    cfg = loading.get_pretrained_model_config(name, fold_ln=flags["fold_ln"])
    lens_model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(name))
    lens_model.load_and_process_state_dict(
        loading.get_pretrained_state_dict(name, cfg, hf_model=AutoModelForCausalLM.from_pretrained(name)),
        **flags)
    tokens = torch.randint(0, 256, (2, 16))
    _, cache = lens_model.run_with_cache(tokens, names_filter=hooks)
    ours = load_model(model, processing=saelab.load(out).cfg.processing).activations(tokens, hooks)
    for hook in hooks:
        torch.testing.assert_close(ours[hook], cache[hook].flatten(2), atol=1e-5, rtol=1e-5, msg=hook)


@pytest.mark.parametrize(("allocator", "skip", "lens_class"), [
    ("relu", False, "Transcoder"), ("relu", True, "SkipTranscoder"),
    ("jumprelu", False, "JumpReLUTranscoder"), ("mutual_choice", True, "JumpReLUSkipTranscoder"),
])
def test_transcoders_both_ways(tmp_path, allocator, skip, lens_class):
    """saelab's transcoders load in sae-lens as its own transcoder classes with equal codes and
    outputs (forward: the skip included), and sae-lens's saves of them import back equal."""
    from test_transcoder_formats import D_OUT, OUT, D, random_transcoder

    sae = random_transcoder(allocator, skip)
    lens = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "lens")))
    assert type(lens).__name__ == lens_class
    assert (lens.cfg.d_out, lens.cfg.metadata.hook_name_out) == (D_OUT, OUT)
    x = torch.randn(64, D)
    with torch.no_grad():
        z = lens.encode(x)
        assert (z != 0).any()
        torch.testing.assert_close(dense_code(sae, x), z)
        torch.testing.assert_close(sae(x), lens(x))
        lens.save_model(tmp_path / "saved")  # sae-lens's own save of it
        back = saelab.load(tmp_path / "saved")
        assert (back.cfg.target_hook, back.cfg.skip, back.cfg.d_out) == (OUT, skip, D_OUT)
        torch.testing.assert_close(back(x), lens(x))


@pytest.mark.parametrize("to_input", [False, True])
def test_jumprelu_training_step_equals_sae_lens(to_input):
    """One training step's loss and gradients on the same batch and weights: SAELens's
    JumpReLUTrainingSAE ("step" sparsity, DeepMind's and Anthropic's straight-through forms)
    against saelab's jumprelu. saelab's reconstruction term is FVU; times sum||x - mean||^2 / B it
    is SAELens's MSE (summed over d, mean over tokens), and the L0 terms are equal."""
    from sae_lens.saes.sae import TrainStepInput

    from saelab import allocators
    from saelab.allocators import Learned
    from saelab.training.losses import fvu

    eps, lam = 0.4, 0.05
    sae = random_sae("jumprelu").train()
    x = torch.randn(256, D)
    theta = sae.pre_acts(x).quantile(0.8, dim=0).clamp_min(0.05)
    lens = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=N, jumprelu_bandwidth=eps, l0_coefficient=lam, jumprelu_ste_to_input=to_input))
    with torch.no_grad():
        for name, value in {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec,
                            "b_dec": sae.b_dec, "threshold": theta}.items():
            getattr(lens, name).copy_(value)
    out = lens.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l0": lam},
                                                    dead_neuron_mask=None, n_training_steps=0,
                                                    is_logging_step=False))
    out.loss.backward()

    kind = allocators.get("jumprelu")
    learned = Learned(theta.clone().requires_grad_(True), eps, to_input)
    pre = sae.pre_acts(x)
    sel, vals = kind.train_code(sae, x, pre, None, learned)
    mse = fvu(x, sae.decode(sel.idx, vals)) * (x - x.mean(0)).pow(2).sum() / x.shape[0]
    l0 = kind.penalty(sae, x, pre, sel, vals, None, learned)
    (mse + lam * l0).backward()

    torch.testing.assert_close(mse, out.losses["mse_loss"])
    torch.testing.assert_close(lam * l0, out.losses["l0_loss"])
    assert (learned.theta.grad != 0).sum() > N // 2  # many thresholds have pairs in the band
    for ours, theirs in [(sae.W_enc.grad, lens.W_enc.grad.T), (sae.b_enc.grad, lens.b_enc.grad),
                         (sae.W_dec.grad, lens.W_dec.grad), (sae.b_dec.grad, lens.b_dec.grad),
                         (learned.theta.grad, lens.threshold.grad)]:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
