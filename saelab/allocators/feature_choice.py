"""feature_choice (Ayonrinde 2024): latent j keeps *at most* its c_j largest tokens of the
batch, positive pre-activations only (a latent with fewer positive tokens leaves the rest of
its capacity unused), with the capacities summing to exactly k*B. Zipf capacities (the paper's
variant, the default): c_j proportional to rank_j^-alpha, where rank 1 is the latent with the
largest demand in this batch (demand = the column sum of relu(pre)), capped at B with the
excess spread over the others, rounded by largest remainder. Uniform capacities (an
ablation): floor(k*B/n), the remainder given one each to the latents of highest demand.

Inference threshold (eval() mode): latent j's selection boundary, the smallest pre-activation
it selected, or 0 when its capacity was not filled (it would have taken any positive token)."""

from __future__ import annotations

import torch

from saelab.allocators.base import BatchAllocator, Selection, from_mask
from saelab.errors import SaelabError

CAPACITIES = ("uniform", "zipf")


def capacities(demand: torch.Tensor, budget: int, rows: int, kind: str = "uniform",
               alpha: float = 0.5) -> torch.Tensor:
    """Integer tokens-per-latent (n,) summing to `budget`, each at most `rows`.

    Latents are ranked by `demand` (largest first): remainders and, for `zipf`, the larger
    shares go to the latents that want the batch most.
    """
    if kind not in CAPACITIES:
        raise SaelabError(f"unknown capacity curve {kind!r}; use one of {', '.join(CAPACITIES)}")
    n = demand.shape[0]
    order = demand.argsort(descending=True)
    if kind == "uniform":
        share = torch.full((n,), budget / n, dtype=torch.float64)
    else:
        share = torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)
        share *= budget / share.sum()
        capped = torch.zeros(n, dtype=torch.bool)
        while (share > rows + 1e-9).any():  # water-filling: cap at B, spread the excess
            capped |= share > rows
            excess = (share[capped] - rows).sum()
            share[capped] = rows
            share[~capped] += excess * share[~capped] / share[~capped].sum()
    base = share.floor()
    rest = int(budget - base.sum().round())
    frac_order = (share - base).argsort(descending=True, stable=True)
    base[frac_order[:rest]] += 1
    out = torch.empty(n, dtype=torch.long)
    out[order] = base.long()  # rank r of the curve goes to the r-th most demanded latent
    return out.to(demand.device)


def feature_choice(pre: torch.Tensor, k: int, kind: str = "zipf", alpha: float = 0.5) -> Selection:
    """Each latent takes at most its top-c_j positive tokens; sum(c_j) = k * B."""
    rows, n = pre.shape
    cap = capacities(pre.relu().sum(0), k * rows, rows, kind, alpha)
    c_max = int(cap.max())
    top = pre.topk(c_max, dim=0, sorted=True)  # (c_max, n), rank-ordered per latent
    take = (torch.arange(c_max, device=pre.device)[:, None] < cap[None, :]) & (top.values > 0)
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    chosen.scatter_(0, top.indices, take)
    last = (cap - 1).clamp_min(0)
    boundary = top.values.gather(0, last[None, :]).squeeze(0).clamp_min(0)
    boundary = torch.where(cap > 0, boundary, torch.full_like(boundary, float("inf")))
    sel = from_mask(chosen)
    sel.boundary = boundary
    return sel


class FeatureChoice(BatchAllocator):
    name = "feature_choice"

    def select_batch(self, sae, pre: torch.Tensor) -> Selection:
        return feature_choice(pre, sae.cfg.k, sae.cfg.capacity, sae.cfg.zipf_alpha)
