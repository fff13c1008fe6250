"""Sparsity allocators: which (token, latent) pairs of the B x n pre-activations are active.

An allocator maps pre-activations (B, n) to indices (B, k_max) of the selected latents per token;
the SAE keeps relu(pre) at those indices. Only `topk` exists yet; the batch-level allocators
(gradient_topk, feature_choice, mutual_choice) plug in here with the same signature.
"""

from __future__ import annotations

import torch

from saelab.errors import SaelabError


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each token keeps its k largest pre-activations (Gao et al. 2024)."""
    return pre.topk(k, dim=-1, sorted=False).indices


ALLOCATORS = {"topk": topk}


def get(name: str):
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise SaelabError(
            f"unknown allocator {name!r}; available: {', '.join(sorted(ALLOCATORS))}"
        ) from None
