"""When a sparse MLP forward pays: a per-machine cost model, measured once per shape.

A sparse path costs a fixed part (Python dispatch, finding the active set, small kernels) plus
a part proportional to the weight rows it reads; the dense product costs the same whatever the
activations. Which wins depends on the CPU, the dtype, the layer's shape and the batch: at the
zoo's d = 128 the fixed part alone is several times the dense product, at a 7B layer the rows
dominate. So nothing is assumed: `calibrate` times the dense path and the sparse path at two row
counts on synthetic inputs (interleaved rounds, medians), once per (path, shape, dtype, device,
threads, batch bucket), and `CostModel` then decides each call from the number of rows that call
would read. Calibrations are kept for the process (`COSTS`), shared by every layer of a shape.

A sparse path is chosen only when its predicted time is under `MARGIN` times the dense one, so a
misjudged call near the crossover costs a few percent at most; and when even the fixed part is
over that, the dense path runs without looking at the activations at all.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

MARGIN = 0.85
"""A sparse path must be predicted to take under this share of the dense time to be used."""
CHECK_SHARE = 0.03
"""The per-call look at the activations (counting the active units) may cost at most this share of
the dense call; where it costs more (a zoo-sized layer at batch 64: ~10-25%), the default forward
runs dense without looking, since a check that costs more than 5% loses wherever dense wins."""
ROUNDS = 7
MIN_SAMPLE = 5e-3
"""Seconds each timing lasts at least (short calls are repeated): a single call of a zoo-sized
MLP (20-100 us) is shorter than the jitter of a loaded machine, and a calibration from single
calls there came out with a zero per-row cost. Timings are this thread's CPU time
(`time.thread_time`), not wall time: on an oversubscribed machine (load 12 on 2 cores) a process
runs a sixth of the time, and wall-clock samples of a few ms are mostly waiting for a core, which
made the zoo shape's sparse path look 3x cheaper than it is. CPU time still counts the cycles
stalled on memory, which is what the two paths differ in."""


@dataclass(frozen=True)
class CostModel:
    """Measured seconds per call at one batch bucket: ``sparse(rows) = fixed + per_row * rows``.

    Fields:
        dense: the dense path.
        fixed: the sparse path reading one row per token.
        per_row: each further weight row the sparse path reads.
        check: the per-call decision (counting the rows a call would read), paid on every call
            of a forward that decides per call.
    """

    dense: float
    fixed: float
    per_row: float
    check: float = 0.0

    @property
    def never_sparse(self) -> bool:
        """The sparse path cannot pay even at one row per token, or looking costs too much."""
        return self.fixed + self.check >= MARGIN * self.dense or self.check > CHECK_SHARE * self.dense

    def sparse(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    def use_sparse(self, rows: int) -> bool:
        return self.sparse(rows) < MARGIN * self.dense


COSTS: dict[Hashable, CostModel] = {}


def bucket(batch: int) -> int:
    """The power of two >= batch: calibrations are shared within it (measured at the bucket)."""
    return 1 << max(0, batch - 1).bit_length()


def _median_times(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """CPU seconds per call of each of ``fns``: medians over interleaved rounds, each sample a loop
    of enough calls to last `MIN_SAMPLE`."""
    samples: list[list[float]] = [[] for _ in fns]
    calls = []
    with torch.no_grad():
        for fn in fns:  # warm-up, then size the loop from a second call
            fn()
            start = time.thread_time()
            fn()
            calls.append(max(1, math.ceil(MIN_SAMPLE / max(time.thread_time() - start, 1e-7))))
        for _ in range(rounds):
            for fn, n, s in zip(fns, calls, samples, strict=True):
                start = time.thread_time()
                for _ in range(n):
                    fn()
                s.append((time.thread_time() - start) / n)
    return [statistics.median(s) for s in samples]


def calibrate(key: Hashable, dense: Callable[[], object], sparse_at: Callable[[int], Callable[[], object]],
              rows_low: int, rows_high: int, rounds: int = ROUNDS,
              check: Callable[[], object] | None = None) -> CostModel:
    """The cost model stored under ``key``, measuring it first if this process has not.

    Args:
        key: what the measurement depends on (path, shapes, dtype, device, threads, batch bucket).
        dense: one dense call.
        sparse_at: ``sparse_at(rows)`` is one sparse call reading ``rows`` weight rows in total.
        rows_low, rows_high: the two row counts timed (one per token, and more).
        check: one per-call decision, timed too when given.
    """
    if key not in COSTS:
        fns = [dense, sparse_at(rows_low), sparse_at(rows_high)] + ([check] if check else [])
        t_dense, t_low, t_high, *t_check = _median_times(fns, rounds)
        per_row = max(0.0, (t_high - t_low) / max(1, rows_high - rows_low))
        COSTS[key] = CostModel(t_dense, max(0.0, t_low - per_row * rows_low), per_row, sum(t_check))
    return COSTS[key]
