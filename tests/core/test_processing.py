"""Activation processing: `load_model(..., processing=)` gives folded, centred or raw
activations (raw checked against transformers itself), dictionaries record the processing they
were trained on through save, SAELens and sparsify formats, caches and training, and splicing,
`latents` and `evaluate` refuse a dictionary on a model of another processing."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_saelens import LENS_META, K, random_sae, write_saelens  # tests/ is on sys.path
from test_sparsify import sparsify_reference, write_sparsify

import saelab
from saelab.cli.pipeline import train_and_evaluate
from saelab.data.activations import positions_to_keep
from saelab.data.cache import MANIFEST, Manifest, build_cache
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals import evaluate
from saelab.formats.saelens import export_saelens, import_saelens
from saelab.formats.sparsify import export_sparsify
from saelab.models import PROCESSINGS, load_model, resolve_spec
from saelab.sae import SAE, SAEConfig
from saelab.training import TrainConfig

MODEL = "zoo:pystdlib-4l"  # conftest's TEST_MODEL, which the zoo_model fixture loads folded
HOOK = "blocks.1.hook_resid_post"
DATA = TokenData(split="heldout", context_length=32)
FOLDED = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
          "fold_value_biases": True}  # over from_pretrained_no_processing's all-False defaults


@pytest.fixture(scope="module")
def models(zoo_model):
    return {"folded": zoo_model, **{p: load_model(MODEL, processing=p) for p in ("centred", "raw")}}


def model_sae(processing: str, seed: int = 0) -> SAE:
    """A random topk dictionary as wide as the test model's residual stream, at HOOK."""
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=128, n_latents=256, k=8, hook=HOOK, model=MODEL, processing=processing)
    return SAE(cfg).eval()


def test_raw_is_the_hugging_face_model_and_folded_its_centred_form(models):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(resolve_spec(MODEL)).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24))
    n = models["raw"].n_layers
    resid = [f"blocks.{layer}.hook_resid_post" for layer in range(n - 1)]  # HF's last one is after ln_f
    hooks = [*resid, "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"]
    acts = {p: m.activations(tokens, hooks) for p, m in models.items()}
    raw, folded, centred = acts["raw"], acts["folded"], acts["centred"]
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for layer, hook in enumerate(resid):
        torch.testing.assert_close(raw[hook], hidden[layer + 1], **tol)
    for hook in [*resid, "blocks.1.hook_mlp_out"]:  # folded and centred: minus each token's mean
        assert (folded[hook] - raw[hook]).abs().max() > 1e-2
        torch.testing.assert_close(folded[hook], raw[hook] - raw[hook].mean(-1, keepdim=True), **tol)
        torch.testing.assert_close(centred[hook], folded[hook], **tol)
    for p in ("folded", "centred"):  # the MLP's hidden layer is never changed
        torch.testing.assert_close(acts[p]["blocks.1.mlp.hook_post"], raw["blocks.1.mlp.hook_post"], **tol)
    # hook_z: folding moves the value bias into the output bias; centring alone leaves it
    torch.testing.assert_close(centred["blocks.1.attn.hook_z"], raw["blocks.1.attn.hook_z"], **tol)
    assert (folded["blocks.1.attn.hook_z"] - raw["blocks.1.attn.hook_z"]).abs().max() > 1e-2
    # logits differ by a per-token constant at most: the losses are the same
    logp = {p: m.logits(tokens).log_softmax(-1) for p, m in models.items()}
    for p in ("folded", "centred"):
        torch.testing.assert_close(logp[p], logp["raw"], atol=1e-4, rtol=1e-4)


def test_the_field_round_trips_and_defaults_to_folded(tmp_path):
    path = model_sae("raw").save(tmp_path / "raw")
    assert json.loads((path / "cfg.json").read_text())["processing"] == "raw"
    assert saelab.load(path).cfg.processing == "raw"
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["processing"]  # a cfg.json written before the field: saelab only folded then
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert saelab.load(path).cfg.processing == "folded"
    with pytest.raises(SaelabError, match="unknown activation processing 'centered'; use one of folded, "
                                          "centred, raw"):
        SAEConfig(d_in=4, n_latents=8, k=2, processing="centered")
    with pytest.raises(SaelabError, match="unknown activation processing"):
        load_model(MODEL, processing="none")


@pytest.mark.parametrize("processing", list(PROCESSINGS))
def test_saelens_export_records_the_model_kwargs_and_imports_back(tmp_path, processing):
    out = export_saelens(random_sae(processing=processing), tmp_path / "lens")
    cfg = json.loads((out / "cfg.json").read_text())
    kwargs = cfg["metadata"]["model_from_pretrained_kwargs"]
    assert kwargs == {"folded": FOLDED, "centred": {"center_writing_weights": True}, "raw": {}}[processing]
    assert import_saelens(out).cfg.processing == processing
    del cfg["metadata"]["saelab"]  # as a SAELens user's own save: the kwargs alone decide
    (out / "cfg.json").write_text(json.dumps(cfg))
    assert import_saelens(out).cfg.processing == processing


@pytest.mark.parametrize(("meta", "top", "expected"), [
    ({}, {}, "raw"),  # no kwargs: from_pretrained_no_processing, as SAELens 6 loads the model
    ({"model_from_pretrained_kwargs": {"center_writing_weights": False}}, {}, "raw"),  # its trainer's
    ({"model_from_pretrained_kwargs": {"center_writing_weights": True}}, {}, "centred"),
    ({"model_from_pretrained_kwargs": FOLDED}, {}, "folded"),
    ({"model_from_pretrained_kwargs": {**FOLDED, "center_unembed": False}}, {}, "folded"),
    ({"model_class_name": "AutoModelForCausalLM"}, {}, "raw"),
    (None, {"model_from_pretrained_kwargs": {"center_writing_weights": True}}, "centred"),
], ids=["default", "saelens-training-default", "centred", "folded", "unembed-ignored", "hf-model", "pre-6.0"])
def test_saelens_import_reads_the_processing_from_its_cfg(tmp_path, meta, top, expected):
    if meta is None:  # before SAELens 6: no metadata, kwargs at the top level
        write_saelens(tmp_path / "d", None, top)
    else:
        write_saelens(tmp_path / "d", "topk", {"k": K, "metadata": LENS_META | meta})
    assert saelab.load(tmp_path / "d").cfg.processing == expected


def test_saelens_import_refuses_processing_saelab_cannot_give(tmp_path):
    write_saelens(tmp_path / "d", "topk", {"k": K, "metadata": LENS_META | {
        "model_from_pretrained_kwargs": {"fold_ln": True}}})
    with pytest.raises(SaelabError, match="activations saelab cannot give") as e:
        saelab.load(tmp_path / "d")
    assert "\n" not in str(e.value)


def test_sparsify_dictionaries_are_raw_and_only_raw_ones_export(tmp_path):
    write_sparsify(tmp_path / "layers.1")
    assert saelab.load(tmp_path / "layers.1").cfg.processing == "raw"
    with pytest.raises(SaelabError, match="trained on folded activations, but sparsify runs dictionaries "
                                          "on the Hugging Face model's raw ones") as e:
        export_sparsify(random_sae(), tmp_path / "folded")
    assert "--processing raw" in str(e.value) and not (tmp_path / "folded").exists()
    out = export_sparsify(random_sae(processing="raw"), tmp_path / "raw")
    assert saelab.load(out).cfg.processing == "raw"
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["saelab"]["processing"]  # exported before the field: every saelab dictionary was folded
    (out / "cfg.json").write_text(json.dumps(cfg))
    assert saelab.load(out).cfg.processing == "folded"


def test_a_dictionary_on_a_model_of_another_processing_is_refused(models):
    raw, tokens = model_sae("raw"), torch.randint(0, 256, (2, 16))
    folded = models["folded"]
    calls = {
        "spliced": lambda: folded.spliced({HOOK: raw}).__enter__(),
        "run_with_saes": lambda: folded.run_with_saes(tokens, {HOOK: raw}),
        "latents": lambda: folded.latents(tokens, raw),
        "latents of a mapping": lambda: folded.latents(tokens, {HOOK: raw}),
        "evaluate": lambda: evaluate(raw, tokens=64, model=folded, data=DATA),
    }
    for name, call in calls.items():
        with pytest.raises(SaelabError, match=r"trained on raw activations, but model zoo:pystdlib-4l is "
                                              r"loaded folded; load it with load_model\('zoo:pystdlib-4l', "
                                              r"processing='raw'\)") as e:
            call()
        assert "\n" not in str(e.value), name
    with pytest.raises(SaelabError, match="trained on folded activations, but model .* is loaded raw"):
        models["raw"].latents(tokens, model_sae("folded"))
    # on its own processing it runs; plain functions (probes) carry no processing and always pass
    assert models["raw"].latents(tokens, raw).shape == (2, 16, 8)
    torch.testing.assert_close(folded.logits(tokens, {HOOK: lambda x: x}), folded.logits(tokens))


def test_a_sparsify_import_evaluates_on_the_raw_model(tmp_path):
    """A hand-written sparsify dictionary (no model in its cfg): `evaluate` with a model spec
    loads the model raw, and its FVU equals one computed from transformers' hidden states and
    sparsify's maths."""
    torch.manual_seed(3)
    d, n = 128, 256
    w = {"encoder.weight": torch.randn(n, d) / d**0.5, "encoder.bias": torch.zeros(n),
         "W_dec": torch.randn(n, d) / d**0.5, "b_dec": torch.zeros(d)}
    (tmp_path / "layers.1").mkdir()
    save_file(w, str(tmp_path / "layers.1" / "sae.safetensors"))
    cfg = {"activation": "topk", "num_latents": n, "k": 16, "d_in": d}
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps(cfg))

    report = evaluate(str(tmp_path / "layers.1"), tokens=200, model=MODEL, data=DATA)
    assert (report["processing"], report["hook"]) == ("raw", HOOK)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(resolve_spec(MODEL)).eval()
    tokenizer = load_model(MODEL, processing="raw").tokenizer
    rows = heldout_rows(tokenizer, DATA, 200)
    with torch.no_grad():
        x = hf(rows, output_hidden_states=True).hidden_states[2][positions_to_keep(rows, tokenizer)]
    x_hat = sparsify_reference(cfg, w, x)[1].double()
    x = x.double()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert report["tokens"] == x.shape[0]
    assert report["fvu"] == pytest.approx(fvu.item(), rel=1e-4)


def test_caches_and_training_carry_the_processing(models, tmp_path):
    cache = tmp_path / "cache"
    build_cache(models["raw"], TokenData(context_length=32), [HOOK], cache, tokens=1200, shard_rows=600)
    assert Manifest.read(cache).processing == "raw"
    small = dict(cache=str(cache), hook=HOOK, n_latents=256, k=8, tokens=1024, batch_size=256,
                 eval_tokens=128, warmup_steps=1)
    with pytest.raises(SaelabError, match=f"cache {cache} holds raw activations, not folded; drop "
                                          "--processing or build a cache with --processing folded"):
        train_and_evaluate(TrainConfig.of(out=str(tmp_path / "nope"), processing="folded", **small))
    assert not (tmp_path / "nope").exists()
    (result,) = train_and_evaluate(TrainConfig.of(out=str(tmp_path / "sae"), **small)).values()
    assert saelab.load(result.out).cfg.processing == "raw"
    assert evaluate(str(result.out), tokens=128, model=models["raw"], data=DATA)["processing"] == "raw"
    with pytest.raises(SaelabError, match="trained on raw activations"):
        evaluate(str(result.out), tokens=128, model=models["folded"], data=DATA)
    manifest = json.loads((cache / MANIFEST).read_text())
    del manifest["processing"]  # a cache built before the field: from a folded model
    (cache / MANIFEST).write_text(json.dumps(manifest))
    assert Manifest.read(cache).processing == "folded"
