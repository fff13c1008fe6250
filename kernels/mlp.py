"""Activation-sparse MLPs: the down-projection over mostly-zero hidden activations.

An MLP's output is ``h @ W_out + b_out`` with ``h = act(x @ W_in + b_in)``. When most of ``h`` is
zero (ReLU MLPs: "The Lazy Neuron Phenomenon"), keep only each token's active units as a code
``(idx, vals)``; the down-projection is then the decoder's gather-weighted-sum over ``W_out``'s
rows, costing O(B k d) instead of O(B d_ff d), with the same sparse backward.

When the active set is known before the up-projection (predicted from ``x``, Deja Vu style), the
up-projection shrinks too: each active unit's pre-activation is one dot product of ``x`` with a
row of ``W_in.T``, the gather-dot primitive. ``SparseMLP`` holds the weights laid out once for
both paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from . import backend, native, torch_ops
from .autograd import sparse_decode
from .cost import COSTS, CostModel, bucket, calibrate
from .primitives import check_matrix, gather_dot
from .select import topk_indices


def mask_code(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, valid): each row's True columns of ``mask`` (B, d_ff), left-packed in column order.

    k is the largest count in any row (at least 1); shorter rows are padded with index 0 and
    ``valid`` False. Linear time (a cumulative sum and one scatter), no sort.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, d_ff), got {tuple(mask.shape)}")
    batch, width = mask.shape
    counts = mask.sum(1)
    k = max(1, int(counts.max())) if batch else 1
    if batch == 1:  # decode: one token, no padding
        idx = mask[0].nonzero().T
        idx = idx if idx.numel() else idx.new_zeros(1, 1)
        return idx, mask.new_ones(idx.shape) if counts[0] else mask.new_zeros(1, 1)
    pos = torch.where(mask, mask.cumsum(1) - 1, k)  # inactive columns land in a spare slot
    cols = torch.arange(width, device=mask.device).expand(batch, width)
    idx = torch.zeros(batch, k + 1, dtype=torch.long, device=mask.device).scatter_(1, pos, cols)[:, :k]
    valid = torch.arange(k, device=mask.device) < counts.unsqueeze(1)
    return idx, valid


def padded_rows(mask: torch.Tensor) -> int:
    """Weight rows the sparse path reads for ``mask`` (B, d_ff): `mask_code` pads every token to
    the batch's largest count, so this (not the number of nonzeros) is what its cost grows with."""
    return mask.shape[0] * int(mask.sum(1).max()) if mask.numel() else 0


def active_code(h: torch.Tensor, k: int | None = None,
                threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, vals) holding each row's active entries of ``h`` (B, d_ff): those with |h| > threshold.

    With ``k=None`` the code is exact: k is the largest number of active entries in any row and
    rows with fewer are padded with zero values. ``threshold`` 0 keeps exactly the nonzeros (ReLU);
    smooth activations (GELU, SiLU) are never exactly zero and need a magnitude. A smaller ``k``
    keeps the k largest ``|h|`` per row (statistical / top-k activation sparsity).
    """
    if k is None:
        idx, valid = mask_code(active_mask(h, threshold))
        if h.shape[0] == 1:  # decode: idx holds exactly the active units
            return idx, h[:, idx[0]] * valid if idx.shape[1] == 1 else h[:, idx[0]]
        return idx, h.gather(1, idx) * valid
    idx = topk_indices(h.abs(), k)
    return idx, h.gather(1, idx)


def active_mask(h: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """|h| > threshold; for threshold 0 the cheaper h != 0 (the same set)."""
    return h != 0 if threshold == 0 else h.abs() > threshold


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


CALIBRATION_BYTES = 256 * 2**20
"""Most weight bytes one calibration call of the sparse path may read."""

_LAYOUT_SENSITIVE = (torch.float16, torch.bfloat16)
"""Dtypes whose CPU GEMV is only fast with the reduced dimension contiguous (``F.linear``'s
weight layout): ``h @ W_out`` with W_out (d_ff, d) in bf16 ran 47x slower than ``F.linear(h,
W_out.T.contiguous())`` on an AVX2 CPU; fp32 is the same either way."""


@dataclass(frozen=True)
class SparseMLP:
    """An MLP ``act(x @ W_in + b_in) @ W_out + b_out`` with activation-sparse forward passes.

    Build it with `SparseMLP.of` (which lays the weights out once). Calling it, ``mlp(x)``, picks
    the dense or the sparse down-projection per call from a cost model measured once on this
    machine (`saelab.kernels.cost`), so it is never much slower than `dense` and as fast as
    `sparse_down` where that wins. The forwards it chooses from, all (B, d) -> (B, d): `dense`
    (the reference), `sparse_down` (dense up-projection, down-projection over each token's active
    rows of ``W_out`` only); also `union_down` (the same over the union of the batch's active
    rows, one dense product) and `active` (both projections over a given set, e.g. predicted).
    ``act`` must map 0 to 0 (ReLU, GELU, SiLU do), so units left out contribute nothing.

    Fields:
        W_in: (d, d_ff), as transformer-lens holds it.
        W_in_rows: (d_ff, d), ``W_in.T`` contiguous: one row per unit, for the gather-dot and the
            dense up-projection (``F.linear``'s fast layout).
        b_in: (d_ff,) or None.
        W_out: (d_ff, d), one row per unit.
        b_out: (d,) or None.
        act: the hidden activation.
        threshold: a unit is active when |h| > threshold. 0 (exact zeros) is exact for ReLU; for
            smooth activations the sparse paths drop units with |h| <= threshold, an approximation
            whose loss cost `saelab sparsity` measures.
        W_out_cols: (d, d_ff), ``W_out.T`` contiguous, for the dense down-projection of half
            dtypes (see `_LAYOUT_SENSITIVE`); None otherwise.
        _dense_batches: batch sizes where the cost model says the sparse path never pays (the
            zoo's shape): `__call__` runs the dense computation inline there, reading only the
            batch size (a further call frame and a dict lookup cost 2-5% of a 27 us zoo-sized
            call; building the process-wide cost key per call cost ~20%).
        _routes: by batch size, the per-call decision `_auto` bound to its cost model, for the
            other batch sizes. Both are filled on a batch size's first call (`route`).
    """

    W_in: torch.Tensor
    W_in_rows: torch.Tensor
    b_in: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor] = torch.relu
    threshold: float = 0.0
    W_out_cols: torch.Tensor | None = None
    _dense_batches: set[int] = field(default_factory=set, compare=False, repr=False)
    _routes: dict[int, Callable[[torch.Tensor], torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, W_in: torch.Tensor, b_in: torch.Tensor | None, W_out: torch.Tensor,
           b_out: torch.Tensor | None, act: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
           threshold: float = 0.0) -> SparseMLP:
        check_matrix("W_in", W_in, (None, None))
        check_matrix("W_out", W_out, (W_in.shape[1], W_in.shape[0]))
        if threshold < 0:
            raise ValueError(f"threshold is a magnitude and must be >= 0, got {threshold}")
        cols = W_out.T.contiguous() if W_out.dtype in _LAYOUT_SENSITIVE else None
        return cls(W_in, W_in.T.contiguous(), b_in, W_out.contiguous(), b_out, act, threshold, cols)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, self.W_in_rows, self.b_in))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """The dense down-projection ``h @ W_out + b_out``."""
        if self.W_out_cols is not None:
            return F.linear(h, self.W_out_cols, self.b_out)
        return h @ self.W_out if self.b_out is None else torch.addmm(self.b_out, h, self.W_out)

    def down_sparse(self, h: torch.Tensor) -> torch.Tensor:
        """The down-projection over each token's active rows of W_out only (|h| > threshold): on
        CPU with the compiled kernel, straight from ``h`` (`native.masked_down`, no gradient);
        else the differentiable `sparse_mlp_down` over `active_code`."""
        if self._masked(h):
            out = native.masked_down(h, self.W_out, self.threshold)
            return out if self.b_out is None else out + self.b_out
        return sparse_mlp_down(*active_code(h, threshold=self.threshold), self.W_out, self.b_out)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))

    def sparse_down(self, x: torch.Tensor) -> torch.Tensor:
        """Dense up-projection; the down-projection reads only the rows of active units."""
        return self.down_sparse(self.hidden(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`dense` or `sparse_down`, whichever the measured cost model predicts faster (see
        `_auto`); at batch sizes where sparse never pays, the dense computation itself."""
        if x.shape[0] in self._dense_batches:  # inline: no frame or lookup beyond this test
            return self.down(self.hidden(x))
        return self.route(x.shape[0])(x)

    def route(self, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward `mlp(x)` runs for ``batch`` tokens, decided on the batch size's first use:
        `dense` itself where the cost model says the sparse path never pays, else `_auto` (a
        decision per call). A loop whose batch size is fixed can bind it once and call it."""
        if batch in self._dense_batches:
            return self.dense
        route = self._routes.get(batch)
        if route is None:
            costs = self.costs(batch)
            if costs.never_sparse:
                self._dense_batches.add(batch)
                return self.dense
            route = self._routes[batch] = partial(self._auto, costs)
        return route

    def reset_routes(self) -> None:
        """Forget the per-batch-size decisions (after `saelab.kernels.cost.COSTS.clear()`, to
        re-measure on a machine whose load changed)."""
        self._dense_batches.clear()
        self._routes.clear()

    def _auto(self, costs: CostModel, x: torch.Tensor) -> torch.Tensor:
        """Per call: the sparse down-projection when the cost model predicts it faster for the rows
        it would read (the active units; tokens times the most active token's count where the
        code is padded; the up-projection is common to both)."""
        h = self.hidden(x)
        return self.down_sparse(h) if self._pays(costs, h) else self.down(h)

    def sparse_pays(self, h: torch.Tensor) -> bool:
        """Whether the default forward takes the sparse down-projection for hidden activations ``h``."""
        costs = self.costs(h.shape[0])
        return not costs.never_sparse and self._pays(costs, h)

    def _pays(self, costs: CostModel, h: torch.Tensor) -> bool:
        if self._masked(h):  # one compiled pass: the check runs on every call
            return costs.use_sparse(native.count_active(h, self.threshold))
        return costs.use_sparse(padded_rows(active_mask(h, self.threshold)))

    def _masked(self, h: torch.Tensor) -> bool:
        """Whether `down_sparse` runs the compiled loop on ``h``, which reads each token's own
        active rows (no padding to the batch's largest count)."""
        return native.usable_masked(h, self.W_out) and backend.select(h.device) is torch_ops

    def costs(self, batch: int) -> CostModel:
        """The down-projection's cost model for ``batch`` tokens (measured on first use)."""
        d_ff, d = self.W_out.shape
        size = bucket(batch)
        key = ("down", d, d_ff, self.W_out.dtype, self.W_out.device, torch.get_num_threads(), size)
        if key in COSTS:
            return COSTS[key]
        gen = torch.Generator(device=self.W_out.device).manual_seed(0)
        dtype, device = self.W_out.dtype, self.W_out.device

        def hidden(per_token: int) -> torch.Tensor:
            """(size, d_ff) activations with `per_token` random units at 1 per token."""
            scores = torch.rand(size, d_ff, generator=gen, device=device)
            idx = scores.topk(per_token, dim=1).indices
            return torch.zeros(size, d_ff, dtype=dtype, device=device).scatter_(1, idx, 1.0)

        # the high point: at least an eighth of the units per token (a batch's rows are priced
        # from it; half of dense's bytes spread over 64 tokens, 4 units each at the zoo's shape,
        # left 10% density far outside the measured range), within CALIBRATION_BYTES per call
        cap = max(1, CALIBRATION_BYTES // (size * d * self.W_out.element_size()))
        high = max(1, min(max(d_ff // (2 * size), d_ff // 8), cap))
        dense_h = hidden(high)
        return calibrate(key, lambda: self.down(dense_h),
                         lambda rows: partial(self.down_sparse, hidden(rows // size)),
                         size, high * size, check=partial(self._pays, CostModel(1.0, 0.0, 0.0), dense_h))

    def union_down(self, x: torch.Tensor) -> torch.Tensor:
        """Dense up-projection; one dense product over the rows of W_out active on any token.

        The batched alternative to `sparse_down`: each row is read once for the whole batch, so
        it wins when tokens share active units, and tends to dense as the union grows.
        """
        h = self.hidden(x)
        mask = active_mask(h, self.threshold)
        h = h if self.threshold == 0 else h * mask
        cols = mask.any(0).nonzero().squeeze(1)
        out = h.index_select(1, cols) @ self.W_out.index_select(0, cols)
        return out if self.b_out is None else out + self.b_out

    def active(self, x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP computed on the units ``idx`` (B, k) of each token only (``valid`` masks padding).

        Equals `dense` with every other unit's activation set to zero.
        """
        pre = gather_dot(idx, x, self.W_in_rows)
        if self.b_in is not None:
            pre = pre + self.b_in[idx]
        vals = self.act(pre)
        if valid is not None:
            vals = vals * valid
        return sparse_mlp_down(idx, vals, self.W_out, self.b_out)
