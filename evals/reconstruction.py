"""Reconstruction quality of an SAE on a set of activations.

Explained variance is 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 with mean(x) over the whole
set and every sum accumulated in float64: not a per-token ratio, not variance about zero
(both read too high and both have shipped in peer toolkits).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reconstruction_stats(sae, x: torch.Tensor, chunk: int = 8192) -> dict:
    """FVU, explained variance, MSE, L0 and dead/dense latent fractions over the rows of x."""
    n_rows, d = x.shape
    mean = x.double().mean(0)
    err = torch.zeros((), dtype=torch.float64)
    total_var = torch.zeros((), dtype=torch.float64)  # sum ||x - mean||^2, about the set mean
    active = 0
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.float64)
    for rows in x.split(chunk):
        idx, vals = sae.encode(rows)
        x_hat = sae.decode(idx, vals)
        r64 = rows.double()
        err += (r64 - x_hat.double()).pow(2).sum()
        total_var += (r64 - mean).pow(2).sum()
        on = vals > 0
        active += int(on.sum())
        fires.index_add_(0, idx[on].cpu(), torch.ones(int(on.sum()), dtype=torch.float64))
    fvu = (err / total_var).item()
    freq = fires / n_rows
    return {
        "tokens": n_rows,
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "mse": (err / (n_rows * d)).item(),
        "l0": active / n_rows,
        "dead_frac": (fires == 0).double().mean().item(),
        "dense_frac_10pct": (freq > 0.1).double().mean().item(),
    }
