"""Activation-sparse MLPs: the down-projection over mostly-zero hidden activations.

An MLP's output is ``h @ W_out + b_out`` with ``h = act(x @ W_in + b_in)``. When most of ``h`` is
zero (ReLU MLPs: "The Lazy Neuron Phenomenon"), keep only each token's active units as a code
``(idx, vals)``; the down-projection is then the decoder's gather-weighted-sum over ``W_out``'s
rows, costing O(B k d) instead of O(B d_ff d), with the same sparse backward.
"""

from __future__ import annotations

import torch

from .autograd import sparse_decode
from .select import topk_indices


def active_code(h: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, vals) holding each row's nonzero entries of ``h`` (B, d_ff).

    With ``k=None`` the code is exact: k is the largest number of nonzeros in any row and rows
    with fewer are padded with zero values. A smaller ``k`` keeps the k largest ``|h|`` per row
    (statistical / top-k activation sparsity).
    """
    if k is None:
        k = max(1, int((h != 0).sum(1).max()))
    idx = topk_indices(h.abs(), k)
    return idx, h.gather(1, idx)


def sparse_mlp_down(
    idx: torch.Tensor, vals: torch.Tensor, W_out: torch.Tensor, b_out: torch.Tensor | None = None
) -> torch.Tensor:
    """``h @ W_out + b_out`` for hidden activations given as the sparse code ``(idx, vals)``.

    Args:
        idx: (B, k) active hidden units per token, in ``[0, d_ff)``.
        vals: (B, k) their activations (zeros for padding).
        W_out: (d_ff, d_model), one row per hidden unit: transformer-lens' ``W_out`` and GPT-2's
            ``c_proj.weight`` as they are; for an ``nn.Linear`` pass ``weight.T.contiguous()``
            (once, not per call).
        b_out: optional (d_model,) output bias.

    Returns:
        (B, d_model), differentiable in ``vals``, ``W_out`` and ``b_out``.
    """
    return sparse_decode(idx, vals, W_out, b_out)
