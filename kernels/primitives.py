"""The three primitives over a k-sparse code: their contract, checks, and backend dispatch.

A k-sparse code is a pair ``(idx, vals)`` of shape (B, k): token ``b`` has value ``vals[b, j]``
on latent ``idx[b, j]``; duplicate indices in a row add up. Every primitive costs O(B k d) and
never builds the dense (B, n) code matrix, which is what keeps wide dictionaries (n >> d)
affordable. bf16/fp16 inputs are accumulated in fp32 and the result is rounded back once, so long
sums (large k, d or B) do not drift. Results come in the promoted dtype of the float inputs.

Each call validates shapes and dtypes, checks index ranges on CPU (where the torch op does not
do it itself; on CUDA a check would cost a device sync per call, so out-of-range indices there are
undefined behaviour, as in any gather), then runs the backend chosen by ``saelab.kernels.backend``.
On CPU the torch backend's gather-weighted-sum runs the compiled loop of ``saelab.kernels.native``
when it could be built (``SAELAB_NATIVE=0`` turns it off), ``embedding_bag`` otherwise.
"""

from __future__ import annotations

import torch

from . import backend, native, torch_ops


def check_code(idx: torch.Tensor, vals: torch.Tensor | None = None) -> None:
    """Fail early with a readable message instead of deep inside a kernel."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, k), got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an int64 or int32 tensor, got {idx.dtype}")
    if vals is not None and vals.shape != idx.shape:
        raise ValueError(
            f"vals shape {tuple(vals.shape)} does not match idx shape {tuple(idx.shape)}"
        )


def check_matrix(name: str, t: torch.Tensor, shape: tuple[int | None, int | None]) -> None:
    """Require a 2-D ``t`` whose sizes match ``shape`` (``None`` matches any size)."""
    if t.dim() != 2 or any(e is not None and s != e for s, e in zip(t.shape, shape, strict=True)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(t.shape)}")


def _check_range(idx: torch.Tensor, n: int) -> None:
    """Indices must lie in [0, n): negative ones must not wrap around (CPU only, see above)."""
    if idx.device.type == "cpu" and idx.numel() > 0:
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= n:
            raise IndexError(f"latent indices must lie in [0, {n}), found {lo.item()}..{hi.item()}")


def gather_weighted_sum(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Decode a k-sparse code: ``out[b] = sum_j vals[b, j] * W[idx[b, j]]``.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        vals: (B, k) values.
        W: (n, d) dictionary rows.

    Returns:
        (B, d) tensor in the promoted dtype of ``vals`` and ``W``.
    """
    check_code(idx, vals)
    check_matrix("W", W, (None, None))
    ops = backend.select(W.device)
    dtype = torch.promote_types(vals.dtype, W.dtype)
    if ops is torch_ops and native.usable(idx, W, dtype):  # the compiled CPU loop, when built
        _check_range(idx, W.shape[0])
        return native.gather_weighted_sum(idx, vals, W, dtype)
    if ops is not torch_ops:  # torch's embedding_bag / index_select reject bad indices themselves
        _check_range(idx, W.shape[0])
    return ops.gather_weighted_sum(idx, vals, W, dtype)


def gather_dot(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Dot each token with its selected rows: ``out[b, j] = <g[b], W[idx[b, j]]>``.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        g: (B, d) per-token vectors.
        W: (n, d) dictionary rows.

    Returns:
        (B, k) tensor in the promoted dtype of ``g`` and ``W``.
    """
    check_code(idx)
    check_matrix("g", g, (idx.shape[0], None))
    check_matrix("W", W, (None, g.shape[1]))
    _check_range(idx, W.shape[0])
    dtype = torch.promote_types(g.dtype, W.dtype)
    return backend.select(W.device).gather_dot(idx, g, W, dtype)


def scatter_outer_add(
    idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n: int
) -> torch.Tensor:
    """Scatter rank-1 updates: ``out[i] = sum_{(b, j): idx[b, j] = i} vals[b, j] * g[b]``.

    This is ``Z.T @ g`` for the dense code matrix ``Z``, the gradient of a dictionary.

    Args:
        idx: (B, k) latent indices in ``[0, n)``.
        vals: (B, k) values.
        g: (B, d) per-token vectors.
        n: number of latents (rows of the output).

    Returns:
        (n, d) tensor in the promoted dtype of ``vals`` and ``g``.
    """
    check_code(idx, vals)
    check_matrix("g", g, (idx.shape[0], None))
    _check_range(idx, n)
    dtype = torch.promote_types(vals.dtype, g.dtype)
    return backend.select(g.device).scatter_outer_add(idx, vals, g, n, dtype)
