"""Reconstruction quality of an SAE on a set of activations.

Explained variance is 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 with mean(x) over the whole
set and every sum accumulated in float64: not a per-token ratio, not variance about zero
(both read too high and both have shipped in peer toolkits). The set arrives in batches, so the
variance about the set mean is accumulated about a shift (the first batch's mean) and corrected
at the end: exact in float64 even when the mean is far from zero, as residual streams' are.
"""

from __future__ import annotations

import torch

from saelab.errors import SaelabError
from saelab.evals.latents import LatentStats


class ReconstructionStats:
    """Float64 running sums for FVU, explained variance, MSE and cosine similarity."""

    def __init__(self) -> None:
        self.rows = 0
        self.d = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros((), dtype=torch.float64)  # sum of (x - shift), per dim once set
        self.sumsq = torch.zeros((), dtype=torch.float64)  # sum ||x - shift||^2
        self.err = torch.zeros((), dtype=torch.float64)  # sum ||x - x_hat||^2
        self.cos = torch.zeros((), dtype=torch.float64)  # sum of per-token cos(x, x_hat)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64, xh64 = x.detach().double().cpu(), x_hat.detach().double().cpu()
        if self.shift is None:
            self.shift, self.d = x64.mean(0), x64.shape[1]
        centred = x64 - self.shift
        self.rows += x64.shape[0]
        self.sum = self.sum + centred.sum(0)
        self.sumsq += centred.pow(2).sum()
        self.err += (x64 - xh64).pow(2).sum()
        self.cos += torch.nn.functional.cosine_similarity(x64, xh64, dim=1).sum()

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation (d,) over every row seen, float64."""
        if self.shift is None:
            raise SaelabError("ReconstructionStats.mean needs at least one update")
        return self.shift + self.sum / self.rows

    def result(self) -> dict:
        total_var = self.sumsq - self.sum.pow(2).sum() / self.rows  # sum ||x - mean||^2
        fvu = (self.err / total_var).item()
        return {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": (self.err / (self.rows * self.d)).item(),
            "cosine_similarity": (self.cos / self.rows).item(),
        }


@torch.no_grad()
def reconstruction_stats(sae, x: torch.Tensor, chunk: int = 8192,
                         target: torch.Tensor | None = None) -> dict:
    """FVU, explained variance, MSE, L0 and dead/rare/dense latent fractions over the rows of x
    (`tokens` is the dead-latent window). A transcoder's FVU is of `target`, its target hook's
    rows of the same tokens."""
    recon, latents = ReconstructionStats(), LatentStats(sae.cfg.n_latents)
    for rows, want in zip(x.split(chunk), (x if target is None else target).split(chunk), strict=True):
        idx, vals = sae.encode(rows)
        recon.update(want, sae.decode(idx, vals, rows))
        latents.update(idx, vals)
    r, lat = recon.result(), latents.result()
    return {
        "tokens": x.shape[0],
        "fvu": r["fvu"],
        "explained_variance": r["explained_variance"],
        "mse": r["mse"],
        "l0": lat["l0"],
        "dead_frac": lat["dead_frac"],
        "rare_frac": lat["rare_frac"],
        "dense_frac_10pct": lat["dense_frac_10pct"],
    }
