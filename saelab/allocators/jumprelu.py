"""jumprelu (Rajamanoharan et al. 2024; Gemma Scope): latent j is active iff pre_j > theta_j,
with per-latent thresholds stored in the dictionary (imported; saelab does not train them yet)."""

from __future__ import annotations

import torch

from saelab.allocators.base import Allocator, Selection, by_threshold


class JumpReLU(Allocator):
    name = "jumprelu"
    budget = False
    thresholds = True
    threshold_fill = 0.0  # a relu SAE until thresholds are loaded
    trainable = False
    saelens_architecture = "jumprelu"

    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, batch: bool) -> Selection:
        return by_threshold(sae, pre)
