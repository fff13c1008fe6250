"""Sparsity allocators: which (token, latent) pairs of the B x n affinity matrix are active.

Every allocator chooses a 0/1 mask S over the pre-activations `pre` (B, n) under a budget;
the SAE keeps relu(pre) on S. The result is a `Selection`: per-token indices padded to the
largest count in the batch, a mask of the real slots, and (for the batch-level allocators) each
latent's selection boundary, from which inference thresholds are estimated.

- topk: each token keeps its k largest pre-activations (Gao et al. 2024).
- gradient_topk (g-SAE): top-k of the score s = pre + beta * pre * e, where e_j = |W_dec[j] . g|
  is latent j's first-order effect on the LM loss (g: the loss gradient w.r.t. the SAE input).
  Two scores (`grad_score`): "raw", the published one, e as is with a fixed beta; and
  "normalised" (saelab's, the default), e divided by its mean over the token's latents. Raw
  |W_dec g| is tiny and its scale varies by orders of magnitude across models, layers and
  tokens (median 0.006 at zoo:pystdlib-4l's layer 2), so a raw beta must be tuned per model;
  normalised, beta = 1 weighs the gradient like the activation itself, but every token gets the
  same steering however little its loss depends on the activation. beta = 0 is topk either way.
  Values are still relu(pre). Without a gradient (inference) it is plain topk.
- feature_choice (Ayonrinde 2024): latent j keeps *at most* its c_j largest tokens of the
  batch, positive pre-activations only (a latent with fewer positive tokens leaves the rest of
  its capacity unused), with the capacities summing to exactly k*B. Zipf capacities (the paper's
  variant, the default): c_j proportional to rank_j^-alpha, where rank 1 is the latent with the
  largest demand in this batch (demand = the column sum of relu(pre)), capped at B with the
  excess spread over the others, rounded by largest remainder. Uniform capacities (an
  ablation): floor(k*B/n), the remainder given one each to the latents of highest demand.
- mutual_choice (Ayonrinde 2024, = BatchTopK): the k*B largest entries of the whole matrix.
- relu (the SAELens "standard" SAE): every positive pre-activation; no budget, sparsity comes
  from the L1 penalty it is trained with (`saelab.penalty.l1_penalty`).
- jumprelu (Rajamanoharan et al. 2024; Gemma Scope): latent j is active iff pre_j > theta_j,
  with per-latent thresholds stored in the dictionary (imported; saelab does not train them).

Batch-level allocators depend on the batch, so a single token cannot be encoded with them. For
inference they become a per-latent threshold (JumpReLU form: active iff pre > theta_j). theta_j
is latent j's selection boundary, the rule the batch itself applied (for feature_choice the
smallest pre-activation latent j selected, or 0 when its capacity was not filled, since it
would have taken any positive token; for mutual_choice the (k*B)-th largest entry of the
batch, the same for every latent), averaged by the trainer over 16 training batches after the
last step, with the final weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.errors import SaelabError
from saelab.kernels import topk_indices

BATCH_ALLOCATORS = ("feature_choice", "mutual_choice")
BUDGET_ALLOCATORS = ("topk", "gradient_topk", *BATCH_ALLOCATORS)  # k active per token on average
ALLOCATORS = (*BUDGET_ALLOCATORS, "relu", "jumprelu")
CAPACITIES = ("uniform", "zipf")
GRAD_SCORES = ("normalised", "raw")


@dataclass
class Selection:
    """Active latents per token.

    Fields:
        idx: (B, k_max) latent indices.
        mask: (B, k_max) bool, True on real slots; None when every slot is real.
        boundary: (n,) per-latent selection boundary of this batch (batch allocators only).
    """

    idx: torch.Tensor
    mask: torch.Tensor | None = None
    boundary: torch.Tensor | None = None


def check(name: str) -> None:
    if name not in ALLOCATORS:
        raise SaelabError(f"unknown allocator {name!r}; available: {', '.join(ALLOCATORS)}")


def topk(score: torch.Tensor, k: int) -> Selection:
    return Selection(topk_indices(score, k))  # exact; faster than torch.topk on CPU


def gradient_score(pre: torch.Tensor, grad: torch.Tensor, W_dec: torch.Tensor, beta: float,
                   kind: str = "normalised") -> torch.Tensor:
    """gradient_topk's selection score (module docstring): pre * (1 + beta * e), e = |W_dec g|,
    divided by its per-token mean when `kind` is "normalised"."""
    effect = (grad.to(pre.dtype) @ W_dec.T).abs()
    if kind == "normalised":
        effect = effect / effect.mean(1, keepdim=True).clamp_min(1e-30)
    return pre + beta * pre * effect


def _from_mask(chosen: torch.Tensor) -> Selection:
    """Pack a dense (B, n) 0/1 choice into per-token padded indices."""
    counts = chosen.sum(1)
    k_max = max(int(counts.max()), 1)
    idx = chosen.to(torch.uint8).topk(k_max, dim=1, sorted=False).indices
    return Selection(idx, chosen.gather(1, idx))


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
    sel = _from_mask(chosen)
    sel.boundary = boundary
    return sel


def mutual_choice(pre: torch.Tensor, k: int) -> Selection:
    """The k * B largest entries of the whole batch."""
    rows, n = pre.shape
    top = pre.flatten().topk(k * rows, sorted=False)
    chosen = torch.zeros(rows * n, dtype=torch.bool, device=pre.device)
    chosen[top.indices] = True
    sel = _from_mask(chosen.view(rows, n))
    sel.boundary = top.values.min().expand(n).clone()
    return sel


def threshold(pre: torch.Tensor, theta: torch.Tensor) -> Selection:
    """Latent j is active iff pre_j > theta_j: jumprelu, and the batch allocators' inference form.
    theta = 0 everywhere is the relu allocator."""
    return _from_mask(pre > theta)
