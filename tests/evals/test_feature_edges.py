"""EAP edges between two dictionary sites against finite differences of exact edge patching,
in float64 (test_edges.py does the same for the head graph).

Exact edge patching of (u, d): u's decoded change, times eps, is added at the upstream hook;
the downstream node's value is read from that run (a latent's activation, or x - x_hat for the
error node) and only its change is spliced into a clean run at the downstream hook. The edge's
EAP score is that metric's derivative in eps at 0, here by a central difference. The model
between and after the sites is not linear (attention, layer norms, a ReLU MLP), so the
difference quotient, not one patch, is the exact reference."""

import pytest
import torch
from test_circuits_patching import TASK, tiny_model
from test_edges import EPS, metric

from saelab.errors import SaelabError
from saelab.evals.circuits.attribution import attribute
from saelab.evals.circuits.feature_edges import feature_edges
from saelab.models import load_model
from saelab.sae import SAE, SAEConfig
from saelab.tasks import tokenize

UP, DOWN = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "m"
    tiny_model(path, live={(0, 0), (0, 1), (1, 0), (1, 1)})
    return load_model(str(path), dtype=torch.float64)


def dictionary(hook: str, seed: int, n: int = 6) -> SAE:
    """A random ReLU dictionary in float64, its last latent never active (b_enc far below)."""
    sae = SAE(SAEConfig(d_in=16, n_latents=n, k=0, allocator="relu", hook=hook), dtype=torch.float64)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        sae.W_enc.copy_(torch.randn(n, 16, generator=g, dtype=torch.float64) / 2)
        sae.W_dec.copy_(torch.randn(n, 16, generator=g, dtype=torch.float64) / 2)
        sae.b_enc[-1] = -1e6
    return sae.eval()


def nodes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """(P, T, N + 1, d): each node's decoded vector (latent value times decoder row; the error)."""
    z = sae.encode_dense(x)
    error = x - (z @ sae.W_dec + sae.b_dec)
    return torch.cat([z[..., None] * sae.W_dec, error[..., None, :]], dim=2).detach()


def test_feature_edges_are_edge_patching_derivatives(model):
    tok = tokenize(TASK, model.tokenizer)
    up, down = dictionary(UP, 1), dictionary(DOWN, 2)
    got = feature_edges(model, tok, {DOWN: down, UP: up})  # any order: sites sort by the forward pass
    total = got.clean_metric - got.counterfactual_metric
    acts = {k: model.activations(t, [UP, DOWN]) for k, t in (("clean", tok.pos), ("cf", tok.cf))}
    delta = nodes(up, acts["cf"][UP]) - nodes(up, acts["clean"][UP])
    clean_down = nodes(down, acts["clean"][DOWN])
    n = up.cfg.n_latents + 1
    assert got.upstream[0] == f"{UP}/0" and got.downstream[-1] == f"{DOWN}/error"
    assert got.scores.shape == (n, n)
    for u in range(n):
        for d in range(n):
            def patched(eps: float, u: int = u, d: int = d) -> float:
                seen = {}

                def read(x):
                    seen["d"] = nodes(down, x)[:, :, d]
                    return x

                metric(model, tok, {UP: lambda x: x + eps * delta[:, :, u], DOWN: read})
                change = seen["d"] - clean_down[:, :, d]
                return float(metric(model, tok, {DOWN: lambda x: x + change}))

            want = -(patched(EPS) - patched(-EPS)) / (2 * EPS) / total
            assert abs(float(got.scores[u, d]) - want) < 1e-5 * (1 + abs(want)), (u, d)
    assert (got.scores[:, up.cfg.n_latents - 1] == 0).all()  # the dead downstream latent
    assert (got.scores[up.cfg.n_latents - 1] == 0).all()  # the dead upstream latent
    assert got.scores.abs().max() > 1e-2


def test_edges_sum_to_node_scores_through_a_cut(model):
    """The later residual stream cuts every path: an upstream node's edges sum to its EAP score."""
    tok = tokenize(TASK, model.tokenizer)
    up, down = dictionary(UP, 3), dictionary(DOWN, 4)
    got = feature_edges(model, tok, {UP: up, DOWN: down})
    node = attribute(model, tok, {UP: up}, "eap").scores
    torch.testing.assert_close(got.scores.sum(1), node, rtol=1e-5, atol=1e-6)


def test_bad_input(model):
    tok = tokenize(TASK, model.tokenizer)
    with pytest.raises(SaelabError, match="join two dictionary sites; got 1"):
        feature_edges(model, tok, {UP: dictionary(UP, 1)})
