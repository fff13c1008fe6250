"""Gather/scatter primitives for k-sparse codes, written with plain torch ops.

A k-sparse code is a pair ``(idx, vals)`` of shape (B, k): token ``b`` has
value ``vals[b, j]`` on latent ``idx[b, j]``; duplicate indices in a row add
up. Every primitive costs O(B k d) and never builds the dense (B, n) code
matrix, which is what keeps wide dictionaries (n >> d) affordable.

bf16/fp16 inputs are accumulated in fp32 and the result is rounded back once,
so long sums (large k, d or B) do not drift.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 64 * 2**20
"""Budget for the per-chunk (rows, k, d) intermediate, in bytes."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype to accumulate in: fp32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _row_chunks(batch: int, k: int, d: int, dtype: torch.dtype) -> Iterator[slice]:
    """Row slices whose (rows, k, d) block of ``dtype`` fits in ``_CHUNK_BYTES``."""
    rows = max(1, _CHUNK_BYTES // max(1, k * d * dtype.itemsize))
    for start in range(0, batch, rows):
        yield slice(start, min(start + rows, batch))


def _check_code(idx: torch.Tensor, vals: torch.Tensor | None = None) -> None:
    """Fail early with a readable message instead of deep inside an aten op."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, k), got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an int64 or int32 tensor, got {idx.dtype}")
    if vals is not None and vals.shape != idx.shape:
        raise ValueError(
            f"vals shape {tuple(vals.shape)} does not match idx shape {tuple(idx.shape)}"
        )


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int | None, int | None]) -> None:
    """Require a 2-D ``t`` whose sizes match ``shape`` (``None`` matches any size)."""
    if t.dim() != 2 or any(e is not None and s != e for s, e in zip(t.shape, shape, strict=True)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(t.shape)}")


def _gather_rows(W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``W[idx]`` of shape (*idx.shape, d); unlike indexing, rejects negative idx."""
    return W.index_select(0, idx.reshape(-1)).view(*idx.shape, W.shape[1])


def gather_weighted_sum(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Decode a k-sparse code: ``out[b] = sum_j vals[b, j] * W[idx[b, j]]``.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        vals: (B, k) values.
        W: (n, d) dictionary rows.

    Returns:
        (B, d) tensor in the promoted dtype of ``vals`` and ``W``.
    """
    _check_code(idx, vals)
    _check_matrix("W", W, (None, None))
    dtype = torch.promote_types(vals.dtype, W.dtype)
    acc = accumulation_dtype(dtype)
    batch, k = idx.shape
    d = W.shape[1]
    if acc == dtype == W.dtype and idx.numel() > 0:
        # embedding_bag gathers and reduces in one pass, without a (B, k, d) block.
        return F.embedding_bag(idx, W, per_sample_weights=vals.to(dtype), mode="sum")
    # Half types (or W needing an upcast): gather in chunks and reduce in fp32 ourselves,
    # rather than rely on how a given embedding_bag kernel accumulates.
    out = torch.empty((batch, d), dtype=dtype, device=W.device)
    for rows in _row_chunks(batch, k, d, acc):
        gathered = _gather_rows(W, idx[rows]).to(acc)
        out[rows] = torch.bmm(vals[rows].to(acc).unsqueeze(1), gathered).squeeze(1)
    return out


def gather_dot(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Dot each token with its selected rows: ``out[b, j] = <g[b], W[idx[b, j]]>``.

    Works in row chunks so the gathered (rows, k, d) block stays within
    ``_CHUNK_BYTES`` however large B is.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        g: (B, d) per-token vectors.
        W: (n, d) dictionary rows.

    Returns:
        (B, k) tensor in the promoted dtype of ``g`` and ``W``.
    """
    _check_code(idx)
    batch, k = idx.shape
    _check_matrix("g", g, (batch, None))
    d = g.shape[1]
    _check_matrix("W", W, (None, d))
    dtype = torch.promote_types(g.dtype, W.dtype)
    acc = accumulation_dtype(dtype)
    out = torch.empty((batch, k), dtype=dtype, device=g.device)
    for rows in _row_chunks(batch, k, d, acc):
        gathered = _gather_rows(W, idx[rows]).to(acc)
        out[rows] = torch.bmm(gathered, g[rows].to(acc).unsqueeze(2)).squeeze(2)
    return out


def scatter_outer_add(
    idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n: int
) -> torch.Tensor:
    """Scatter rank-1 updates: ``out[i] = sum_{(b, j): idx[b, j] = i} vals[b, j] * g[b]``.

    This is ``Z.T @ g`` for the dense code matrix ``Z``, computed with
    ``index_add_`` over row chunks instead of building ``Z``.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        vals: (B, k) values.
        g: (B, d) per-token vectors.
        n: number of latents (rows of the output).

    Returns:
        (n, d) tensor in the promoted dtype of ``vals`` and ``g``.
    """
    _check_code(idx, vals)
    batch, k = idx.shape
    _check_matrix("g", g, (batch, None))
    d = g.shape[1]
    dtype = torch.promote_types(vals.dtype, g.dtype)
    acc = accumulation_dtype(dtype)
    out = torch.zeros((n, d), dtype=acc, device=g.device)
    for rows in _row_chunks(batch, k, d, acc):
        updates = vals[rows].to(acc).unsqueeze(2) * g[rows].to(acc).unsqueeze(1)
        out.index_add_(0, idx[rows].reshape(-1), updates.reshape(-1, d))
    return out.to(dtype)
