"""Node attribution and faithfulness on tiny models built so the answer is known to flow
through one head, one neuron or one latent.

- heads: every head but one has its output projection zeroed (test_circuits_patching's model);
- neurons: on top of that, every MLP output row but one is zeroed, and the one kept is the
  neuron whose activation the counterfactual changes most;
- latents: a dictionary at `ln_final.hook_normalized`, after which the logits are linear, so
  attribution must equal exact patching there; its decoder rows are +-q for an orthonormal
  basis q whose first vector is the unembedding's answer-minus-wrong direction, so only that
  pair of latents moves the logit difference.
"""

import math

import pytest
import torch
from test_circuits_patching import TASK, tiny_model

from saelab.errors import SaelabError, SaelabWarning
from saelab.evals.circuits.attribution import attribute, exact
from saelab.evals.circuits.bases import basis
from saelab.evals.circuits.discover import DiscoverConfig
from saelab.evals.circuits.faithfulness import faithfulness, sizes, trapezoid
from saelab.evals.circuits.patching import ground_truth
from saelab.evals.circuits.recovery import AttributionConfig, pearson, recover
from saelab.sae import SAE, SAEConfig
from saelab.tasks import Task, tokenize

LINEAR_HOOK = "ln_final.hook_normalized"
GRADIENT_METHODS = ("eap", "eap-ig")
# the task metric is computed in float32 from logits of tens: exact patching's differences of
# two such runs carry ~1e-4 of the largest effect in rounding (measured); nonlinear models put
# attribution a few percent off exact patching, far above this
FLOAT32_NOISE = 1e-3


@pytest.fixture(scope="module")
def head_model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("m") / "m", live={(1, 0)})


@pytest.fixture(scope="module")
def neuron_model(tmp_path_factory):
    """Live head 0.0 moves the first token's information; one layer-1 neuron alone writes."""
    from transformers import GPT2LMHeadModel

    from saelab.models import load_model

    path = tmp_path_factory.mktemp("n") / "m"
    first = tiny_model(path, live={(0, 0)})
    tok = tokenize(TASK, first.tokenizer)
    hook, rows = "blocks.1.mlp.hook_post", torch.arange(len(TASK))
    clean = first.activations(tok.pos, [hook])[hook][rows, tok.pos_len - 1]
    cf = first.activations(tok.cf, [hook])[hook][rows, tok.cf_len - 1]
    neuron = int((clean - cf).abs().mean(0).argmax())
    hf = GPT2LMHeadModel.from_pretrained(str(path))
    with torch.no_grad():
        for layer, block in enumerate(hf.transformer.h):
            keep = block.mlp.c_proj.weight[neuron].clone()
            block.mlp.c_proj.weight.zero_()  # Conv1D: one row per neuron
            if layer == 1:
                block.mlp.c_proj.weight[neuron] = keep
    hf.save_pretrained(str(path))
    return load_model(str(path)), neuron


def answer_direction(model, tok) -> torch.Tensor:
    w_u = model.model.W_U.detach()
    return w_u[:, tok.answer[0, 0]] - w_u[:, tok.wrong[0, 0]]


def pair_dictionary(model, tok) -> SAE:
    """+-q latents of an orthonormal q whose first row is the answer direction: exact
    reconstruction (relu of both signs), zero error, one latent pair carrying the task."""
    d = model.model.cfg.d_model
    u = answer_direction(model, tok)
    m = torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    m[:, 0] = u
    q, _ = torch.linalg.qr(m)
    q = q.T * torch.sign(q.T[0] @ u)  # rows orthonormal, row 0 along +u
    sae = SAE(SAEConfig(d_in=d, n_latents=2 * d, k=0, allocator="relu", hook=LINEAR_HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q, -q]))
        sae.W_dec.copy_(torch.cat([q, -q]))
    return sae.eval()


def partial_dictionary(model, n: int = 4) -> SAE:
    """A few random latents at the linear site: most of x is left to the error node."""
    d = model.model.cfg.d_model
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=0, allocator="relu", hook=LINEAR_HOOK))
    return sae.eval()


@pytest.mark.parametrize("method", ["patching", *GRADIENT_METHODS])
def test_every_method_ranks_the_live_head_first(head_model, method):
    scores = attribute(head_model, TASK, "heads", method, progress=False).scores
    assert int(scores.abs().argmax()) == 2  # head 1.0
    if method == "patching":
        assert torch.allclose(scores, torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-5)


def letters(n: int = 10) -> Task:
    """n copy-task rows with distinct prompts and counterfactuals (first letter changed)."""
    return Task("copy", tuple(chr(97 + i) + "bcd" for i in range(n)),
                tuple(chr(65 + i) + "bcd" for i in range(n)), (("e",),) * n, (("f",),) * n)


def test_codes_ranks_the_live_head_first(head_model):
    cfg = DiscoverConfig(train_prompts=10, epochs=100)
    a = attribute(head_model, letters(20), "heads", "codes", prompts=10, progress=False,
                  codes_config=cfg)
    assert a.scores[2] == a.scores.max() and a.forward_passes > 0
    assert a.backward_passes == 20  # relevance: one backward per training and scored prompt


def test_exact_patching_matches_the_ground_truth(head_model):
    tok = tokenize(TASK, head_model.tokenizer)
    ours = exact(head_model, tok, basis(head_model, "heads"), progress=False)
    gt = ground_truth(head_model, tok, edges=False, progress=False)
    assert torch.allclose(ours.scores, gt.node_effect, atol=1e-6)
    assert ours.forward_passes == gt.node_passes


@pytest.mark.parametrize("method", ["patching", *GRADIENT_METHODS])
def test_every_method_ranks_the_live_neuron_first(neuron_model, method):
    model, neuron = neuron_model
    d_mlp = model.model.cfg.d_mlp
    scores = attribute(model, TASK, "neurons", method, progress=False).scores
    assert int(scores.abs().argmax()) == d_mlp + neuron


@pytest.mark.parametrize("method", ["patching", *GRADIENT_METHODS])
def test_every_method_ranks_the_answer_latent_first(head_model, method):
    tok = tokenize(TASK, head_model.tokenizer)
    sae = pair_dictionary(head_model, tok)
    scores = attribute(head_model, TASK, sae, method, progress=False).scores
    d = head_model.model.cfg.d_model
    top = int(scores.abs().argmax())
    assert top in (0, d)  # +u or -u
    others = torch.ones_like(scores, dtype=torch.bool)
    others[[0, d]] = False
    assert scores[others].abs().max() < FLOAT32_NOISE * scores.abs().max()


@pytest.mark.parametrize("make", [pair_dictionary, "partial"])
def test_attribution_equals_exact_patching_where_the_model_is_linear(head_model, make):
    tok = tokenize(TASK, head_model.tokenizer)
    sae = pair_dictionary(head_model, tok) if make is pair_dictionary else partial_dictionary(head_model)
    b = basis(head_model, sae)
    for ablation, methods in (("counterfactual", GRADIENT_METHODS), ("mean", ("eap",))):
        truth = exact(head_model, tok, b, ablation, progress=False).scores
        for method in methods:
            got = attribute(head_model, tok, b, method, ablation=ablation).scores
            assert torch.allclose(got, truth, atol=FLOAT32_NOISE * truth.abs().max()), method


def test_error_node_carries_what_the_latents_miss(head_model):
    tok = tokenize(TASK, head_model.tokenizer)
    b = basis(head_model, partial_dictionary(head_model))
    assert b.names[-1] == f"{LINEAR_HOOK}/error" and b.errors.tolist() == [False] * 4 + [True]
    effect = exact(head_model, tok, b, progress=False).scores
    # linear after the site: patching every node is the counterfactual run, so effects sum to 1,
    # up to float32 rounding of terms that cancel (|effects| sum to ~8 here; the compiled gather
    # and embedding_bag round differently)
    assert math.isclose(float(effect.sum()), 1.0, abs_tol=1e-4 * float(effect.abs().sum()))
    assert abs(float(effect[-1])) > 0.5  # four random latents miss most of the answer direction
    faith = faithfulness(head_model, tok, b, effect, progress=False)
    first = faith["sizes"].index(1)
    assert faith["error_nodes_kept"][first] == 1  # ranked like any node, and it ranks first


def test_faithfulness_ends_and_areas(head_model):
    tok = tokenize(TASK, head_model.tokenizer)
    b = basis(head_model, "heads")
    for ablation in ("counterfactual", "mean"):
        scores = torch.tensor([0.0, 0.0, 1.0, 0.0])
        f = faithfulness(head_model, tok, b, scores, ablation, progress=False)
        assert f["sizes"] == [0, 1, 2, 3, 4]
        assert math.isclose(f["faithfulness"][0], 0.0, abs_tol=1e-6)
        assert math.isclose(f["faithfulness"][-1], 1.0, abs_tol=1e-6)
        assert math.isclose(f["completeness"][-1], 0.0, abs_tol=1e-6)
        # the live head alone is the whole effect: f = 1 from one node on
        assert all(math.isclose(v, 1.0, abs_tol=1e-5) for v in f["faithfulness"][1:])
        assert f["nodes_to_08"] == 1
        assert math.isclose(f["cpr"], 1 - 0.25 / 2, abs_tol=1e-5)  # trapezoid: ramp over the first quarter
        assert math.isclose(f["cmd"], 0.25 / 2, abs_tol=1e-5)
    worst = faithfulness(head_model, tok, b, torch.tensor([3.0, 2.0, 0.0, 1.0]), progress=False)
    assert worst["faithfulness"][1:4] == pytest.approx([0, 0, 0], abs=1e-5)  # live head kept last
    assert worst["nodes_to_08"] == 4


def test_sizes_and_trapezoid():
    assert sizes(32) == [0, 1, 2, 3, 4, 5, 7, 10, 16, 20, 32]
    assert sizes(1) == [0, 1]
    assert trapezoid([0, 0.5, 1], [0, 1, 1]) == 0.75
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 1]), torch.tensor([2.0, 4])) is None


def test_recover_report(head_model):
    with pytest.warns(SaelabWarning, match=r"right on only 0% of 5 .*floor 80%"):  # the tiny model
        r = recover(head_model, letters(), "heads", "eap-ig",
                    AttributionConfig(attr_prompts=5, faith_prompts=5), progress=False)
    assert r["node_roc_auc"] == 1.0 and r["pearson"] > 0.99
    assert r["truth"]["circuit"] == ["1.0"] and r["nodes_to_08"] == 1
    assert r["cost"]["forward_passes"] == 5 * (2 + 1 + 5) and r["cost"]["backward_passes"] == 5 * 5
    assert r["faithfulness"]["prompts"] == 5


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_input_is_one_line(head_model):
    tok = tokenize(TASK, head_model.tokenizer)
    d = head_model.model.cfg.d_model
    missing = SAE(SAEConfig(d_in=d, n_latents=4, k=1, hook="blocks.7.hook_resid_post"))
    with pytest.raises(SaelabError) as e:
        basis(head_model, missing)
    assert "blocks.7.hook_resid_post" in one_line(e) and "not a hook of model" in one_line(e)
    narrow = SAE(SAEConfig(d_in=d // 2, n_latents=4, k=1, hook="blocks.0.hook_resid_post"))
    with pytest.raises(SaelabError) as e:
        basis(head_model, narrow)
    assert f"d_in={d // 2}" in one_line(e) and f"{d} wide" in one_line(e)
    transcoder = SAE(SAEConfig(d_in=d, n_latents=4, k=1, hook="blocks.0.hook_resid_mid",
                               target_hook="blocks.0.hook_resid_post"))
    with pytest.raises(SaelabError) as e:
        basis(head_model, transcoder)
    assert "is a transcoder" in one_line(e) and "blocks.0.hook_resid_post" in one_line(e)
    same = Task("same", ("abcd",), ("abcd",), (("e",),), (("f",),))
    for method in ("patching", "eap", "eap-ig"):
        with pytest.raises(SaelabError) as e:
            attribute(head_model, same, "heads", method, progress=False)
        assert "does not do this task" in one_line(e)
    longer = Task("long", ("abcd",), ("abcde",), (("e",),), (("f",),))
    with pytest.raises(SaelabError) as e:
        attribute(head_model, longer, "heads", "eap")
    assert "differ in length" in one_line(e)
    with pytest.raises(SaelabError) as e:
        attribute(head_model, tok, "heads", "eap-ig", ablation="mean")
    assert "use ablation counterfactual" in one_line(e)
    with pytest.raises(SaelabError) as e:
        attribute(head_model, tok, "heads", "acdc")
    assert "unknown attribution method 'acdc'" in one_line(e)
    with pytest.raises(SaelabError) as e:
        attribute(head_model, TASK, "neurons", "codes")
    assert "heads only" in one_line(e)
    with pytest.raises(SaelabError) as e:
        attribute(head_model, tok, "neurons", "patching", max_nodes=10)
    assert "max_nodes (--max-patch-nodes) = 10" in one_line(e)
    with pytest.raises(SaelabError) as e:
        basis(head_model, "nowhere")
    assert "unknown basis 'nowhere'" in one_line(e)
    with pytest.raises(SaelabError) as e:
        AttributionConfig(node_ablation="zero")
    assert "unknown node ablation 'zero'" in one_line(e)


def test_codes_never_sees_the_faithfulness_prompts(head_model, monkeypatch):
    """Every token sequence the codes method's discover run tokenizes (SAE training and scored
    rows) is absent from the held-out prompts faithfulness is measured on."""
    import importlib

    disc = importlib.import_module("saelab.evals.circuits.discover")
    recovery = importlib.import_module("saelab.evals.circuits.recovery")

    def texts(tok) -> set[tuple[int, ...]]:
        return {tuple(ids[:n].tolist()) for seqs, lens in ((tok.pos, tok.pos_len), (tok.cf, tok.cf_len))
                for ids, n in zip(seqs, lens, strict=True)}

    seen: set = set()
    held: set = set()

    def spy_tokenize(*args, **kw):
        tok = tokenize(*args, **kw)
        seen.update(texts(tok))
        return tok

    def spy_faithfulness(model, tok, *args, **kw):
        held.update(texts(tok))
        return faithfulness(model, tok, *args, **kw)

    monkeypatch.setattr(disc, "tokenize", spy_tokenize)
    monkeypatch.setattr(recovery, "faithfulness", spy_faithfulness)
    recover(head_model, letters(20), "heads", "codes",
            AttributionConfig(attr_prompts=5, faith_prompts=5, completeness=False), progress=False,
            codes_config=DiscoverConfig(train_prompts=5, epochs=20))
    assert len(held) == 10 and len(seen) >= 20  # 5 + 5 held rows; 5 + 5 trial rows, the sample
    assert not seen & held


def test_eap_ig_with_a_dictionary_at_the_embedding(head_model):
    """A dictionary at hook_embed splits EAP-IG's interpolated embeddings (it used to crash).
    Its latents and error node cover the whole input the path interpolates, so by IG's
    completeness their scores sum to the runs' own metric drop (normalised: 1) as steps grow;
    a tiny model's steep spots make the Riemann sum converge slowly (5 steps: 4.3, 100: 1.12)."""
    d = head_model.model.cfg.d_model
    sae = SAE(SAEConfig(d_in=d, n_latents=8, k=0, allocator="relu", hook="hook_embed")).eval()
    few, many = (attribute(head_model, TASK, sae, "eap-ig", steps=s, progress=False).scores.sum()
                 for s in (5, 100))
    assert abs(many - 1) < 0.15 and abs(many - 1) < abs(few - 1)
