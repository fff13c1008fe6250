"""Training losses: normalised reconstruction error and the auxiliary losses for unused latents.

aux_zipf, defined here (Ayonrinde 2024 names it but leaves it open): firing frequencies are
expected to fall off along a Zipf curve over frequency rank, f(r) = C r^-alpha. Fit log f on
log r by least squares over the more frequent half of the latents that fire at all (rank 1 =
most frequent; the head, so a collapsing tail cannot bend the fit towards itself), extrapolate
it over all ranks, and call a latent *under-used* when its frequency is below half the fitted
curve at its rank, or when it is dead.
The under-used latents then play the role the dead ones play in AuxK: their top k_aux
pre-activations reconstruct the residual the main code left, with the same weight and
normalisation. With every latent on the curve it adds nothing; AuxK is the special case where
only dead latents count.
"""

from __future__ import annotations

import torch

from saelab.allocators import Selection
from saelab.distributed import World
from saelab.kernels import sparse_decode, topk_indices
from saelab.penalty import centred_energy

UNDERUSE_FACTOR = 0.5


def fvu(x: torch.Tensor, x_hat: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Fraction of variance unexplained over the batch: sum||x - x_hat||^2 / sum||x - mean(x)||^2.

    Data parallel, the batch is the global one: the denominator (about the global mean) is
    summed over every process and the result scaled by the number of processes, so that the
    mean of the processes' gradients is exactly the gradient of the global batch's FVU.
    """
    err = (x - x_hat).pow(2).sum()
    if world is None or world.size == 1:
        return err / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    energy, _ = centred_energy(x, world)
    return err / energy.clamp_min(1e-12) * world.size


def underused(freq: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Dead latents plus those firing below half the Zipf curve fitted over frequency rank."""
    order = freq.argsort(descending=True)
    rank = torch.empty_like(freq)
    rank[order] = torch.arange(1, freq.numel() + 1, dtype=freq.dtype, device=freq.device)
    live = freq > 0
    head = live & (rank <= (live.sum() + 1) // 2)
    if head.sum() < 2:
        return dead | ~live
    lr, lf = rank[head].log(), freq[head].log()
    slope = ((lr - lr.mean()) * (lf - lf.mean())).sum() / (lr - lr.mean()).pow(2).sum().clamp_min(1e-12)
    fitted = (lf.mean() + slope * (rank.log() - lr.mean())).exp()
    return dead | (freq < UNDERUSE_FACTOR * fitted)


def auxk_loss(sae, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
              pool: torch.Tensor, k_aux: int, world: World | None = None,
              target: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (Gao et al. 2024): latents in `pool` (dead, or under-used) reconstruct the residual.

    The top `k_aux` pre-activations within the pool decode (without b_dec) the detached
    residual e = x - x_hat (a transcoder's: target - x_hat, x being its input); the loss is
    FVU(e, e_hat), so it is scale-free like the main loss.
    """
    k = min(k_aux, int(pool.sum()))
    if k == 0:
        return x.new_zeros(())
    idx = topk_indices(pre.masked_fill(~pool, float("-inf")), k)
    e_hat = sparse_decode(idx, sae.encode_values(x, Selection(idx), pre), sae.W_dec)
    return fvu(((x if target is None else target) - x_hat).detach(), e_hat, world)
