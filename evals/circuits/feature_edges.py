"""EAP edges between the nodes of two dictionary sites (Marks et al.'s sparse feature circuits).

Nodes are the node basis's own (`bases.DictionarySite`): each latent and one error node per
site. With an upstream site at hook U and a downstream one at a later hook D, edge (u, d) is

    -(delta_u . d(g_d n_d)/dx_U) / total,   summed over positions, averaged over prompts,

- delta_u: u's decoded counterfactual change at U (a latent's activation change times its
  decoder row; the error node's change itself);
- n_d: the downstream node as the model computes it from x_U (a latent: the dictionary's
  activation of x_D, its selection held; the error node: x_D - x_hat_D), so the derivative runs
  through the model between the sites and through D's encoder;
- g_d = dm/dn_d at the clean run, as the node basis takes it (a latent: its decoder row .
  dm/dx_D; the error node: dm/dx_D);
- total: the drop of the whole counterfactual run, as for node scores.
Everything is taken at the clean run: one forward pass keeps the graph from x_U to D's nodes,
then one backward pass per downstream node that is active on the prompts (an inactive latent
has no derivative there: its edges are 0). Summed over every downstream node, an upstream
node's edges give its node EAP score through D (all of it when D cuts every path, e.g. a later
residual stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import TaskTokens

from .attribution import Sources, _gradients
from .bases import Basis, DictionarySite
from .bases import basis as make_basis
from .patching import _Runner, check_tokens


@dataclass
class FeatureEdges:
    """EAP edge scores between two dictionary sites, and their cost.

    Fields:
        upstream, downstream: node names ("HOOK/I", "HOOK/error"), upstream site first.
        scores: (U, D) estimated normalised effect of each edge.
        forward_passes, backward_passes: per prompt (a backward pass per active downstream node).
        seconds: wall time.
        prompts: prompts scored.
        clean_metric, counterfactual_metric: mean task metric of the two runs.
    """

    upstream: list[str]
    downstream: list[str]
    scores: torch.Tensor
    forward_passes: int
    backward_passes: int
    seconds: float
    prompts: int
    clean_metric: float
    counterfactual_metric: float

    def edges(self) -> dict[str, float]:
        """{"UP->DOWN": score} over every pair."""
        return {f"{u}->{d}": float(self.scores[i, j]) for i, u in enumerate(self.upstream)
                for j, d in enumerate(self.downstream)}


def decoded(site: DictionarySite, parts: list[torch.Tensor]) -> torch.Tensor:
    """(P, T, N, d): each node's vector at the site (latent value times decoder row; the error)."""
    w = site.sae.W_dec.detach().to(parts[0].dtype)
    return torch.cat([parts[0] * w, parts[1]], dim=2)


def feature_edges(model: HookedModel, tokens: TaskTokens, saes: dict,
                  metric: str = "logit-diff") -> FeatureEdges:
    """EAP edges between the two dictionaries of `saes` ({hook: SAE}); see the module docstring."""
    if len(saes) != 2:
        raise SaelabError(f"feature edges join two dictionary sites; got {len(saes)} dictionaries")
    check_tokens(tokens, "counterfactual")
    b = make_basis(model, saes)
    up, down = b.sites
    if not all(isinstance(s, DictionarySite) for s in (up, down)):
        raise SaelabError("feature edges need dictionaries at both sites")
    assert isinstance(up, DictionarySite) and isinstance(down, DictionarySite)
    if up.hook == down.hook:
        raise SaelabError(f"both dictionaries read {up.hook}; feature edges join two different hooks")
    start, run = time.perf_counter(), _Runner(model, tokens, metric)
    src = Sources(run, b, "counterfactual")
    delta = decoded(up, src.source[0]) - decoded(up, src.clean[0])  # (P, T, U, d)
    g_lat, g_err = _gradients(model, tokens, Basis(b.name, [down]), metric)[0]  # dm/d(down's parts)
    leaf: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}

    def at_up(x: torch.Tensor) -> torch.Tensor:
        leaf["x"] = torch.zeros_like(x).requires_grad_(True)
        return x + leaf["x"]

    def at_down(x: torch.Tensor) -> torch.Tensor:
        z = down.sae.encode_dense(x.to(down.sae.dtype)).to(x.dtype)  # selection held, differentiable
        values["z"] = z
        w, bias = down.sae.W_dec.detach().to(x.dtype), down.sae.b_dec.detach().to(x.dtype)
        values["error"] = x - (z @ w + bias)
        return x

    with torch.enable_grad():
        model.logits(tokens.pos.to(model.device), {up.hook: at_up, down.hook: at_down})
        active = (values["z"] != 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
        z, err = values["z"], values["error"]
        error = len(down.names) - 1

        def target(j: int) -> torch.Tensor:
            """g_d n_d of downstream node j, summed over prompts and positions."""
            if j == error:
                return (err * g_err[..., 0, :].to(err)).sum()
            return (z[..., j] * g_lat[..., j, 0].to(z)).sum()

        wanted = [*active, error]
        scores = torch.zeros(len(up.names), len(down.names), dtype=torch.float64)
        for j in wanted:
            (grad,) = torch.autograd.grad(target(j), leaf["x"], retain_graph=True, allow_unused=True)
            if grad is not None:
                scores[:, j] = torch.einsum("ptud,ptd->u", delta.double(), grad.detach().cpu().double())
    scores = -scores / (len(tokens) * src.total)
    return FeatureEdges(up.names, down.names, scores.to(delta.dtype), run.passes + 2 * len(tokens),
                        (1 + len(wanted)) * len(tokens), time.perf_counter() - start, len(tokens),
                        src.m_clean.mean().item(), src.m_cf.mean().item())

