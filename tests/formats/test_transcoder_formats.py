"""Transcoders through SAELens's and sparsify's on-disk forms (without the peer packages: their
checks against sae-lens and sparsify themselves are in test_saelens_peer.py and
test_sparsify_peer.py): round trips, what each file holds, and the refusals."""

import json

import pytest
import torch

import saelab
from saelab.errors import SaelabError
from saelab.formats.export import ExportConfig, export
from saelab.formats.saelens import export_saelens
from saelab.formats.sparsify import export_sparsify, transcoder_hooks_from_hookpoint
from saelab.models import TL_MAJOR
from saelab.sae import SAE, SAEConfig

D, D_OUT, N, K = 16, 24, 40, 4
IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
MLP_IN = "blocks.1.mlp.hook_in"  # what sparsify's layers.1.mlp reads: ln_2's output, after its affine map


def random_transcoder(allocator: str = "topk", skip: bool = False, d_out: int = D_OUT,
                      processing: str = "folded", hooks: tuple[str, str] = (IN, OUT)) -> SAE:
    """Random float32 weights, decoder rows not unit norm; thresholds where the kind has them."""
    torch.manual_seed(0)
    k = 0 if allocator in ("relu", "jumprelu") else K
    sae = SAE(SAEConfig(d_in=D, n_latents=N, k=k, allocator=allocator, hook=hooks[0], target_hook=hooks[1],
                        d_out=d_out, skip=skip, model="zoo:pystdlib-4l", processing=processing))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        if sae.cfg.has_thresholds:
            sae.threshold.copy_(torch.rand(N))
    return sae.eval()


def assert_same(a: SAE, b: SAE) -> None:
    x = torch.randn(32, D)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_dense(x), b.encode_dense(x))
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize(("allocator", "skip", "arch"), [
    ("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"), ("mutual_choice", True, "jumprelu_skip_transcoder"),
])
def test_saelens_round_trip(tmp_path, allocator, skip, arch):
    sae = random_transcoder(allocator, skip)
    out = export_saelens(sae, tmp_path / "lens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (arch, D_OUT, False)
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (IN, OUT)
    back = saelab.load(out)
    assert back.cfg == sae.cfg
    assert_same(sae, back)


def test_saelens_import_without_saelab_metadata(tmp_path):
    """A SAELens-written transcoder (no metadata["saelab"]) imports from its own fields alone."""
    sae = random_transcoder("relu", skip=True)
    out = export_saelens(sae, tmp_path / "lens")
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["metadata"]["saelab"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    back = saelab.load(out)
    got = (back.cfg.allocator, back.cfg.target_hook, back.cfg.d_out, back.cfg.skip)
    assert got == ("relu", OUT, D_OUT, True)
    assert_same(sae, back)
    del cfg["metadata"]["hook_name_out"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaelabError, match="names no hook_name_out"):
        saelab.load(out)


def test_topk_transcoders_have_no_saelens_form(tmp_path):
    with pytest.raises(SaelabError, match="SAELens has no topk transcoder"):
        export(_saved(tmp_path, random_transcoder("topk")), tmp_path / "lens")
    assert not (tmp_path / "lens").exists()


def _saved(tmp_path, sae: SAE):
    return sae.save(tmp_path / "saelab")


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_round_trip(tmp_path, skip):
    sae = random_transcoder("topk", skip, d_out=D, processing="raw", hooks=(MLP_IN, OUT))
    out = export_sparsify(sae, tmp_path / "layers.1.mlp")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["transcode"], cfg["skip_connection"]) == (True, skip)
    back = saelab.load(out)
    assert back.cfg == sae.cfg
    assert_same(sae, back)
    # metadata naming the target but not the input: the input comes from the hookpoint
    del cfg["saelab"]["hook"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    assert saelab.load(out).cfg.hook == MLP_IN
    # without saelab's metadata the hooks come from the hookpoint
    del cfg["saelab"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    back = saelab.load(out)
    assert (back.cfg.hook, back.cfg.target_hook, back.cfg.skip) == (MLP_IN, OUT, skip)
    assert_same(sae, back)


def test_sparsify_refusals(tmp_path):
    with pytest.raises(SaelabError, match="maps width 16 to 24"):
        export_sparsify(random_transcoder("topk", processing="raw", hooks=(MLP_IN, OUT)), tmp_path / "a")
    with pytest.raises(SaelabError, match="not TopK"):
        export_sparsify(random_transcoder("relu", d_out=D, processing="raw"), tmp_path / "b")
    # sparsify would read the MLP's input (after ln_2's affine map), not ln2.hook_normalized; no
    # hookpoint joins two layers
    for hooks in ((IN, OUT), ("blocks.0.mlp.hook_in", OUT), ("blocks.1.hook_resid_pre", OUT)):
        with pytest.raises(SaelabError, match="is no such pair"):
            export_sparsify(random_transcoder("topk", d_out=D, processing="raw", hooks=hooks), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    out = export_sparsify(random_transcoder("topk", d_out=D, processing="raw", hooks=(MLP_IN, OUT)),
                          tmp_path / "layers.1.attn")
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["saelab"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaelabError, match="hookpoint 'layers.1.attn', whose hooks saelab cannot tell"):
        saelab.load(out)


def test_transcoder_hookpoints():
    assert transcoder_hooks_from_hookpoint("h.3") == ("blocks.3.hook_resid_pre", "blocks.3.hook_resid_post")
    mlp = ("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out")
    assert transcoder_hooks_from_hookpoint("layers.2.mlp") == mlp
    assert transcoder_hooks_from_hookpoint("layers.2.self_attn") is None


@pytest.mark.parametrize("fmt", ["saelab", "saelens"])
def test_export_command_keeps_the_transcoder(tmp_path, fmt):
    sae = random_transcoder("relu", skip=True)
    export(_saved(tmp_path, sae), tmp_path / "out", ExportConfig(format=fmt))
    back = saelab.load(tmp_path / "out")
    assert back.cfg.target_hook == OUT and back.cfg.skip
    assert_same(sae, back)


@pytest.mark.skipif(TL_MAJOR < 4, reason="transformer-lens 3.x has no hook at the MLP module's input")
def test_sparsify_hookpoints_read_what_sparsify_hooks():
    """A sparsify transcoder at layers.N.mlp / h.N reads its module's input and predicts its
    output; the hooks its import records give exactly those on a raw model."""
    from transformers import AutoModel

    from saelab.models import load_model
    from saelab.zoo import model_dir

    spec = "zoo:pystdlib-4l"
    hf = AutoModel.from_pretrained(model_dir(spec.removeprefix("zoo:"))).eval()
    seen = {}
    def grab(point):
        def hook(module, args, out):
            seen[point] = (args[0], out[0] if isinstance(out, tuple) else out)
        return hook

    for point in ("h.1.mlp", "h.2"):
        hf.get_submodule(point).register_forward_hook(grab(point))
    tokens = torch.randint(1, 256, (2, 12))
    with torch.no_grad():
        hf(tokens)
    model = load_model(spec, processing="raw")
    for point, (inp, out) in seen.items():
        hook, target = transcoder_hooks_from_hookpoint(point)
        acts = model.activations(tokens, [hook, target])
        torch.testing.assert_close(acts[hook], inp, atol=1e-5, rtol=1e-5, msg=point)
        torch.testing.assert_close(acts[target], out, atol=1e-5, rtol=1e-5, msg=point)
