"""Exact row-wise top-k of a wide score matrix, faster than ``torch.topk`` on CPU.

``torch.topk`` on CPU copies every (value, index) pair of a row into a heap: a few ns per entry,
which at B=4096, n=8192 is 10-15% of the encoder matmul it follows, and more at larger n. Block
selection reads the matrix once with a vectorised max and runs ``topk`` on small rows only:

1. split each row into m contiguous blocks of s entries and take each block's max;
2. keep the k blocks with the largest maxima. The row's k largest entries all lie in them: if t
   is the k-th largest block max, k blocks hold an entry >= t, so the k-th largest entry v >= t,
   and every entry >= v sits in a block whose max is >= t (ties at t aside, which only decide
   among equal values, as they do in ``torch.topk``);
3. gather those k blocks' k * s entries and select among them the same way, until a row is
   short enough for ``topk``.

On CUDA ``torch.topk`` is used as it is.
"""

from __future__ import annotations

import torch


def _block_size(width: int, k: int) -> int | None:
    """Block size s for a row of ``width``: a power of two dividing it, with about 8 s blocks (so
    the block-max topk and the next level stay balanced) and at least 4k blocks (so each level
    shrinks the rows 4x). None when no s >= 4 qualifies: plain topk is then as good."""
    s = 1
    while width % (2 * s) == 0 and 8 * (2 * s) ** 2 <= width and 4 * k * (2 * s) <= width:
        s *= 2
    return s if s >= 4 else None


def _positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column positions of each row's k largest entries of the contiguous (B, width) ``scores``."""
    batch, width = scores.shape
    s = _block_size(width, k)
    if s is None:
        return scores.topk(k, dim=1, sorted=False).indices
    m = width // s
    blocks = scores.view(batch, m, s).amax(2).topk(k, dim=1, sorted=False).indices  # (B, k)
    rows = (blocks + torch.arange(0, batch * m, m, device=scores.device).unsqueeze(1)).view(-1)
    candidates = scores.view(batch * m, s).index_select(0, rows).view(batch, k * s)
    pos = _positions(candidates, k)  # candidates[b, i * s + t] = scores[b, blocks[b, i] * s + t]
    return blocks.gather(1, pos // s) * s + pos % s


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of each row's k largest entries of ``scores`` (B, n), in no set order.

    Selects the same values as ``scores.topk(k, sorted=False)`` (NaN counts as largest there and
    here); which index wins among equal values may differ.
    """
    if scores.device.type != "cpu":
        return scores.topk(k, dim=1, sorted=False).indices
    return _positions(scores.contiguous(), k)
