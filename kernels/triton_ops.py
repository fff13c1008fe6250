"""The three primitives as Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests).

Imported lazily by ``saelab.kernels.backend``: importing it imports triton. Inputs are already
validated by ``saelab.kernels.primitives``. Every kernel loads its operands in their own dtype,
accumulates in fp32 (fp64 for fp64 inputs) and rounds once on the store.

- gather-weighted-sum: one program per (token, block of d): loop over the token's k entries in
  blocks, gather a (BLOCK_K, BLOCK_D) tile of W rows, reduce over k.
- gather-dot: one program per (token, block of k): loop over d in blocks, reduce over d.
- scatter-outer-add: sort-by-latent, no atomics: entries are grouped per latent
  (``torch_ops.latent_segments``), and one program per (latent, block of d) sums its segment's
  ``vals * g[token]`` rows. Deterministic (same result run to run, unlike fp32 atomics), and every
  output row is written exactly once, so the output needs no zero fill. A latent chosen by every
  token makes one long segment: correct, just a longer loop for that program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_ops import accumulation_dtype, latent_segments

_BLOCK_D = 64
_BLOCK_K = 16


def _acc(dtype: torch.dtype):
    """Triton accumulator type for a result dtype."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def _gather_weighted_sum_kernel(
    idx_ptr, vals_ptr, w_ptr, out_ptr, k, d,
    stride_w, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for start in range(0, k, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        j_ok = j < k
        rows = tl.load(idx_ptr + b * k + j, mask=j_ok, other=0).to(tl.int64)
        v = tl.load(vals_ptr + b * k + j, mask=j_ok, other=0).to(ACC)
        tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                       mask=j_ok[:, None] & col_ok[None, :], other=0).to(ACC)
        acc += tl.sum(v[:, None] * tile, axis=0)
    tl.store(out_ptr + b * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, g_ptr, w_ptr, out_ptr, k, d,
    stride_w, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < k
    rows = tl.load(idx_ptr + b * k + j, mask=j_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        gv = tl.load(g_ptr + b * d + cols, mask=col_ok, other=0).to(ACC)
        tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                       mask=j_ok[:, None] & col_ok[None, :], other=0).to(ACC)
        acc += tl.sum(tile * gv[None, :], axis=1)
    tl.store(out_ptr + b * k + j, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _segment_outer_sum_kernel(
    offsets_ptr, tokens_ptr, weights_ptr, g_ptr, out_ptr, d,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    first = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for start in range(first, end, BLOCK_S):
        e = start + tl.arange(0, BLOCK_S)
        e_ok = e < end
        tok = tl.load(tokens_ptr + e, mask=e_ok, other=0)
        wt = tl.load(weights_ptr + e, mask=e_ok, other=0).to(ACC)
        tile = tl.load(g_ptr + tok[:, None] * d + cols[None, :],
                       mask=e_ok[:, None] & col_ok[None, :], other=0).to(ACC)
        acc += tl.sum(wt[:, None] * tile, axis=0)
    tl.store(out_ptr + latent.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _contiguous_rows(W: torch.Tensor) -> torch.Tensor:
    """W with unit column stride (rows may be strided), as the kernels index it."""
    return W if W.stride(1) == 1 else W.contiguous()


def gather_weighted_sum(
    idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    (batch, k), d = idx.shape, W.shape[1]
    W = _contiguous_rows(W)
    out = torch.empty((batch, d), dtype=dtype, device=W.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    grid = (batch, triton.cdiv(d, _BLOCK_D))
    _gather_weighted_sum_kernel[grid](
        idx.contiguous(), vals.contiguous(), W, out, k, d, W.stride(0),
        ACC=_acc(dtype), BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
    )
    return out


def gather_dot(
    idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    (batch, k), d = idx.shape, W.shape[1]
    W = _contiguous_rows(W)
    out = torch.empty((batch, k), dtype=dtype, device=W.device)
    if out.numel() == 0:
        return out
    grid = (batch, triton.cdiv(k, _BLOCK_K))
    _gather_dot_kernel[grid](
        idx.contiguous(), g.contiguous(), W, out, k, d, W.stride(0),
        ACC=_acc(dtype), BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
    )
    return out


def scatter_outer_add(
    idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n: int, dtype: torch.dtype
) -> torch.Tensor:
    d = g.shape[1]
    if idx.numel() == 0 or d == 0:
        return torch.zeros((n, d), dtype=dtype, device=g.device)
    order, offsets = latent_segments(idx, n)
    tokens = order // idx.shape[1]
    weights = vals.reshape(-1)[order]
    out = torch.empty((n, d), dtype=dtype, device=g.device)
    grid = (n, triton.cdiv(d, _BLOCK_D))
    _segment_outer_sum_kernel[grid](
        offsets, tokens, weights, g.contiguous(), out, d,
        ACC=_acc(dtype), BLOCK_S=_BLOCK_K, BLOCK_D=_BLOCK_D,
    )
    return out
