"""Dense MLP against activation-sparse MLP forwards, side by side, on this CPU.

For each shape (the zoo model's d=128, d_ff=512 and a 7B model's d=4096, d_ff=16384, one
layer), dtype (fp32, bf16), batch (1, 8, 64) and density (3/10/25/50% and, with --measured, the
per-layer densities a `saelab sparsity` report measured on the zoo), it times in interleaved
rounds (background load hits every contender alike) the median of:

- down dense:  ``h @ W_out + b_out`` (addmm), the reference;
- down sparse: ``active_code(h)`` (finding the nonzeros, included) + ``sparse_mlp_down``, which
  reads only the active rows of W_out;
- down union:  one dense product over the union of the batch's active rows (gathered once);
  the batched alternative, identical to "down sparse" at batch 1 in what it reads;
- MLP dense:   ``relu(x @ W_in + b_in) @ W_out + b_out``;
- MLP + predictor: a rank-r predictor (``(x @ A) @ B + c > cut``, its cost included), then
  ``SparseMLP.active``: one gather-dot per predicted unit (up) and the gather-weighted-sum (down).

Hidden activations are synthetic: each token has round(density * d_ff) active units at random,
independently of the other tokens, so the union of a batch's active rows is 1 - (1 - density)^B
(real tokens overlap more: see `saelab sparsity`'s union table). The predictor has random weights
and a cut set so that it selects the target density; its accuracy is measured elsewhere
(`saelab sparsity`), here only its cost counts.

Printed beside each speedup: the FLOP ratio (dense / sparse FLOPs) and the memory bound
(dense / sparse weight bytes read, counting every distinct row of the batch once), which is the
limit at batch 1 where both products are memory-bound. What this does not show: GPU numbers
(Triton is only run under its interpreter here), and end-to-end decode speed of a whole model.

    python benchmarks/sparse_mlp.py [--threads 2] [--rounds 9] [--measured runs/sparsity/sparsity.json]

On a machine shared with other work, --threads 1 avoids the barrier waits that oversubscribed
multi-threaded GEMVs suffer (every contender alike, but not equally).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import cache

import torch

from saelab.kernels import SparseMLP, active_code, mask_code, sparse_mlp_down

SHAPES = {"zoo": (128, 512), "7B": (4096, 16384)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rank(d: int) -> int:
    return max(32, d // 16)


def _hidden(B: int, d_ff: int, density: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    k = max(1, round(density * d_ff))
    idx = torch.rand(B, d_ff, generator=gen).argsort(1)[:, :k]
    h = torch.zeros(B, d_ff)
    h.scatter_(1, idx, torch.rand(B, k, generator=gen) + 0.1)
    return h.to(dtype)


@cache
def weights(d: int, d_ff: int, dtype: torch.dtype) -> tuple[SparseMLP, torch.Tensor, torch.Tensor]:
    """One MLP layer and a rank-r predictor (A, B), made once per shape and dtype."""
    gen = torch.Generator().manual_seed(0)
    W_in = (torch.randn(d, d_ff, generator=gen) / d**0.5).to(dtype)
    W_out = (torch.randn(d_ff, d, generator=gen) / d_ff**0.5).to(dtype)
    mlp = SparseMLP.of(W_in, torch.zeros(d_ff, dtype=dtype), W_out, torch.zeros(d, dtype=dtype))
    r = _rank(d)
    A = (torch.randn(d, r, generator=gen) / d**0.5).to(dtype)
    B = (torch.randn(r, d_ff, generator=gen) / r**0.5).to(dtype)
    return mlp, A, B


def _union(h: torch.Tensor, W_out: torch.Tensor, b_out: torch.Tensor) -> torch.Tensor:
    cols = (h != 0).any(0).nonzero().squeeze(1)
    return torch.addmm(b_out, h.index_select(1, cols), W_out.index_select(0, cols))


def contenders(d: int, d_ff: int, B: int, density: float, dtype: torch.dtype) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(B)
    mlp, A, Bp = weights(d, d_ff, dtype)
    W_out, b_out = mlp.W_out, mlp.b_out
    x = torch.randn(B, d, generator=gen).to(dtype)
    h = _hidden(B, d_ff, density, dtype, gen)
    r = A.shape[1]
    c = torch.zeros(d_ff, dtype=dtype)
    probe = ((torch.randn(256, d, generator=gen).to(dtype) @ A) @ Bp).float().flatten()
    cut = probe.kthvalue(round((1 - density) * probe.numel())).values.item()

    def predicted() -> torch.Tensor:
        mask = torch.addmm(c, x @ A, Bp) > cut
        return mlp.active(x, *mask_code(mask))

    def down_sparse() -> torch.Tensor:
        return sparse_mlp_down(*active_code(h), W_out, b_out)

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "down dense": lambda: torch.addmm(b_out, h, W_out),
        "down sparse": down_sparse,
        "down union": lambda: _union(h, W_out, b_out),
        "MLP dense": lambda: mlp.dense(x),
        "MLP+predictor": predicted,
    }
    with torch.no_grad():
        computed = float((torch.addmm(c, x @ A, Bp) > cut).float().mean())
        for name in ("down sparse", "down union"):
            torch.testing.assert_close(fns[name]().float(), fns["down dense"]().float(), rtol=2e-2, atol=2e-2)
    union = 1 - (1 - density) ** B
    union_pred = 1 - (1 - computed) ** B
    info = {
        "rank": r, "computed": computed,
        "down_flops": 1 / density, "down_bound": 1 / union,
        "mlp_flops": (4 * d * d_ff) / (2 * r * (d + d_ff) + 4 * d * d_ff * computed),
        "mlp_bound": (2 * d * d_ff) / (r * (d + d_ff) + 2 * d * d_ff * union_pred),
    }
    return fns, info


def median_times(fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call; each round runs every contender once (enough calls to last
    `min_seconds`), so load changes hit them alike."""
    calls = {}
    with torch.no_grad():
        for name, fn in fns.items():  # warm up and size the inner loop
            fn()
            start = time.perf_counter()
            fn()
            calls[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-seconds", type=float, default=0.02, help="inner-loop length per timing")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--densities", nargs="+", type=float, default=[0.03, 0.10, 0.25, 0.50])
    p.add_argument("--measured", help="a sparsity.json whose per-layer densities are added")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    densities = [(f"{100 * x:g}%", x) for x in args.densities]
    if args.measured:
        report = json.loads(open(args.measured).read())
        densities += [(f"{report['model'].removeprefix('zoo:')} L{r['layer']} {100 * r['density']:.1f}%",
                       r["density"]) for r in report["layers"]]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("speedup = dense median / sparse median; flops = dense/sparse FLOPs; bound = dense/sparse "
          "weight bytes read (distinct rows of the batch)")
    head = (f"{'shape':>5} {'dtype':>5} {'B':>3} {'density':>19} | {'down dense':>10} {'sparse':>9} "
            f"{'speedup':>7} {'union':>9} {'speedup':>7} {'flops':>6} {'bound':>6} | {'MLP dense':>10} "
            f"{'+pred':>9} {'speedup':>7} {'flops':>6} {'bound':>6} {'computed':>8}")
    print(head)
    print("-" * len(head))
    rows = []
    for shape in args.shapes:
        d, d_ff = SHAPES[shape]
        for dname in args.dtypes:
            for B in args.batches:
                for label, density in densities:
                    fns, info = contenders(d, d_ff, B, density, DTYPES[dname])
                    t = median_times(fns, args.rounds, args.min_seconds)
                    down = t["down dense"] / t["down sparse"]
                    whole = t["MLP dense"] / t["MLP+predictor"]
                    rows.append({"shape": shape, "dtype": dname, "batch": B, "density": density,
                                 **t, **info})
                    union = t["down dense"] / t["down union"]
                    print(f"{shape:>5} {dname:>5} {B:>3} {label:>19} | {1e3 * t['down dense']:>8.3f}ms "
                          f"{1e3 * t['down sparse']:>7.3f}ms {down:>6.2f}x {1e3 * t['down union']:>7.3f}ms "
                          f"{union:>6.2f}x {info['down_flops']:>5.1f}x "
                          f"{info['down_bound']:>5.1f}x | {1e3 * t['MLP dense']:>8.3f}ms "
                          f"{1e3 * t['MLP+predictor']:>7.3f}ms {whole:>6.2f}x {info['mlp_flops']:>5.1f}x "
                          f"{info['mlp_bound']:>5.1f}x {100 * info['computed']:>7.1f}%", flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
