"""Patching ground truth on tiny models built so that known heads carry the task.

Every head but the live ones has its output projection zeroed, so the last position can only
learn about the changed first token through the live heads: patching must give the live head
the whole effect (exactly 1) and every other head none (exactly 0); path patching must find
the one live edge and nothing else."""

from types import SimpleNamespace

import pytest
import torch

from saelab.errors import SaelabError
from saelab.evals.circuits.patching import (
    edge_mask,
    ground_truth,
    ground_truth_sets,
    head_shape,
    jaccard,
    mean_se,
    stability,
)
from saelab.models import load_model
from saelab.tasks import Task, tokenize


def tiny_model(path, live: set[tuple[int, int]], n_layer=2, n_head=2, d=16, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.zoo.build import EOT_ID, byte_tokenizer

    torch.manual_seed(seed)
    path.mkdir()
    byte_tokenizer(path)
    cfg = GPT2Config(vocab_size=EOT_ID + 1, n_positions=16, n_ctx=16, n_embd=d, n_layer=n_layer,
                     n_head=n_head, n_inner=2 * d, activation_function="relu",
                     bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    hf = GPT2LMHeadModel(cfg)
    d_head = d // n_head
    with torch.no_grad():
        for p in hf.parameters():  # larger weights than GPT-2's init: clear effects
            p.mul_(8) if p.dim() == 2 else None
        for layer, block in enumerate(hf.transformer.h):
            for head in range(n_head):
                if (layer, head) not in live:
                    block.attn.c_proj.weight[head * d_head:(head + 1) * d_head] = 0
    hf.save_pretrained(str(path))
    return load_model(str(path))


TASK = Task("copy", ("abcd", "qbcd", "mbcd"), ("xbcd", "zbcd", "nbcd"),
            (("e",), ("e",), ("e",)), (("f",), ("f",), ("f",)))


@pytest.mark.parametrize("ablation", ["counterfactual", "mean"])
def test_one_live_head_carries_the_task(tmp_path, ablation):
    model = tiny_model(tmp_path / "m", live={(1, 0)})
    gt = ground_truth(model, tokenize(TASK, model.tokenizer), ablation=ablation, edges=False,
                      progress=False)
    expect = torch.zeros(4)
    expect[2] = 1.0  # head 1.0 is index layer * n_heads + head = 2
    assert torch.allclose(gt.node_effect, expect, atol=1e-4)
    assert gt.nodes.tolist() == [False, False, True, False]
    assert gt.node_passes == 3 * (2 + 4)  # clean, counterfactual/mean, one per head
    assert gt.to_dict()["heads"] == ["1.0"]


def test_per_head_effect_and_se_against_each_prompt_by_hand(tmp_path):
    """node_effect and node_se against per-prompt drops recomputed from single-prompt passes:
    (clean - patched) / mean(clean - counterfactual), then mean and sample std / sqrt(P)."""
    from saelab.evals.circuits.patching import z_hook
    from saelab.tasks import last_logits, prob_diff

    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=1)
    tok = tokenize(TASK, model.tokenizer)
    gt = ground_truth(model, tok, edges=False, metric="prob-diff", progress=False)

    def metric_of(rows, replace=None):
        with torch.no_grad():
            return prob_diff(last_logits(model.logits(rows, replace), tok.pos_len), tok)

    clean, cf = metric_of(tok.pos), metric_of(tok.cf)
    z_cf = model.activations(tok.cf, [z_hook(1)])[z_hook(1)]
    d_head = model.model.cfg.d_head

    def patch(x):  # head 1.0 takes its counterfactual value
        x = x.clone()
        x[..., :d_head] = z_cf[..., :d_head]
        return x

    drops = ((clean - metric_of(tok.pos, {z_hook(1): patch})) / (clean - cf).mean()).tolist()
    mean = sum(drops) / 3
    se = (sum((d - mean) ** 2 for d in drops) / 2) ** 0.5 / 3 ** 0.5
    assert gt.node_effect[2].item() == pytest.approx(mean, abs=1e-5)
    assert gt.node_se[2].item() == pytest.approx(se, abs=1e-5) and se > 1e-4
    assert gt.metric == "prob-diff" and gt.clean_metric == pytest.approx(clean.mean().item(), abs=1e-6)
    d = gt.to_dict()
    assert d["node_effect_se"]["1.0"] == pytest.approx(se, abs=1e-5) and d["stability"] is None


def test_mean_se_jaccard_and_stability_by_hand():
    mean, se = mean_se(torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [5.0, 0.0]]))
    # column 0: mean 3, sample variance (4 + 1 + 1 + 4) / 3, SE sqrt(10 / 3) / 2
    assert mean.tolist() == [3.0, 0.0]
    assert se[0].item() == pytest.approx((10 / 3) ** 0.5 / 2) and se[1] == 0
    assert mean_se(torch.tensor([[7.0]]))[1].tolist() == [0.0]
    a, b, c = (torch.tensor(v, dtype=torch.bool) for v in
               ([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]))
    assert jaccard(a, b) == pytest.approx(2 / 4) and jaccard(a, c) == 1.0
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    st = stability([a, b, c], prompts=64, n_heads=3)
    assert st["jaccard"] == [0.5, 1.0, 0.5] and st["min_jaccard"] == 0.5 and not st["stable"]
    assert st["circuits"][1] == ["0.0", "0.1", "1.0"] and st["sets"] == 3
    assert stability([a, c, a], 64, 3)["stable"]
    # four of five heads shared: Jaccard 0.8 is stable, just
    d = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    e = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert stability([d, e], 64, 3)["stable"]


def test_ground_truth_sets_reports_stability(tmp_path):
    model = tiny_model(tmp_path / "m", live={(1, 0)})
    sets = [tokenize(TASK.subset([i]), model.tokenizer) for i in range(3)]
    gt = ground_truth_sets(model, sets[0], sets, edges=False, progress=False)
    assert gt.prompts == 1 and gt.stability["circuits"] == [["1.0"]] * 3
    assert gt.stability["jaccard"] == [1.0, 1.0, 1.0] and gt.stability["stable"]
    assert gt.stability["forward_passes"] == 2 * (2 + 4)  # sets 1 and 2: clean, cf, 4 heads


def test_path_patching_finds_the_live_edge(tmp_path):
    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=1)
    gt = ground_truth(model, tokenize(TASK, model.tokenizer), progress=False)
    mask = edge_mask(2, 2)
    assert mask.sum() == 4 and gt.has_edges
    live = torch.zeros(4, 4, dtype=torch.bool)
    live[1, 2] = True  # 0.1 -> 1.0
    assert gt.edge_effect[1, 2].abs() > 1e-3
    assert torch.allclose(gt.edge_effect[mask & ~live], torch.zeros(3), atol=1e-5)
    assert torch.equal(gt.edges, live)
    assert gt.to_dict()["edges"] == ["0.1->1.0"]
    # 2 layer-0 senders x 1 receiver layer x (1 capture + 2 receivers) batched passes
    assert gt.edge_passes == 3 * 2 * 3


def test_bad_inputs(tmp_path):
    model = tiny_model(tmp_path / "m", live={(1, 0)})
    uneven = Task("u", ("abcd",), ("abc",), (("e",),), (("f",),))
    with pytest.raises(SaelabError, match="differ in length"):
        ground_truth(model, tokenize(uneven, model.tokenizer), progress=False)
    same = Task("s", ("abcd",), ("abcd",), (("e",),), (("f",),))
    with pytest.raises(SaelabError, match=r"does not change the task metric \(logit-diff"):
        ground_truth(model, tokenize(same, model.tokenizer), progress=False)
    with pytest.raises(SaelabError, match="unknown ablation"):
        ground_truth(model, tokenize(TASK, model.tokenizer), ablation="zero")
    with pytest.raises(SaelabError, match="unknown task metric 'kl'; use logit-diff or prob-diff"):
        ground_truth(model, tokenize(TASK, model.tokenizer), metric="kl")
    no_heads = SimpleNamespace(spec="fake", n_layers=1,
                               model=SimpleNamespace(cfg=SimpleNamespace(n_heads=2), hook_dict={}))
    with pytest.raises(SaelabError, match="no per-head attention hooks"):
        head_shape(no_heads)
