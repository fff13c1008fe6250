"""Each allocator's defining invariant, checked against brute force."""

import dataclasses
import math

import pytest
import torch

from saelab.allocators.base import threshold, topk
from saelab.allocators.feature_choice import capacities, feature_choice
from saelab.allocators.mutual_choice import mutual_choice
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.training.losses import underused


def dense(sel, shape):
    """The (B, n) 0/1 matrix of a Selection."""
    z = torch.zeros(shape, dtype=torch.bool)
    mask = torch.ones_like(sel.idx, dtype=torch.bool) if sel.mask is None else sel.mask
    for b in range(shape[0]):
        z[b, sel.idx[b][mask[b]]] = True
    return z


@pytest.fixture
def pre():
    torch.manual_seed(0)
    return torch.randn(40, 23)


def test_topk_exactly_k_per_token(pre):
    z = dense(topk(pre, 5), pre.shape)
    assert (z.sum(1) == 5).all()
    for b in range(pre.shape[0]):  # brute force: the chosen are the 5 largest
        assert set(z[b].nonzero().flatten().tolist()) == set(pre[b].argsort(descending=True)[:5].tolist())


@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_feature_choice_at_most_capacity_positive_top_tokens(pre, kind):
    k = 3
    sel = feature_choice(pre, k, kind)
    z = dense(sel, pre.shape)
    cap = capacities(pre.relu().sum(0), k * pre.shape[0], pre.shape[0], kind)
    assert cap.sum() == k * pre.shape[0]  # the budget
    positives = (pre > 0).sum(0)
    assert torch.equal(z.sum(0), torch.minimum(cap, positives))  # at most c_j, positive only
    assert (pre[z] > 0).all()
    if kind == "uniform":
        assert z.sum(0).max() <= math.ceil(k * pre.shape[0] / pre.shape[1])
    for j in range(pre.shape[1]):  # each latent holds its own top tokens
        c = int(z[:, j].sum())
        top = pre[:, j].argsort(descending=True)[:c]
        assert set(z[:, j].nonzero().flatten().tolist()) == set(top.tolist())
        if cap[j] == 0:
            assert sel.boundary[j] == float("inf")
        elif c == cap[j]:
            assert sel.boundary[j] == pre[:, j].sort(descending=True).values[c - 1]
        else:  # capacity left over: it would have taken any positive token
            assert sel.boundary[j] == 0


def test_feature_choice_leaves_budget_unused_rather_than_take_negatives():
    pre = torch.tensor([[1.0, -1.0], [2.0, -2.0], [-0.5, -3.0]])
    sel = feature_choice(pre, k=1, kind="uniform")
    z = dense(sel, pre.shape)
    assert torch.equal(z, torch.tensor([[True, False], [True, False], [False, False]]))


def test_zipf_capacities_follow_demand_and_cap_at_batch():
    demand = torch.tensor([0.5, 9.0, 3.0, 1.0, 7.0])
    cap = capacities(demand, budget=30, rows=10, kind="zipf", alpha=0.5)
    assert cap.sum() == 30 and cap.max() <= 10
    by_demand = cap[demand.argsort(descending=True)]
    assert (by_demand[:-1] >= by_demand[1:]).all()
    steep = capacities(demand, budget=30, rows=10, kind="zipf", alpha=3.0)
    assert steep.sum() == 30 and steep.max() == 10  # water-filled at the batch size
    uni = capacities(demand, budget=13, rows=10)
    assert sorted(uni.tolist()) == [2, 2, 3, 3, 3] and uni[1] == 3 and uni[4] == 3


def test_mutual_choice_is_global_top(pre):
    k = 4
    sel = mutual_choice(pre, k)
    z = dense(sel, pre.shape)
    budget = k * pre.shape[0]
    cutoff = pre.flatten().sort(descending=True).values[budget - 1]
    assert torch.equal(z, pre >= cutoff) and z.sum() == budget
    assert (sel.boundary == cutoff).all()


def test_threshold_mode_is_jumprelu(pre):
    theta = torch.linspace(-1, 1, pre.shape[1])
    assert torch.equal(dense(threshold(pre, theta), pre.shape), pre > theta)


def _sae(allocator, **kw):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=6, n_latents=23, k=4, allocator=allocator, **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def test_gradient_topk_beta_zero_is_topk_and_no_grad_is_topk():
    x, g = torch.randn(30, 6), torch.randn(30, 6)
    ref = _sae("topk")
    with torch.no_grad():
        a = _sae("gradient_topk", beta=0.0).encode(x, grad=g)
        b = _sae("gradient_topk", beta=5.0).encode(x)  # inference: no gradient
        c = ref.encode(x)
    for idx, _ in (a, b):
        assert torch.equal(idx.sort(1).values, c[0].sort(1).values)


def test_gradient_topk_hand_built_case():
    sae = SAE(SAEConfig(d_in=2, n_latents=3, k=2, allocator="gradient_topk", beta=2.0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        x, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 10.0]])
        # pre = [3, 2, 1]; |W_dec g| = [0, 10, 10], over its mean 20/3: e = [0, 1.5, 1.5]
        # s = pre + 2 * pre * e = [3, 8, 4]: the two latents that move the loss win
        idx, vals = sae.encode(x, grad=g)
        assert sorted(idx[0].tolist()) == [1, 2]
        assert sorted(vals[0].tolist()) == [1.0, 2.0]  # values stay relu(pre)
        idx, _ = sae.encode(x)  # plain topk keeps latents 0 and 1
        assert sorted(idx[0].tolist()) == [0, 1]


def test_gradient_topk_raw_score_is_the_published_one():
    sae = SAE(SAEConfig(d_in=2, n_latents=3, k=1, allocator="gradient_topk", beta=0.05,
                        grad_score="raw"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        x = torch.tensor([[1.0, 0.0]])
        # pre = [3, 2, 1]; raw e = |W_dec g| = [0, g, g] for g = (0, g); s = pre * (1 + 0.05 e)
        # g = 20: s = [3, 4, 2] -> latent 1; g = 5: s = [3, 2.5, 1.25] -> latent 0. The
        # normalised score ignores the gradient's size (e / mean(e) = [0, 1.5, 1.5] for any g).
        assert sae.encode(x, grad=torch.tensor([[0.0, 20.0]])).idx.item() == 1
        assert sae.encode(x, grad=torch.tensor([[0.0, 5.0]])).idx.item() == 0
        normalised = SAE(dataclasses.replace(sae.cfg, grad_score="normalised"))
        normalised.load_state_dict(sae.state_dict())
        for g in (5.0, 20.0, 1e4):  # s = [3, 2.15, 1.075] whatever the gradient's size
            assert normalised.encode(x, grad=torch.tensor([[0.0, g]])).idx.item() == 0
        with pytest.raises(SaelabError, match="unknown grad_score"):
            SAEConfig(d_in=2, n_latents=3, k=1, grad_score="scaled")


def test_batch_allocators_need_thresholds_for_inference():
    sae = _sae("mutual_choice").eval()  # eval() mode: inference, which needs thresholds
    with pytest.raises(SaelabError, match="no inference thresholds"):
        sae.encode(torch.randn(3, 6))
    idx, vals = sae.encode(torch.randn(3, 6), batch=True)
    assert int((vals > 0).sum()) <= 12


def test_underused_follows_fitted_zipf_curve():
    ranks = torch.arange(1, 101, dtype=torch.float32)
    freq = 0.3 * ranks.pow(-1.2)
    dead = torch.zeros(100, dtype=torch.bool)
    assert not underused(freq, dead).any()  # exactly on the curve: nothing flagged
    tail = freq.clone()
    tail[80:] *= torch.linspace(0.9, 0.01, 20)  # the tail collapses below the power law
    tail[95:] = 0.0  # and some latents never fire
    dead[3] = True  # dead by the token counter (its EMA frequency lags)
    flagged = underused(tail, dead)
    expected = torch.zeros(100, dtype=torch.bool)
    expected[80:] = torch.linspace(0.9, 0.01, 20) < 0.5
    expected[95:] = True
    expected[3] = True
    assert torch.equal(flagged, expected)
