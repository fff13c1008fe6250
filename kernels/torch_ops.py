"""The three primitives with plain torch ops: the CPU path and the fallback everywhere.

Inputs are already validated by ``saelab.kernels.primitives``. Each op picks the one aten kernel
that does its job in a single pass over the k selected rows per token, never a dense (B, n) code
and never a (B, k, d) block of gathered rows (which alone costs more than the work: 268 MB of
page-faulted memory at B=4096, k=32, d=512):

- gather-weighted-sum: ``embedding_bag`` with per-sample weights (gather and reduce fused);
- gather-dot: ``sparse.sampled_addmm`` over the (B, n) CSR pattern of ``idx`` (an SDDMM: one dot
  per stored entry; on CPU, duplicate and unsorted columns in a row are fine, each entry is
  independent); elsewhere, and for half types, row gathers in chunks and ``bmm``;
- scatter-outer-add: the same ``embedding_bag`` turned around: entries sorted by latent are the
  bags, the tokens' rows of ``g`` are what gets summed.

Half types accumulate in fp32 and are rounded once at the end: CPU's ``embedding_bag`` does so
itself (tested: a bf16 sum of 20,000 ones comes out as bf16(20000), not 256) and is 3.5x faster
than upcasting gathered blocks, which remains the path elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 16 * 2**20
"""Budget for the per-chunk (rows, k, d) fp32 block of the half-precision gathers, in bytes."""
_SPLIT_BYTES = 2**20
"""Block size when a few wide rows are split along their entries (about an L2 cache)."""
_MIN_ROWS = 8

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype to accumulate in: fp32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def latent_segments(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat entries of ``idx`` grouped by latent: (order, offsets).

    ``order`` lists flat positions ``b * k + j`` sorted by ``idx``; latent ``i``'s entries are
    ``order[offsets[i]:offsets[i + 1]]``. ``offsets`` has n + 1 entries. Shared by the torch and
    Triton scatters, which both reduce per latent instead of racing on atomics (deterministic).
    """
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # a fixed summation order within each latent
    offsets = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=offsets[1:])
    return order, offsets


def _blocks(batch: int, k: int, d: int) -> Iterator[tuple[slice, slice]]:
    """(row, entry) slices whose (rows, entries, d) fp32 block fits in ``_CHUNK_BYTES``.

    Whole rows when many fit (training batches), or when a row's block is small anyway. A few
    wide rows (decode: one token with thousands of active units) are split along their entries
    into blocks of ``_SPLIT_BYTES``, which stay in cache between the upcast and the product: at
    d = 4096 and 1638 active rows that is 2.6x faster than 16 MB blocks.
    """
    row_bytes = max(1, k * d * 4)
    rows = _CHUNK_BYTES // row_bytes
    if rows >= _MIN_ROWS or (rows >= 1 and row_bytes <= _SPLIT_BYTES):
        for start in range(0, batch, rows):
            yield slice(start, min(start + rows, batch)), slice(None)
        return
    cols = max(1, min(_CHUNK_BYTES, _SPLIT_BYTES) // max(1, d * 4))
    for row in range(batch):
        for start in range(0, k, cols):
            yield slice(row, row + 1), slice(start, min(start + cols, k))


def _gather_rows(W: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W[idx]`` of shape (*idx.shape, d) in ``dtype``."""
    return W.index_select(0, idx.reshape(-1)).view(*idx.shape, W.shape[1]).to(dtype)


def gather_weighted_sum(
    idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    acc = accumulation_dtype(dtype)
    fused = acc == dtype or W.device.type == "cpu"  # CPU's half-type bags accumulate in fp32
    if fused and dtype == W.dtype and idx.numel() > 0:
        return F.embedding_bag(idx, W, per_sample_weights=vals.to(dtype), mode="sum")
    # Half types off the CPU (or a W needing an upcast): upcast only the gathered rows, chunk by
    # chunk, rather than rely on how another device's embedding_bag accumulates half inputs.
    out = torch.zeros((idx.shape[0], W.shape[1]), dtype=acc, device=W.device)
    for rows, cols in _blocks(idx.shape[0], idx.shape[1], W.shape[1]):
        gathered = _gather_rows(W, idx[rows, cols], acc)
        out[rows] += torch.bmm(vals[rows, cols].to(acc).unsqueeze(1), gathered).squeeze(1)
    return out.to(dtype)


def _sampled_dot(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """SDDMM: ``<g[b], W[idx[b, j]]>`` for every entry, via a CSR matrix with idx's pattern."""
    batch, k = idx.shape
    crow = torch.arange(0, batch * k + 1, k, dtype=idx.dtype, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on one kernel
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), g.new_zeros(batch * k), (batch, W.shape[0]),
            check_invariants=False,  # idx is range-checked; columns need not be sorted or unique
        )
        out = torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0)
    return out.values().view(batch, k)


def gather_dot(
    idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    acc = accumulation_dtype(dtype)
    # CPU only: cuSPARSE's SDDMM may assume sorted, unique columns; gathers are fine on a GPU.
    if acc == dtype == g.dtype == W.dtype and idx.numel() > 0 and idx.device.type == "cpu":
        return _sampled_dot(idx, g, W)
    out = torch.empty(idx.shape, dtype=dtype, device=g.device)
    for rows, cols in _blocks(idx.shape[0], idx.shape[1], W.shape[1]):
        gathered = _gather_rows(W, idx[rows, cols], acc)
        out[rows, cols] = torch.bmm(gathered, g[rows].to(acc).unsqueeze(2)).squeeze(2)
    return out


def scatter_outer_add(
    idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n: int, dtype: torch.dtype
) -> torch.Tensor:
    acc = accumulation_dtype(dtype)
    if idx.numel() == 0:
        return torch.zeros((n, g.shape[1]), dtype=dtype, device=g.device)
    order, offsets = latent_segments(idx, n)
    tokens = order // idx.shape[1]
    weights = vals.reshape(-1)[order].to(acc)
    out = F.embedding_bag(tokens, g.to(acc), offsets[:-1], per_sample_weights=weights, mode="sum")
    return out.to(dtype)
