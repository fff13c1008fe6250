"""Edge-circuit faithfulness against hand-patched forward passes, in float64.

The model: three layers of two heads, every head live, so head-to-head paths carry part of the
task. References, each computed without `prune`:
- one cut edge: path patching's drop for that edge (`patching.ground_truth`, which adds the
  sender's change to the receiver layer's hook_resid_pre and splices the receiver's hook_z,
  without split inputs);
- every edge out of one head: that head's counterfactual change added to every later head's
  Q/K/V input by explicit hooks;
- every edge: each head's Q/K/V input rebuilt from the clean embeddings, the attention biases,
  this run's MLP outputs and every earlier head's counterfactual output.
"""

import pytest
import torch
from test_attribution import letters, one_line
from test_circuits_patching import TASK, tiny_model
from test_edges import metric

from saelab.errors import SaelabError
from saelab.evals.circuits.discover import CircuitsConfig
from saelab.evals.circuits.edge_faithfulness import edge_faithfulness, prune
from saelab.evals.circuits.edges import QKV, attribute_edges, factorized
from saelab.evals.circuits.patching import edge_mask, ground_truth, result_hook
from saelab.evals.circuits.recovery import AttributionConfig, pearson, recover
from saelab.evals.circuits.recovery_report import EDGE_PNG, write_report
from saelab.models import load_model
from saelab.tasks import tokenize

LAYERS, HEADS = 3, 2
N = LAYERS * HEADS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ef") / "m"
    live = {(layer, h) for layer in range(LAYERS) for h in range(HEADS)}
    tiny_model(path, live=live, n_layer=LAYERS, n_head=HEADS, seed=3)
    return load_model(str(path), dtype=torch.float64)


@pytest.fixture(scope="module")
def tok(model):
    return tokenize(TASK, model.tokenizer)


def counterfactual_results(model, tok) -> list[torch.Tensor]:
    """(P, T, H, d) per layer: every head's output on the counterfactual prompts."""
    hooks = [result_hook(layer) for layer in range(LAYERS)]
    with factorized(model):
        acts = model.activations(tok.cf, hooks)
    return [acts[h].unflatten(-1, (HEADS, -1)) for h in hooks]


def cut_metric(model, tok, cut: torch.Tensor) -> torch.Tensor:
    with factorized(model):
        return metric(model, tok, prune(counterfactual_results(model, tok), cut))


def qkv_inputs(fn) -> dict:
    """Splices replacing every head's Q/K/V input of layers 1.. with fn(layer, (P, T, H, d))."""
    def hook(layer):
        return lambda x: fn(layer, x.unflatten(-1, (HEADS, -1))).flatten(2)
    return {f"blocks.{layer}.hook_{x}_input": hook(layer) for layer in range(1, LAYERS) for x in QKV}


def test_no_cut_is_the_clean_run(model, tok):
    none = torch.zeros(N, N, dtype=torch.bool)
    assert not [h for h in prune(counterfactual_results(model, tok), none) if h.endswith("_input")]
    assert cut_metric(model, tok, none) == metric(model, tok, {})
    one = none.clone()
    one[0, HEADS] = True  # head 0.0 -> 1.0: only layer 1's inputs are spliced
    assert sorted(h for h in prune(counterfactual_results(model, tok), one) if h.endswith("_input")) == \
        sorted(f"blocks.1.hook_{x}_input" for x in QKV)


def test_one_cut_edge_drops_the_metric_by_its_path_patching_effect(model, tok):
    gt = ground_truth(model, tok, edges=True, progress=False)
    clean = metric(model, tok, {})
    total = clean - metric(model, tok, {h: (lambda x, v=v: v) for h, v in
                                        model.activations(tok.cf, ["hook_embed"]).items()})
    mask = edge_mask(LAYERS, HEADS)
    assert gt.edge_effect[mask].abs().max() > 1e-3  # the paths carry something
    for s, r in mask.nonzero().tolist():
        cut = torch.zeros(N, N, dtype=torch.bool)
        cut[s, r] = True
        drop = (clean - cut_metric(model, tok, cut)) / total
        # ground_truth's metric is float32 (its runs are float64): 1e-6 of the drop
        assert drop == pytest.approx(float(gt.edge_effect[s, r]), abs=1e-5), (s, r)


def test_cutting_every_edge_out_of_a_head_moves_only_later_heads_inputs(model, tok):
    cf = counterfactual_results(model, tok)
    with factorized(model):
        clean = model.activations(tok.pos, [result_hook(0)])[result_hook(0)].unflatten(-1, (HEADS, -1))
    change = cf[0][:, :, 1] - clean[:, :, 1]  # head 0.1
    with factorized(model):
        want = metric(model, tok, qkv_inputs(lambda layer, x: x + change[:, :, None]))
    cut = torch.zeros(N, N, dtype=torch.bool)
    cut[1] = edge_mask(LAYERS, HEADS)[1]
    got = cut_metric(model, tok, cut)
    assert got == pytest.approx(float(want), abs=1e-10)
    assert abs(got - metric(model, tok, {})) > 1e-3


def test_cutting_every_edge_rebuilds_each_input_from_counterfactual_heads(model, tok):
    cf = counterfactual_results(model, tok)
    tl = model.model
    embed = model.activations(tok.pos, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"]
    mlp: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(x):
            mlp[layer] = x
            return x
        return fn

    def rebuilt(layer, x):
        earlier = range(layer)
        value = embed + sum(tl.blocks[i].attn.b_O + mlp[i] + cf[i].sum(2) for i in earlier)
        return value[:, :, None].expand_as(x)

    splices = {**{f"blocks.{i}.hook_mlp_out": keep(i) for i in range(LAYERS)}, **qkv_inputs(rebuilt)}
    with factorized(model):
        want = metric(model, tok, splices)
    everything = edge_mask(LAYERS, HEADS)
    assert cut_metric(model, tok, everything) == pytest.approx(float(want), abs=1e-10)
    f = edge_faithfulness(model, tok, torch.rand(N, N), progress=False)
    assert f["m_empty"] == pytest.approx(float(want), abs=1e-4)  # task metric: float32, 5 digits


def test_edge_curve_ends_and_order(model, tok):
    scores = attribute_edges(model, tok, "eap").head_edges()
    f = edge_faithfulness(model, tok, scores, progress=False)
    assert f["edges"] == 8 + 4 and f["sizes"][0] == 0 and f["sizes"][-1] == 12
    assert f["faithfulness"][0] == 0 and f["faithfulness"][-1] == pytest.approx(1, abs=1e-9)
    assert f["completeness"][0] == pytest.approx(1, abs=1e-9) and f["completeness"][-1] == 0
    assert f["forward_passes"] == len(TASK) * (2 + 1 + 2 * len(f["sizes"]))
    # the one-edge circuit is the top |score| edge: f of it recomputed by hand
    top = int(scores.nan_to_num(0).abs().flatten().argmax())
    cut = edge_mask(LAYERS, HEADS).clone()
    cut.view(-1)[top] = False
    m = [cut_metric(model, tok, c) for c in (cut, edge_mask(LAYERS, HEADS))]
    want = (m[0] - m[1]) / (metric(model, tok, {}) - m[1])
    assert f["faithfulness"][1] == pytest.approx(float(want), abs=1e-4)


def test_recover_reports_edges(model, tmp_path):
    r = recover(model, letters(), "heads", "eap", AttributionConfig(attr_prompts=5, faith_prompts=5),
                progress=False)
    e = r["edges"]
    assert e["edges"] == 12 and len(e["scores"]) == 12 and e["method"] == "eap"
    assert e["cost"]["forward_passes"] == 5 * 3 and e["cost"]["backward_passes"] == 5
    assert e["faithfulness"]["prompts"] == 5 and e["faithfulness"]["faithfulness"][-1] == 1
    assert [abs(v) for _, v in e["top"]] == sorted((abs(v) for v in e["scores"].values()), reverse=True)
    # the truth is path patching of the scored prompts (the first 5 rows drawn with seed 0)
    from saelab.tasks import draw_distinct

    scored = tokenize(draw_distinct(letters(), 10, 0).subset(range(5)), model.tokenizer)
    gt = ground_truth(model, scored, edges=True, progress=False)
    mask = edge_mask(LAYERS, HEADS)
    assert list(e["truth"]["all"].values()) == pytest.approx(gt.edge_effect[mask].tolist(), abs=1e-6)
    values = torch.tensor(list(e["scores"].values()))
    assert e["pearson"] == pytest.approx(pearson(values, gt.edge_effect[mask]), abs=1e-4)
    assert 0 <= e["edge_roc_auc"] <= 1
    paths = write_report(r, tmp_path)
    assert (tmp_path / EDGE_PNG).stat().st_size > 1000 and len(paths) == 5
    assert "## Head-to-head edges" in (tmp_path / "circuits.md").read_text()
    assert "edge ROC AUC" in (tmp_path / "circuits.md").read_text()


def test_edges_only_where_they_exist(model):
    small = AttributionConfig(attr_prompts=5, faith_prompts=5, completeness=False)
    assert "edges" not in recover(model, letters(), "heads", "patching", small, progress=False)
    assert "edges" not in recover(model, letters(), "neurons", "eap", small, progress=False)
    off = AttributionConfig(attr_prompts=5, faith_prompts=5, attr_edges=False)
    assert "edges" not in recover(model, letters(), "heads", "eap", off, progress=False)


def test_edge_bad_input_is_one_line(model, tok, tmp_path):
    on = AttributionConfig(attr_edges=True)
    cases = [(dict(basis="neurons"), "basis 'neurons' has no edges"),
             (dict(method="patching"), "scored by eap or eap-ig, not patching"),
             (dict(attribution=AttributionConfig(attr_edges=True, node_ablation="mean")),
              "patched from the counterfactual")]
    for kw, message in cases:
        with pytest.raises(SaelabError) as e:
            CircuitsConfig(**{"method": "eap", "attribution": on, **kw})
        assert message in one_line(e)
    with pytest.raises(SaelabError) as e:
        recover(model, letters(), "rotation", "eap-ig", on, progress=False)
    assert "basis 'rotation' has no edges" in one_line(e)
    with pytest.raises(SaelabError) as e:
        edge_faithfulness(model, tok, torch.zeros(3, 3))
    assert "edge scores must be (6, 6)" in one_line(e)
    one = tiny_model(tmp_path / "one", live={(0, 0)}, n_layer=1)
    with pytest.raises(SaelabError) as e:
        recover(one, letters(), "heads", "eap",
                AttributionConfig(attr_prompts=5, faith_prompts=5, attr_edges=True), progress=False)
    assert "has one layer" in one_line(e)
    dead = tiny_model(tmp_path / "dead", live={(1, 0)})  # layer 0 writes nothing: no edge flow
    with pytest.raises(SaelabError) as e:
        edge_faithfulness(dead, tokenize(TASK, dead.tokenizer), torch.zeros(4, 4), progress=False)
    assert "does not flow between heads" in one_line(e)
