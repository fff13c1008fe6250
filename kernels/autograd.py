"""Differentiable k-sparse encode/decode with sparse backward passes.

Going through the dense (B, n) code matrix ``Z`` makes autograd compute
``grad_out @ W.T`` and ``Z.T @ grad_out``: O(B n d) work and O(B n) memory even
though only k << n entries per row are non-zero. These functions only touch
the selected rows, so forward and backward cost O(B k d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .primitives import check_code, check_matrix, gather_dot, gather_weighted_sum, scatter_outer_add
from .torch_ops import accumulation_dtype


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        idx: torch.Tensor,
        vals: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(idx, vals, W)
        ctx.bias_dtype = None if bias is None else bias.dtype
        out = gather_weighted_sum(idx, vals, W)
        return out if bias is None else out + bias

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        idx, vals, W = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        _, need_vals, need_W, need_bias = ctx.needs_input_grad
        grad_vals = grad_W = grad_bias = None
        if need_vals:
            grad_vals = gather_dot(idx, grad_out, W).to(vals.dtype)
        if need_W:
            grad_W = scatter_outer_add(idx, vals, grad_out, W.shape[0]).to(W.dtype)
        if need_bias:
            acc = accumulation_dtype(grad_out.dtype)
            grad_bias = grad_out.sum(0, dtype=acc).to(ctx.bias_dtype)
        return None, grad_vals, grad_W, grad_bias


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor | None,
        idx: torch.Tensor,
        pre: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc, idx)
        ctx.bias_dtype = None if b_enc is None else b_enc.dtype
        if pre is not None:
            return pre.gather(1, idx.long())
        vals = gather_dot(idx, x, W_enc)
        if b_enc is None:
            return vals
        return vals + b_enc.index_select(0, idx.reshape(-1)).view(idx.shape)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_vals: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, W_enc, idx = ctx.saved_tensors
        grad_vals = grad_vals.contiguous()
        need_x, need_W, need_bias, _, _ = ctx.needs_input_grad
        n = W_enc.shape[0]
        grad_x = grad_W = grad_bias = None
        if need_x:
            grad_x = gather_weighted_sum(idx, grad_vals, W_enc).to(x.dtype)
        if need_W:
            grad_W = scatter_outer_add(idx, grad_vals, x, n).to(W_enc.dtype)
        if need_bias:
            acc = accumulation_dtype(grad_vals.dtype)
            grad_bias = (
                torch.zeros(n, dtype=acc, device=grad_vals.device)
                .index_add_(0, idx.reshape(-1), grad_vals.reshape(-1).to(acc))
                .to(ctx.bias_dtype)
            )
        return grad_x, grad_W, grad_bias, None, None


def sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable ``Z @ W (+ bias)`` for the k-sparse code ``Z = (idx, vals)``.

    The backward never forms the dense (B, n) code or its gradient: grad_vals
    is a gather-dot, grad_W a scatter of rank-1 updates, both O(B k d).

    Args:
        idx: (B, k) latent indices in ``[0, n)``; not differentiated.
        vals: (B, k) code values.
        W: (n, d) decoder dictionary.
        bias: optional (d,) decoder bias.

    Returns:
        (B, d) reconstruction.
    """
    if bias is not None and bias.shape != (W.shape[-1],):
        raise ValueError(f"bias must have shape ({W.shape[-1]},), got {tuple(bias.shape)}")
    return _SparseDecode.apply(idx, vals, W, bias)


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    idx: torch.Tensor,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable pre-activations of the selected latents only.

    ``vals[b, j] = <x[b], W_enc[idx[b, j]]> + b_enc[idx[b, j]]``. The intended
    use: compute the dense (B, n) pre-activations under ``torch.no_grad`` just
    to *select* ``idx`` (e.g. top-k), then recompute the k selected values here
    so that autograd only sees them and the backward is O(B k d) instead of
    a dense B x n x d product.

    Args:
        x: (B, d) inputs.
        W_enc: (n, d) encoder weights, one row per latent.
        b_enc: optional (n,) encoder bias.
        idx: (B, k) selected latent indices in ``[0, n)``; not differentiated.
        pre: optional (B, n) dense pre-activations ``x @ W_enc.T + b_enc`` that ``idx`` was
            selected from. The forward then gathers the values from it instead of recomputing
            B k dot products (the caller vouches that it matches ``x``, ``W_enc`` and ``b_enc``);
            it is not differentiated.

    Returns:
        (B, k) pre-activations of the selected latents.
    """
    if b_enc is not None and b_enc.shape != (W_enc.shape[0],):
        raise ValueError(f"b_enc must have shape ({W_enc.shape[0]},), got {tuple(b_enc.shape)}")
    if pre is not None:
        check_code(idx)
        check_matrix("pre", pre, (x.shape[0], W_enc.shape[0]))
    return _SparseEncode.apply(x, W_enc, b_enc, idx, pre)
