"""Dense MLP against activation-sparse MLP forwards, side by side, on this CPU.

For each shape (the zoo model's d=128, d_ff=512 and a 7B model's d=4096, d_ff=16384, one
layer), dtype (fp32, bf16), batch (1, 8, 64) and density (3/10/25/50% and, with --measured, the
per-layer densities a `saelab sparsity` report measured on the zoo), it times in interleaved
rounds (background load hits every contender alike) each of the following; a speedup is the
median over rounds of the two contenders' time ratio:

- down dense:  ``SparseMLP.down(h)``, ``h @ W_out + b_out`` in the layout the dense GEMV is fast
  in (``F.linear``'s for bf16: ``h @ W_out`` in bf16 is ~47x slower on an AVX2 CPU);
- down sparse: ``SparseMLP.down_sparse(h)``: finding the active units (included) and the
  gather-weighted-sum over their rows of W_out only (the compiled loop of
  `saelab.kernels.native` when it builds, ``embedding_bag`` otherwise: the first line says which;
  ``SAELAB_NATIVE=0`` times the fallback);
- MLP dense:   ``SparseMLP.dense(x)``, both projections dense: the computation a model's dense
  MLP runs, called the way a model calls its MLP (one Python call, ``mlp.dense(x)``, as auto's
  is ``mlp(x)``), with no further layer (an ``nn.Module``'s ``__call__`` would add ~1-5 us to
  both): the strictest baseline for what auto's dispatch adds;
- MLP sparse:  ``SparseMLP.sparse_down(x)``, dense up-projection, sparse down-projection;
- MLP auto:    ``mlp(x)``, the default forward: dense or sparse per call from the cost model it
  calibrated once on this machine (`saelab.kernels.cost`; the calibration runs before the timed
  rounds); where sparse never pays, the dense computation inline after one test of the batch size;
- MLP + predictor: a rank-r predictor (``(x @ A) @ B + c > cut``, its cost included), then
  ``SparseMLP.active``: one gather-dot per predicted unit (up) and the gather-weighted-sum (down).

Every call reads a different input, rotating over enough draws that their active rows add up to
4x the last-level cache (`ROTATION_BYTES`): a decode step never finds the previous token's rows
in cache (other layers ran in between), so repeating one input would flatter the sparse path
(10% of a 7B W_out in fp32 is 27 MB, under this machine's 32 MB L3).

Inputs are synthetic: x ~ N(0, 1), W_in ~ N(0, 1/d) and b_in = -PhiInv(1 - density), so each
unit fires with probability `density`, independently across units and tokens; the union of a
batch's active rows is then 1 - (1 - density)^B (real tokens overlap more: see `saelab sparsity`'s
union table). For the down-projection columns h has exactly round(density * d_ff) active units
per token. The predictor has random weights and a cut set so that it selects the target density;
its accuracy is measured elsewhere (`saelab sparsity`), here only its cost counts.

Printed beside each speedup: the share of the ideal it reaches (ideal = dense / sparse weight
bytes, counting every distinct row of the batch once: 1 / density at batch 1), the bytes each
path reads per token and the bandwidth it achieved, against this machine's measured copy
bandwidth (read + write of a 256 MB buffer) and read bandwidth (a sum over it). "auto" is dense
time / auto time: at most 1.05x the dense time means >= 0.952. ``--auto-rounds`` repeats auto
against dense alone in many short paired rounds, timed in this thread's CPU time at one thread
(both compute in this thread and wait on nothing else; wall time would add the waits for a core
that other work on a shared machine causes), wall time otherwise. What this does not show: GPU
numbers (Triton is only run under its interpreter here).

    python benchmarks/sparse_mlp.py [--threads 1] [--rounds 7] [--measured runs/sparsity/sparsity.json]
        [--auto-rounds 101]   # + auto against dense alone in many short paired rounds

On a machine shared with other work, --threads 1 avoids the barrier waits that oversubscribed
multi-threaded GEMVs suffer (every contender alike, but not equally).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from saelab.kernels import SparseMLP, mask_code, native
from saelab.storage.files import write_json

SHAPES = {"zoo": (128, 512), "7B": (4096, 16384)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROTATION_BYTES = 128 * 2**20
"""Inputs rotate until their active rows add up to this (4x a 32 MB L3), at least `MIN_VARIANTS`."""
MIN_VARIANTS = 6


def _rank(d: int) -> int:
    return max(32, d // 16)


def _hidden(B: int, d_ff: int, density: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    k = max(1, round(density * d_ff))
    idx = torch.rand(B, d_ff, generator=gen).argsort(1)[:, :k]
    h = torch.zeros(B, d_ff)
    h.scatter_(1, idx, torch.rand(B, k, generator=gen) + 0.1)
    return h.to(dtype)


@cache
def weights(d: int, d_ff: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One MLP layer's W_in, W_out and a rank-r predictor (A, B), made once per shape and dtype."""
    gen = torch.Generator().manual_seed(0)
    W_in = (torch.randn(d, d_ff, generator=gen) / d**0.5).to(dtype)
    W_out = (torch.randn(d_ff, d, generator=gen) / d_ff**0.5).to(dtype)
    r = _rank(d)
    A = (torch.randn(d, r, generator=gen) / d**0.5).to(dtype)
    B = (torch.randn(r, d_ff, generator=gen) / r**0.5).to(dtype)
    return W_in, W_out, A, B


@cache
def layer(d: int, d_ff: int, dtype: torch.dtype, density: float) -> SparseMLP:
    """The layer with b_in = -PhiInv(1 - density): each unit fires with probability `density`."""
    W_in, W_out, _, _ = weights(d, d_ff, dtype)
    shift = statistics.NormalDist().inv_cdf(1 - density)
    return SparseMLP.of(W_in, torch.full((d_ff,), -shift, dtype=dtype), W_out, torch.zeros(d, dtype=dtype))


def _rotating(fn: Callable[[torch.Tensor], torch.Tensor],
              inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    turn = itertools.cycle(inputs)
    return lambda: fn(next(turn))


def contenders(d: int, d_ff: int, B: int, density: float, dtype: torch.dtype) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(B)
    _, _, A, Bp = weights(d, d_ff, dtype)
    mlp = layer(d, d_ff, dtype, density)
    elem = torch.finfo(dtype).bits // 8
    k = max(1, round(density * d_ff))
    variants = min(64, max(MIN_VARIANTS, math.ceil(ROTATION_BYTES / (B * k * d * elem))))
    xs = [torch.randn(B, d, generator=gen).to(dtype) for _ in range(variants)]
    hs = [_hidden(B, d_ff, density, dtype, gen) for _ in range(variants)]
    c = torch.zeros(d_ff, dtype=dtype)
    probe = ((torch.randn(256, d, generator=gen).to(dtype) @ A) @ Bp).float().flatten()
    cut = probe.kthvalue(round((1 - density) * probe.numel())).values.item()

    A_rows, B_rows = A.T.contiguous(), Bp.T.contiguous()  # F.linear's layout (fast for bf16)

    def predicted(x: torch.Tensor) -> torch.Tensor:
        mask = F.linear(F.linear(x, A_rows), B_rows, c) > cut
        return mlp.active(x, *mask_code(mask))

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "down dense": _rotating(mlp.down, hs),
        "down sparse": _rotating(mlp.down_sparse, hs),
        "MLP dense": _rotating(mlp.dense, xs),
        "MLP auto": _rotating(mlp, xs),
        "MLP sparse": _rotating(mlp.sparse_down, xs),
        "MLP+predictor": _rotating(predicted, xs),
    }
    with torch.no_grad():
        computed = float((torch.addmm(c, xs[0] @ A, Bp) > cut).float().mean())
        mlp.costs(B)  # the one-time calibration, here rather than in the timed warm-up
        hiddens = [mlp.hidden(x) for x in xs]  # once (a bf16 7B up-projection at batch 64: ~1 s)
        picks = [mlp.sparse_pays(h) for h in hiddens]
        natural = float(torch.cat(hiddens).ne(0).float().mean())
        ref = mlp.down(hs[0]).float()
        torch.testing.assert_close(mlp.down_sparse(hs[0]).float(), ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(mlp(xs[0]).float(), mlp.dense(xs[0]).float(), rtol=2e-2, atol=2e-2)
    union = 1 - (1 - density) ** B
    union_pred = 1 - (1 - computed) ** B
    info = {
        "rank": A.shape[1], "computed": computed, "natural": natural,
        "auto_sparse_share": sum(picks) / len(picks),
        "down_bound": 1 / union,
        "dense_bytes_per_token": d_ff * d * elem / B, "sparse_bytes_per_token": k * d * elem,
        "mlp_bound": (2 * d * d_ff) / (A.shape[1] * (d + d_ff) + 2 * d * d_ff * union_pred),
    }
    return fns, info


def bandwidth() -> tuple[float, float]:
    """(copy, read) GB/s: median of 5 copies of a 256 MB fp32 buffer (bytes read + written), and
    of 5 sums over it (bytes read)."""
    src = torch.ones(2**26)
    dst = torch.empty_like(src)
    copies, reads = [], []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        reads.append(time.perf_counter() - start)
    size = src.numel() * 4
    return 2 * size / statistics.median(copies) / 1e9, size / statistics.median(reads) / 1e9


def round_times(fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every contender in every round; each round runs every contender once
    (enough calls to last `min_seconds`), in a new random order, so load changes hit them alike.
    On a loaded machine a process runs in time slices of a few ms: timings much shorter than that
    depend on where the slice ends, so keep `min_seconds` well above it."""
    calls = {}
    with torch.no_grad():
        for name, fn in fns.items():  # warm up and size the inner loop
            fn()
            start = clock()
            fn()
            calls[name] = max(1, int(min_seconds / max(clock() - start, 1e-7)))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)  # no contender keeps one place in the scheduler's time slices
            for name in order:
                fn = fns[name]
                start = clock()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((clock() - start) / calls[name])
    return samples


def speedup(samples: dict[str, list[float]], ref: str, name: str) -> float:
    """Median over rounds of ref's time / name's time: each ratio pairs two timings taken moments
    apart, so it drifts less with the load than a ratio of the two medians."""
    return statistics.median(r / t for r, t in zip(samples[ref], samples[name], strict=True))


def _auto_paired(fns: dict[str, Callable[[], object]], rounds: int, seconds: float,
                 clock: Callable[[], float]) -> list[float]:
    """MLP auto against MLP dense alone, many short paired rounds: the ratio's quartiles, printed."""
    samples = round_times({n: fns[n] for n in ("MLP dense", "MLP auto")}, rounds, seconds, clock)
    ratios = [d / a for d, a in zip(samples["MLP dense"], samples["MLP auto"], strict=True)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    print(f"{'':>37}auto alone, {rounds} paired rounds of {seconds:g} s {_CLOCKS[clock]}: dense / auto "
          f"median {q2:.3f}x (quartiles {q1:.3f}-{q3:.3f}) | {os.getloadavg()[0]:.1f}", flush=True)
    return [q1, q2, q3]


_CLOCKS = {time.thread_time: "CPU time", time.perf_counter: "wall time"}


def _pick(share: float) -> str:
    """What auto ran on this row's inputs: sparse, dense, or a mix (the share sparse)."""
    return "dense" if share == 0 else "sparse" if share == 1 else f"{100 * share:.0f}%S"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-seconds", type=float, default=0.2, help="inner-loop length per timing")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--densities", nargs="+", type=float, default=[0.03, 0.10, 0.25, 0.50])
    p.add_argument("--measured", help="a sparsity.json whose per-layer densities are added")
    p.add_argument("--auto-rounds", type=int, default=0,
                   help="also time MLP auto against MLP dense alone in this many paired rounds of "
                        "--auto-seconds each, and print the ratio's median and quartiles")
    p.add_argument("--auto-seconds", type=float, default=0.02)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # one thread: the thread's CPU time, which leaves out the waits for a core that a shared
    # machine adds to wall time (both contenders compute in this thread and wait on nothing else)
    paired_clock = time.thread_time if args.threads == 1 else time.perf_counter
    densities = [(f"{100 * x:g}%", x) for x in args.densities]
    if args.measured:
        report = json.loads(Path(args.measured).read_text())
        densities += [(f"{report['model'].removeprefix('zoo:')} L{r['layer']} {100 * r['density']:.1f}%",
                       r["density"]) for r in report["layers"]]
    copy_bw, read_bw = bandwidth()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs; load average before: {_load()}; "
          f"copy bandwidth {copy_bw:.1f} GB/s (read + write), read bandwidth {read_bw:.1f} GB/s; "
          f"compiled gather (saelab.kernels.native): {native.status()}")
    print("speedup = median over rounds of dense time / sparse time (ms columns: medians); "
          "%ideal = speedup / bound, bound = dense / sparse "
          "weight bytes (distinct rows of the batch); KB/tok = weight bytes read per token; GB/s = "
          "bytes read / time; auto = MLP dense / MLP auto (>= 0.952: within 1.05x of dense), picks = "
          "the path auto took on this row's inputs")
    head = (f"{'shape':>5} {'dtype':>5} {'B':>3} {'density':>19} | {'down dense':>10} {'sparse':>9} "
            f"{'speedup':>7} {'%ideal':>6} {'KB/tok':>13} {'GB/s':>11} | {'MLP dense':>10} "
            f"{'sparse':>9} {'speedup':>7} {'auto':>6} {'picks':>5} {'+pred':>9} {'speedup':>7} "
            f"{'bound':>6} | load")
    print(head)
    print("-" * len(head))
    rows = []
    for shape in args.shapes:
        d, d_ff = SHAPES[shape]
        for dname in args.dtypes:
            for B in args.batches:
                for label, density in densities:
                    fns, info = contenders(d, d_ff, B, density, DTYPES[dname])
                    samples = round_times(fns, args.rounds, args.min_seconds)
                    t = {name: statistics.median(x) for name, x in samples.items()}
                    down = speedup(samples, "down dense", "down sparse")
                    ups = {name: speedup(samples, "MLP dense", name)
                           for name in ("MLP sparse", "MLP auto", "MLP+predictor")}
                    rows.append({"shape": shape, "dtype": dname, "batch": B, "density": density,
                                 "copy_GBps": copy_bw, "read_GBps": read_bw, "load": os.getloadavg()[0],
                                 **t, **{f"speedup {n}": u for n, u in ups.items()},
                                 "speedup down sparse": down, **info})
                    kb = (f"{info['dense_bytes_per_token'] / 1e3:.0f}/"
                          f"{info['sparse_bytes_per_token'] / 1e3:.0f}")
                    dense_bw = info["dense_bytes_per_token"] * B / t["down dense"] / 1e9
                    sparse_bw = info["sparse_bytes_per_token"] * B / t["down sparse"] / 1e9
                    print(f"{shape:>5} {dname:>5} {B:>3} {label:>19} | {1e3 * t['down dense']:>8.3f}ms "
                          f"{1e3 * t['down sparse']:>7.3f}ms {down:>6.2f}x "
                          f"{100 * down / info['down_bound']:>5.0f}% "
                          f"{kb:>13} "
                          f"{f'{dense_bw:.1f}/{sparse_bw:.1f}':>11} | {1e3 * t['MLP dense']:>8.3f}ms "
                          f"{1e3 * t['MLP sparse']:>7.3f}ms {ups['MLP sparse']:>6.2f}x "
                          f"{ups['MLP auto']:>5.2f}x {_pick(info['auto_sparse_share']):>5} "
                          f"{1e3 * t['MLP+predictor']:>7.3f}ms "
                          f"{ups['MLP+predictor']:>6.2f}x {info['mlp_bound']:>5.1f}x | "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
                    if args.auto_rounds:
                        rows[-1]["auto_paired"] = _auto_paired(fns, args.auto_rounds, args.auto_seconds,
                                                               paired_clock)
                        rows[-1]["auto_paired_clock"] = _CLOCKS[paired_clock]
    copy_bw, read_bw = bandwidth()
    print(f"load average after: {_load()}; copy bandwidth {copy_bw:.1f} GB/s, read {read_bw:.1f} GB/s")
    if args.json:
        write_json(Path(args.json), rows)


if __name__ == "__main__":
    main()
