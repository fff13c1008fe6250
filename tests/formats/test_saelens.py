"""SAELens interop: export, import and `saelab.load` detection, checked against SAELens's maths
written densely here from its files (sae_lens/saes/{topk,jumprelu,batchtopk,standard}_sae.py, 6.54)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab
from saelab.errors import SaelabError
from saelab.formats.saelens import export_saelens, import_saelens
from saelab.sae import SAE, SAEConfig

D, N, K = 16, 40, 4
HOOK, MODEL = "blocks.1.hook_resid_post", "zoo:pystdlib-4l"
LENS_META = {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}


def random_sae(allocator: str = "topk", seed: int = 0, processing: str = "folded") -> SAE:
    """Random float32 weights (decoder rows not unit norm); thresholds set where the allocator has
    them (jumprelu's include negative ones, where SAELens's relu(pre) * (pre > theta) still
    zeroes pre in (theta, 0]). In eval() mode, as `saelab.load` returns a dictionary."""
    torch.manual_seed(seed)
    k = 0 if allocator in ("relu", "jumprelu") else K  # no budget
    cfg = SAEConfig(d_in=D, n_latents=N, k=k, allocator=allocator, beta=0.5, capacity="zipf",
                    zipf_alpha=0.7, hook=HOOK, model=MODEL, processing=processing, saelab_version="test")
    sae = SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        if cfg.has_thresholds:  # mutual_choice's boundary is one number for every latent
            sae.threshold.copy_({"mutual_choice": torch.full((N,), 2.0),
                                 "jumprelu": 4 * torch.rand(N) - 1}.get(allocator, 4 * torch.rand(N)))
    return sae.eval()


def dense_code(sae: SAE, x: torch.Tensor, batch: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode_dense(x, batch=batch)


def saelens_reference(cfg: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's inference encode/decode from its cfg.json and weights: (z, x_hat)."""
    pre = (x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]
    norm = w["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(pre.shape[1])
    pre = pre * norm
    if cfg["architecture"] == "standard":
        z = pre.relu()
    elif cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:  # jumprelu; a batchtopk checkpoint's inference form is JumpReLU at its topk_threshold
        if "log_threshold" in w:  # older JumpReLU checkpoints
            threshold = w["log_threshold"].exp()
        else:
            threshold = w["threshold"] if "threshold" in w else w["topk_threshold"].float()
        z = pre.relu() * (pre > threshold)
    return z, (z / norm) @ w["W_dec"] + w["b_dec"]


def write_saelens(path, architecture: str | None, cfg: dict | None = None, extra: dict | None = None):
    """A hand-written SAELens dictionary directory (architecture None: neither that key nor
    metadata, as before SAELens 6); returns its (cfg, weights)."""
    torch.manual_seed(1)
    w = {"W_enc": torch.randn(D, N), "b_enc": 0.1 * torch.randn(N), "W_dec": torch.randn(N, D),
         "b_dec": torch.randn(D), **(extra or {})}
    c = {"architecture": architecture, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
         "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
         "metadata": LENS_META, **(cfg or {})}
    if architecture is None:
        c = {key: value for key, value in c.items() if key not in ("architecture", "metadata")}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(c))
    return c, w


@pytest.mark.parametrize("allocator", ["topk", "gradient_topk", "mutual_choice", "feature_choice", "relu",
                                       "jumprelu", "matryoshka"])
def test_round_trip_is_identical(tmp_path, allocator):
    sae = random_sae(allocator)
    out = export_saelens(sae, tmp_path / "lens")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = saelab.load(str(out))
    assert back.cfg == sae.cfg
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = torch.randn(32, D)
    with torch.no_grad():
        for a, b in zip(sae.encode(x), back.encode(x), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(sae(x), back(x))


@pytest.mark.parametrize("allocator", ["topk", "mutual_choice", "feature_choice", "relu", "jumprelu",
                                       "matryoshka"])
def test_exported_files_follow_saelens_maths(tmp_path, allocator):
    sae = random_sae(allocator)
    out = export_saelens(sae, tmp_path / "lens", context_size=128)
    cfg, w = json.loads((out / "cfg.json").read_text()), load_file(str(out / "sae_weights.safetensors"))
    arch = {"topk": "topk", "relu": "standard"}.get(allocator, "jumprelu")
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (arch, D, N, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["model_name"]) == (HOOK, MODEL)
    assert cfg["metadata"]["context_size"] == 128
    assert (cfg.get("k"), cfg["metadata"].get("training_architecture")) == {
        "topk": (K, None), "mutual_choice": (None, "batchtopk"),
        "matryoshka": (None, "matryoshka_batchtopk")}.get(allocator, (None, None))
    if allocator == "matryoshka":  # as SAELens's MatryoshkaBatchTopK records its levels
        assert cfg["metadata"]["training_architecture_details"] == {"k": K, "matryoshka_widths": [2, 10, N]}
    shapes = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
    shapes |= {"threshold": (N,)} if arch == "jumprelu" else {}
    assert {k: tuple(v.shape) for k, v in w.items()} == shapes
    x = torch.randn(64, D)
    z, x_hat = saelens_reference(cfg, w, x)
    torch.testing.assert_close(dense_code(sae, x), z)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat)


@pytest.mark.parametrize(("architecture", "cfg", "extra", "allocator"), [
    ("standard", {}, None, "relu"),
    ("jumprelu", {}, {"threshold": 2 * torch.rand(N) - 0.5}, "jumprelu"),
    ("jumprelu", {}, {"log_threshold": torch.randn(N)}, "jumprelu"),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": False}, None, "topk"),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}, None, "topk"),
    ("batchtopk", {"k": float(K), "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01},
     {"topk_threshold": torch.tensor(3.0, dtype=torch.float64)}, "mutual_choice"),
    ("jumprelu", {"metadata": LENS_META | {"training_architecture": "batchtopk",
                                           "training_architecture_details": {"k": 4.0}}},
     {"threshold": torch.full((N,), 3.0)}, "mutual_choice"),
], ids=["standard", "jumprelu", "jumprelu-log-threshold", "topk", "topk-rescaled-no-bdec-input",
        "batchtopk-checkpoint", "batchtopk-as-jumprelu"])
def test_import_handwritten_saelens_dir(tmp_path, architecture, cfg, extra, allocator):
    c, w = write_saelens(tmp_path / "lens", architecture, cfg, extra)
    sae = saelab.load(str(tmp_path / "lens"))
    k = 0 if allocator in ("relu", "jumprelu") else K
    assert (sae.cfg.allocator, sae.cfg.k, sae.cfg.d_in, sae.cfg.n_latents) == (allocator, k, D, N)
    assert (sae.cfg.hook, sae.cfg.model) == ("blocks.3.hook_resid_pre", "gpt2")
    x = torch.randn(32, D)
    z, x_hat = saelens_reference(c, w, x)
    torch.testing.assert_close(dense_code(sae, x), z)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat)
    if allocator == "mutual_choice":  # batch mode is SAELens's BatchTopK: relu, then top k*B of the batch
        pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
        if c.get("rescale_acts_by_decoder_norm"):
            pre = pre * w["W_dec"].norm(dim=-1)
        top = pre.flatten().topk(K * x.shape[0])
        z_batch = torch.zeros(pre.numel()).scatter(0, top.indices, top.values).view_as(pre)
        torch.testing.assert_close(dense_code(sae, x, batch=True), z_batch)


# a cfg.json as SAELens wrote it before 6.0: hook at the top level, a boolean normalisation flag
PRE_6 = {"hook_point": "blocks.3.hook_resid_pre", "model_name": "gpt2", "normalize_activations": False,
         "sae_lens_training_version": "3.13.0"}
PRE_6_CASES = {"standard": ({}, {"architecture": "standard"}, "relu"),
               "topk": ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}},
                        {"architecture": "topk", "k": K}, "topk")}


@pytest.mark.parametrize("case", PRE_6_CASES)
def test_import_pre_6_saelens_dir(tmp_path, case):
    cfg, as_6, allocator = PRE_6_CASES[case]
    c, w = write_saelens(tmp_path / "lens", None, PRE_6 | cfg, {"scaling_factor": torch.ones(N)})
    sae = saelab.load(tmp_path / "lens")
    assert (sae.cfg.allocator, sae.cfg.hook, sae.cfg.model) == (allocator, "blocks.3.hook_resid_pre", "gpt2")
    x = torch.randn(32, D)
    z, x_hat = saelens_reference(c | as_6, w, x)
    torch.testing.assert_close(dense_code(sae, x), z)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat)


def test_import_errors_are_clear(tmp_path):
    c, _ = write_saelens(tmp_path / "a", "topk", {"k": K})
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(SaelabError, match="sae_weights.safetensors is missing"):
        saelab.load(str(tmp_path / "a"))  # cfg.json alone still reads as SAELens (d_sae)
    write_saelens(tmp_path / "b", "topk", {"k": K})
    (tmp_path / "b" / "cfg.json").unlink()
    with pytest.raises(SaelabError, match="cfg.json is missing"):
        saelab.load(str(tmp_path / "b"))
    cases = {
        "gated": ("gated", {}, None, "architecture 'gated' has no saelab equivalent"),
        "matching-pursuit": ("matching_pursuit", {}, None, "'matching_pursuit' has no saelab equivalent"),
        "transcoder": ("jumprelu_transcoder", {"d_out": D}, {"threshold": torch.zeros(N)},
                       "transcoder names no hook_name_out"),  # imported when it names one
        "jumprelu-no-threshold": ("jumprelu", {}, None, r"holds .* but .* implies"),
        "fine-tuned-scale": (None, PRE_6, {"scaling_factor": torch.full((N,), 2.0)},
                             "fine-tuned scaling_factor"),
        "pre-6-normalised": (None, PRE_6 | {"normalize_activations": True}, None,
                             "normalize_activations='expected_average_only_in' is not supported"),
        "normalised": ("topk", {"k": K, "normalize_activations": "expected_average_only_in"}, None,
                       "normalize_activations='expected_average_only_in' is not supported"),
        "shapes": ("topk", {"k": K, "d_sae": N + 1}, None, r"holds .* but .* implies"),
        "fractional-k": ("batchtopk", {"k": 4.5}, {"topk_threshold": torch.tensor(1.0)}, "whole number"),
        "no-threshold": ("batchtopk", {"k": 4.0}, None, "topk_threshold"),
    }
    for name, (arch, cfg, extra, message) in cases.items():
        write_saelens(tmp_path / name, arch, cfg, extra)
        with pytest.raises(SaelabError, match=message):
            import_saelens(tmp_path / name)
    w = tmp_path / "gated" / "sae_weights.safetensors"
    (tmp_path / "gated" / "cfg.json").write_text(json.dumps(c))
    w.write_bytes(w.read_bytes()[:40])
    with pytest.raises(SaelabError, match="truncated or corrupt"):
        import_saelens(tmp_path / "gated")


def test_export_errors_are_clear(tmp_path):
    untrained = SAE(SAEConfig(d_in=D, n_latents=N, k=K, allocator="mutual_choice"))
    with pytest.raises(SaelabError, match="no inference thresholds"):
        export_saelens(untrained, tmp_path / "x")
    export_saelens(random_sae(), tmp_path / "y")
    with pytest.raises(SaelabError, match="is not empty"):
        export_saelens(random_sae(seed=1), tmp_path / "y")
    export_saelens(random_sae(seed=1), tmp_path / "y", overwrite=True)
    assert not list((tmp_path / "y").glob("*.tmp"))


def test_offline_hub_id_is_a_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read once when huggingface_hub is imported
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaelabError, match="pass a local dictionary directory") as e:
        saelab.load("hf:someone/sae-release/layer_3")
    assert "'someone/sae-release/layer_3'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SaelabError, match="no dictionary directory 'someone/sae-release'; for the "
                       "Hugging Face hub write hf:"):
        saelab.load("someone/sae-release")


def test_export_cli_roundtrip(tmp_path, monkeypatch, capsys):
    import sys

    from saelab.cli.app import main

    sae = SAE(SAEConfig(d_in=8, n_latents=16, k=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    sae.save(tmp_path / "d")
    for fmt, dest in (("saelens", "sl"), ("saelab", "back")):
        src = tmp_path / ("d" if fmt == "saelens" else "sl")
        argv = ["saelab", "export", str(src), str(tmp_path / dest), "--format", fmt]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            main()
        except SystemExit as e:
            assert e.code == 0
    back = saelab.load(str(tmp_path / "back"))
    for a, b in zip(sae.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "sl" / "sae_weights.safetensors").exists()
