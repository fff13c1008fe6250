"""topk: each token keeps its k largest pre-activations (Gao et al. 2024)."""

from __future__ import annotations

import torch

from saelab.allocators.base import Allocator, Selection, topk


class TopK(Allocator):
    name = "topk"
    inference_topk = True
    saelens_architecture = "topk"

    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, batch: bool) -> Selection:
        return topk(pre, sae.cfg.k)
