"""relu (the SAELens "standard" SAE): every positive pre-activation; no budget, sparsity comes
from the L1 penalty it is trained with (`saelab.penalty.l1_penalty`)."""

from __future__ import annotations

import torch

from saelab.allocators.base import Allocator, Selection, threshold
from saelab.penalty import l1_penalty


class ReLU(Allocator):
    name = "relu"
    budget = False
    saelens_architecture = "standard"
    step_matrices = 9.5  # measured: dense codes and their gradients

    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, batch: bool) -> Selection:
        return threshold(pre, pre.new_zeros(()))

    def penalty(self, sae, x, pre, sel, vals, world, learned, y=None):
        return l1_penalty(sae, x if y is None else y, sel.idx, vals, world)  # scaled like its FVU
