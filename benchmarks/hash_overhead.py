"""What the per-shard SHA-256 of activation caches costs, measured side by side in one run.

Two places pay for it:
- `saelab cache`: each shard is serialised to a buffer, hashed and written (`digest="sha256"`),
  against writing it straight to its file with no hash (`digest=None`);
- training from a cache: each shard is read whole, hashed and checked before use, against the
  same cache with the hashes removed from its manifest (how caches built before hashing are
  read: the same whole-file read, no content check).

Contenders run in interleaved rounds (so background load hits both alike) and the median time of
each is reported with the ratio hashed / unhashed, both as process CPU time (all threads; the
better measure on a shared machine, where other processes stretch wall time at random) and as
wall time. Everything else (model forward, NaN checks,
shuffling, the SAE step) is the same code in both, so the ratio is the hash's cost. As the
ratios are close to 1 and a shared machine adds a few percent of noise to any timing, the
script also times SHA-256 alone over the same shard files and prints it as a share of each
unhashed run: the overhead the ratios should show, without the noise.

The training measurement drives the trainer's own step (`Trainer.step`) with `CacheStream`
batches, as `saelab train --cache` does, on the default dictionary of the zoo model
(16 x d_in latents, k=32, batch 4096); a larger dictionary (more compute per row, same bytes
per row) makes the ratio smaller, a wider hook with a small dictionary makes it larger.

    python benchmarks/hash_overhead.py [--tokens 65536] [--shard-rows 16384] [--rounds 7] [--epochs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


class Clock:
    """(process CPU seconds, wall seconds) of the body."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times = (time.process_time() - self.cpu, time.perf_counter() - self.wall)


def build(model, data, hook: str, out: Path, tokens: int, shard_rows: int, digest) -> tuple[float, float]:
    from saelab.data.cache import build_cache

    shutil.rmtree(out, ignore_errors=True)
    with Clock() as clock:
        build_cache(model, data, [hook], out, tokens, shard_rows=shard_rows, digest=digest)
    return clock.times


def train_from(cache: Path, hook: str, steps: int, batch: int, n: int, k: int) -> tuple[float, float]:
    from saelab.data.cache import CacheStream
    from saelab.sae import SAE, SAEConfig
    from saelab.sae_init import init_sae
    from saelab.training.config import OptimConfig
    from saelab.training.trainer import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unhashed copy warns that it is not checked
        stream = CacheStream(cache, hook, batch, seed=0, drop_last=True)
    batches = iter(stream)
    first = next(batches)
    sae = SAE(SAEConfig(d_in=first.shape[1], n_latents=n, k=k))
    init_sae(sae, first, seed=0)
    trainer = Trainer(sae, OptimConfig(batch_size=batch, tokens=steps * batch), steps)
    with Clock() as clock:
        for _ in range(steps):
            trainer.step(next(batches))
    return clock.times


def shard_io_times(cache: Path, hook: str, scratch: Path, rounds: int) -> dict[str, float]:
    """Median CPU seconds to write and to read one shard, with and without its hash: the
    steps hashing changes, timed apart from the model and the SAE (whose noise on a shared
    machine is larger than the hash)."""
    from saelab.storage.files import read_safetensors, write_safetensors

    src = sorted(cache.glob("shard_*.safetensors"))[0]
    tensors, _ = read_safetensors(src)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    scratch.mkdir()
    out: dict[str, list[float]] = {}
    for r in range(rounds):
        for digest in (("sha256", None) if r % 2 == 0 else (None, "sha256")):
            with Clock() as clock:
                write_safetensors(scratch / "s.safetensors", tensors, digest=digest)
            out.setdefault(f"write {digest or 'none'}", []).append(clock.times[0])
            expect = ("sha256", want) if digest else None
            with Clock() as clock:
                read_safetensors(src, [hook], expect=expect, whole=True)
            out.setdefault(f"read {digest or 'none'}", []).append(clock.times[0])
    return {key: statistics.median(v) for key, v in out.items()}


def strip_hashes(src: Path, dst: Path) -> None:
    from saelab.data.cache import DIGEST, MANIFEST

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    for s in m["shards"]:
        s.pop(DIGEST)
    (dst / MANIFEST).write_text(json.dumps(m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="rows cached per build")
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3, help="epochs over the cache per training run "
                    "(every epoch reads and checks every shard again)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier CPU times)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saelab.data.tokens import TokenData
    from saelab.models import load_model
    from saelab.zoo import DEFAULT_MODEL

    model = load_model(DEFAULT_MODEL)
    hook = model.default_hook
    data = TokenData(context_length=128)
    batch, k = 4096, 32
    tmp = Path(tempfile.mkdtemp(prefix="saelab-hash-bench-"))
    try:
        times: dict[str, list[tuple[float, float]]] = {"cache sha256": [], "cache none": [],
                                         "train sha256": [], "train none": []}
        build(model, data, hook, tmp / "warm", args.shard_rows, args.shard_rows, "sha256")  # warm-up
        for r in range(args.rounds):
            order = ("sha256", None) if r % 2 == 0 else (None, "sha256")
            for digest in order:
                t = build(model, data, hook, tmp / f"c-{digest}", args.tokens, args.shard_rows, digest)
                times[f"cache {digest or 'none'}"].append(t)
        hashed = tmp / "c-sha256"
        strip_hashes(hashed, tmp / "c-stripped")
        blobs = [f.read_bytes() for f in sorted(hashed.glob("shard_*.safetensors"))]
        shard_io = shard_io_times(hashed, hook, tmp / "io", args.rounds)
        for _ in range(args.rounds):
            with Clock() as clock:
                for b in blobs:
                    hashlib.sha256(b).digest()
            times.setdefault("sha256 alone", []).append(clock.times)
        d_in = model.hook_dims([hook])[hook]
        n = 16 * d_in
        steps = args.epochs * (args.tokens // batch) - 1  # after the init batch
        train_from(hashed, hook, 2, batch, n, k)  # warm-up
        for r in range(args.rounds):
            order = (hashed, tmp / "c-stripped") if r % 2 == 0 else (tmp / "c-stripped", hashed)
            for cache in order:
                t = train_from(cache, hook, steps, batch, n, k)
                times["train sha256" if cache == hashed else "train none"].append(t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {key: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
           for key, v in times.items()}
    mb = args.tokens * d_in * 4 / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved "
          "rounds, median seconds (CPU | wall)")

    def row(what: str) -> str:
        h, u = med[f"{what} sha256"], med[f"{what} none"]
        paired = statistics.median(a[0] / b[0] for a, b in zip(times[f"{what} sha256"],
                                                               times[f"{what} none"], strict=True))
        return (f"  hashed {h[0]:.2f} | {h[1]:.2f} s   unhashed {u[0]:.2f} | {u[1]:.2f} s   "
                f"ratio CPU {h[0] / u[0]:.3f} (median of per-round ratios {paired:.3f})   "
                f"wall {h[1] / u[1]:.3f}")

    print(f"saelab cache: {args.tokens} rows of {hook} (d={d_in}, float32, {mb:.0f} MiB) in shards of "
          f"{args.shard_rows} rows")
    print(row("cache"))
    print(f"train from cache: {steps} steps of {batch} rows ({args.epochs} epochs), TopK n={n} k={k}")
    print(row("train"))
    alone = med["sha256 alone"][0]
    print(f"sha256 alone over the {len(blobs)} shard files: {alone:.3f} s CPU "
          f"({sum(map(len, blobs)) / alone / 1e9:.2f} GB/s) = {alone / med['cache none'][0]:.1%} of the "
          f"unhashed cache build, {args.epochs * alone / med['train none'][0]:.1%} of the unhashed "
          f"training ({args.epochs} reads of each shard)")
    io = shard_io
    n_shards = len(blobs)
    print(f"one shard ({args.shard_rows} rows), CPU ms: write hashed {io['write sha256'] * 1e3:.1f} vs "
          f"{io['write none'] * 1e3:.1f}, read hashed {io['read sha256'] * 1e3:.1f} vs "
          f"{io['read none'] * 1e3:.1f}")
    extra_cache = n_shards * (io["write sha256"] - io["write none"])
    extra_train = args.epochs * n_shards * (io["read sha256"] - io["read none"])
    print(f"  so hashing adds {extra_cache:.3f} s = {extra_cache / med['cache none'][0]:.1%} to the cache "
          f"build and {extra_train:.3f} s = {extra_train / med['train none'][0]:.1%} to the training above")
    print("all rounds (CPU, wall):", {key: [(round(c, 2), round(w, 2)) for c, w in v]
                                      for key, v in times.items()})


if __name__ == "__main__":
    main()
