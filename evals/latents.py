"""Latent statistics over an eval window: L0, dead and dense latents, firing densities.

A latent is active on a token when its value is > 0 (unused slots of `encode` carry 0). Dead:
never active over the window, so the count is only meaningful with the window's size, which is
reported beside it. Rare: active on 1 to RARE_FIRES - 1 of the window's tokens, too few to tell
its rate from 1/window: a latent firing at a rate near 1/window lands in dead or rare by chance, so
a large rare share says the window is too short for "dead" to mean dead. Dense: active on more
than 10% (or 1%) of the window's tokens.
"""

from __future__ import annotations

import torch

DENSE_THRESHOLDS = {"10pct": 0.1, "1pct": 0.01}
RARE_FIRES = 10  # rare: active on fewer than this many window tokens (the allocator study's 1-9)


class LatentStats:
    """Per-latent firing counts and the per-token L0 histogram, accumulated batch by batch."""

    def __init__(self, n_latents: int) -> None:
        self.n_latents = n_latents
        self.tokens = 0
        self.fires = torch.zeros(n_latents, dtype=torch.long)
        self.l0_counts = torch.zeros(1, dtype=torch.long)  # l0_counts[j]: tokens with L0 == j

    def update(self, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Add a batch of codes: `idx`, `vals` (B, k_max) as `sae.encode` returns them."""
        on = (vals > 0).cpu()
        self.fires += torch.bincount(idx.cpu()[on], minlength=self.n_latents)
        per_token = torch.bincount(on.sum(1))
        if per_token.numel() > self.l0_counts.numel():
            self.l0_counts = torch.nn.functional.pad(
                self.l0_counts, (0, per_token.numel() - self.l0_counts.numel()))
        self.l0_counts[: per_token.numel()] += per_token
        self.tokens += idx.shape[0]

    def result(self) -> dict:
        density = self.fires.double() / self.tokens
        rare = (self.fires > 0) & (self.fires < RARE_FIRES)
        out: dict[str, float | list[float]] = {
            "l0": (self.fires.sum() / self.tokens).item(),
            "dead_latents": int((self.fires == 0).sum()),
            "dead_frac": (self.fires == 0).double().mean().item(),
            "rare_latents": int(rare.sum()),
            "rare_frac": rare.double().mean().item(),
        }
        for name, level in DENSE_THRESHOLDS.items():
            out[f"dense_latents_{name}"] = int((density > level).sum())
            out[f"dense_frac_{name}"] = (density > level).double().mean().item()
        out["l0_histogram"] = self.l0_counts.tolist()
        out["latent_density"] = density.tolist()
        return out
