"""Training losses: normalised reconstruction error and the AuxK dead-latent loss."""

from __future__ import annotations

import torch
from saelab.kernels import sparse_decode


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the batch: sum||x - x_hat||^2 / sum||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def auxk_loss(sae, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
              dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual the live ones left.

    The top `k_aux` pre-activations among dead latents decode (without b_dec) the detached
    residual e = x - x_hat; the loss is FVU(e, e_hat), so it is scale-free like the main loss.
    """
    k = min(k_aux, int(dead.sum()))
    if k == 0:
        return x.new_zeros(())
    idx = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False).indices
    e_hat = sparse_decode(idx, sae.encode_values(x, idx), sae.W_dec)
    return fvu((x - x_hat).detach(), e_hat)
