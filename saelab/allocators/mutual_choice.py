"""mutual_choice (Ayonrinde 2024; the same selection as BatchTopK): the k*B largest entries of
the whole batch. Inference threshold (eval() mode): the (k*B)-th largest entry of the batch, the
same for every latent."""

from __future__ import annotations

import torch

from saelab.allocators.base import BatchAllocator, Selection, from_mask


def mutual_choice(pre: torch.Tensor, k: int) -> Selection:
    """The k * B largest entries of the whole batch."""
    rows, n = pre.shape
    top = pre.flatten().topk(k * rows, sorted=False)
    chosen = torch.zeros(rows * n, dtype=torch.bool, device=pre.device)
    chosen[top.indices] = True
    sel = from_mask(chosen.view(rows, n))
    sel.boundary = top.values.min().expand(n).clone()
    return sel


class MutualChoice(BatchAllocator):
    name = "mutual_choice"
    saelens_training_architecture = "batchtopk"

    def select_batch(self, sae, pre: torch.Tensor) -> Selection:
        return mutual_choice(pre, sae.cfg.k)
