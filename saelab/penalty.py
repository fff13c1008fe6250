"""The relu architecture's sparsity penalty, shared by the trainer and the circuit evals' small
SAE, and the batch energy that makes it (and FVU) independent of the activations' scale."""

from __future__ import annotations

import torch

from saelab.distributed import World


def centred_energy(x: torch.Tensor, world: World | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum ||x - mean(x)||^2, rows) over the global batch (every process's rows), no grad."""
    with torch.no_grad():
        if world is None or world.size == 1:
            return (x - x.mean(0)).pow(2).sum(), torch.tensor(float(x.shape[0]), device=x.device)
        rows = world.all_reduce_(torch.tensor(float(x.shape[0]), device=x.device))
        mean = world.all_reduce_(x.sum(0)) / rows
        return world.all_reduce_((x - mean).pow(2).sum()), rows


def l1_penalty(sae, x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
               world: World | None = None) -> torch.Tensor:
    """The relu SAE's sparsity penalty: mean over tokens of sum_j z_j ||W_dec[j]|| (the SAELens
    "standard" form), divided by the batch's RMS distance to its mean so that, like FVU, it does
    not depend on the activations' scale; the coefficient then carries across models and layers.
    """
    energy, rows = centred_energy(x, world)
    norms = sae.W_dec.norm(dim=1)[idx]
    return (vals * norms).sum() / x.shape[0] / (energy / rows).sqrt().clamp_min(1e-12)
