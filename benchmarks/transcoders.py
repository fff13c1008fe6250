"""Transcoders against SAEs at the same site: an MLP-out SAE (blocks.L.hook_mlp_out) against a
transcoder from the MLP's input (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out), with
and without --skip, topk at equal L0, each at its own tuned lr, three seeds, on the default zoo
model's MLPs.

    python benchmarks/transcoders.py sweep     # lr per kind at k = 32, one seed, the sweep layer
    python benchmarks/transcoders.py plateau   # how much doubling the budget still gains
    python benchmarks/transcoders.py study     # every layer at k = 32, the sweep layer at every k
    python benchmarks/transcoders.py report    # markdown table + PNG under benchmarks/results/
    add --quick for a minutes-long smoke run (tiny sizes, one seed, its own output files)

Every dictionary trains from one activation cache holding both hooks of every layer and is
scored by `saelab.evals.evaluate` on held-out tokens it never saw: FVU of the MLP's output
(what every kind reconstructs), L0, KL(clean || spliced) and CE loss recovered with the MLP's
output replaced by the reconstruction (zero ablation = 0, clean = 1), and dead latents (never
active in the eval window). Stages append one JSON line per run to RESULTS and skip runs already
there, so a stopped study resumes where it stopped. The lr grid is extended by x2 steps past
whichever end holds the chosen lr (`allocators.pick_lr`: lowest FVU among runs leaving at most 5%
of the latents dead), so every tuned lr is bracketed.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from allocators import _groups, _mean_std, pick_lr, read_results  # the allocator study's lr rule and helpers

from saelab.data.cache import MANIFEST, build_cache
from saelab.data.tokens import TokenData
from saelab.evals import evaluate
from saelab.evals.render import md_table, save_png
from saelab.models import load_model
from saelab.storage.files import write_text
from saelab.training import TrainConfig, train
from saelab.zoo import DEFAULT_MODEL

KINDS = ("sae", "transcoder", "skip transcoder")
SCORES = ("fvu", "l0", "kl_sae", "ce_loss_recovered", "dead_frac", "dense_frac_10pct")


@dataclass(frozen=True)
class Scale:
    """Sizes of one study: the full one, or --quick."""

    layers: tuple[int, ...]
    sweep_layer: int  # the lr sweep, the plateau check and the k axis run here
    cache_tokens: int
    n_latents: int
    lrs: tuple[float, ...]  # the starting grid, log-spaced by factors of 2
    tokens: int  # every run's budget (the sweep's too)
    batch_size: int
    plateau_max: int
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    eval_tokens: int
    lr_extend: int = 2
    max_dead: float = 0.05
    gain: float = 0.03  # the plateau check stops doubling below this relative FVU gain


FULL = Scale(layers=(0, 1, 2, 3), sweep_layer=1, cache_tokens=2_000_000, n_latents=512,
             lrs=(4e-3, 8e-3, 1.6e-2, 3.2e-2), tokens=500_000, batch_size=1024, plateau_max=2_000_000,
             ks=(16, 32, 64), seeds=(0, 1, 2), eval_tokens=2**14)
QUICK = Scale(layers=(1,), sweep_layer=1, cache_tokens=65_536, n_latents=128, lrs=(4e-3, 1.6e-2),
              tokens=32_768, batch_size=256, plateau_max=65_536, ks=(8, 32), seeds=(0,), eval_tokens=2048,
              lr_extend=1)


def hooks(layer: int) -> tuple[str, str]:
    """The MLP's input (after its LayerNorm) and output at `layer`."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def kind_fields(kind: str, layer: int) -> dict:
    """The training fields that make `kind` at `layer`: every kind reconstructs the MLP's output."""
    mlp_in, mlp_out = hooks(layer)
    if kind == "sae":
        return {"hook": mlp_out}
    return {"hook": mlp_in, "target_hook": mlp_out, "skip": kind == "skip transcoder"}


class Study:
    """The cache (run directories beside it) and the results file."""

    def __init__(self, out: Path, results: Path, scale: Scale, workers: int = 1):
        self.out, self.results, self.scale, self.workers = out, results, scale, workers
        self.cache = out / "cache"
        self.model = load_model(DEFAULT_MODEL)
        if not (self.cache / MANIFEST).exists():
            every = [h for layer in scale.layers for h in hooks(layer)]
            build_cache(self.model, TokenData(), every, self.cache, scale.cache_tokens, overwrite=True)
        self.heldout = TokenData(split="heldout")

    def done(self) -> dict[str, dict]:
        return read_results(self.results)

    @staticmethod
    def run_id(run: dict) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(run.items()))

    def run_all(self, stage: str, runs: list[dict]) -> list[dict]:
        """Every run's row, training the missing ones `workers` at a time (one thread each)."""
        todo = [r for r in runs if self.run_id(r) not in self.done()]
        print(f"{stage}: {len(runs) - len(todo)} of {len(runs)} runs done, training {len(todo)}", flush=True)
        if self.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=get_context("spawn"),
                                     initializer=_start_worker,
                                     initargs=(self.out, self.results, self.scale)) as pool:
                list(pool.map(_run_in_worker, [(stage, r) for r in todo]))
        else:
            for r in todo:
                self.run(stage, r)
        done = self.done()
        return [done[self.run_id(r)] for r in runs]

    def run(self, stage: str, run: dict) -> dict:
        """Train one dictionary (`run`: kind, layer, k, lr, tokens, seed) and score it."""
        run_id = self.run_id(run)
        out = self.out / "runs" / run_id.replace(",", "_").replace("=", "-").replace(" ", "-")
        fields = {key: v for key, v in run.items() if key not in ("kind", "layer")}
        start = time.perf_counter()
        s = self.scale
        train(TrainConfig.of(cache=str(self.cache), out=str(out), overwrite=True, checkpoint_every=0,
                             n_latents=s.n_latents, batch_size=s.batch_size, eval_tokens=s.eval_tokens,
                             **kind_fields(run["kind"], run["layer"]), **fields))
        seconds = time.perf_counter() - start
        r = evaluate(str(out), tokens=s.eval_tokens, model=self.model, data=self.heldout)
        row = {"id": run_id, "stage": stage, **run, **{key: r[key] for key in SCORES},
               "eval_tokens": r["tokens"], "train_seconds": round(seconds, 1)}
        with self.results.open("a") as f:  # one short line per O_APPEND write: workers never interleave
            f.write(json.dumps(row) + "\n")
        print(f"{stage} {run_id}: FVU {row['fvu']:.4f}, L0 {row['l0']:.1f}, CE rec "
              f"{row['ce_loss_recovered']:.3f}, dead {row['dead_frac']:.2f} ({seconds:.0f} s)", flush=True)
        return row


_WORKER: Study | None = None


def _start_worker(out: Path, results: Path, scale: Scale) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Study(out, results, scale)


def _run_in_worker(job: tuple[str, dict]) -> None:
    assert _WORKER is not None, "set by the pool's initializer"
    _WORKER.run(*job)


def tuned_lrs(study: Study) -> dict[str, float]:
    """kind -> the sweep's chosen lr (`pick_lr`)."""
    s = study.scale
    rows = [r for r in study.done().values() if r["stage"] == "sweep"]
    return {kind: pick_lr(group, s.max_dead) for (kind,), group in _groups(rows, ("kind",)).items()
            if kind in KINDS and all(r["tokens"] == s.tokens for r in group)}


def sweep(study: Study) -> None:
    """lr per kind at k = 32, the first seed, the sweep layer: the grid, then x2 steps past the
    end that holds the chosen lr, until it is inside."""
    s = study.scale
    grids = {kind: list(s.lrs) for kind in KINDS}
    for round_ in range(s.lr_extend + 1):
        runs = [dict(kind=kind, layer=s.sweep_layer, k=32, lr=lr, tokens=s.tokens, seed=s.seeds[0])
                for kind, grid in grids.items() for lr in grid]
        rows = _groups(study.run_all("sweep", runs), ("kind",))
        moved = False
        for (kind,), group in rows.items():
            best, grid = pick_lr(group, s.max_dead), grids[kind]
            if round_ < s.lr_extend and best in (grid[0], grid[-1]):
                grid.insert(*((len(grid), best * 2) if best == grid[-1] else (0, best / 2)))
                moved = True
        if not moved:
            break
    for kind, lr in tuned_lrs(study).items():
        print(f"chosen lr {kind:>16}: {lr:g}")


def plateau(study: Study) -> None:
    """At k = 32, each kind's tuned lr, the sweep layer: the budget doubles from the study's
    until held-out FVU gains less than `gain` (relative) or `plateau_max` is passed."""
    s, lrs = study.scale, tuned_lrs(study)
    fvu: dict[str, dict[int, float]] = {kind: {} for kind in KINDS}
    tokens, live = s.tokens, list(KINDS)
    while live and tokens <= s.plateau_max:
        runs = [dict(kind=kind, layer=s.sweep_layer, k=32, lr=lrs[kind], tokens=tokens, seed=s.seeds[0])
                for kind in live]
        for kind, r in zip(live, study.run_all("plateau", runs), strict=True):
            fvu[kind][tokens] = r["fvu"]
        live = [kind for kind in live if tokens // 2 not in fvu[kind]
                or (fvu[kind][tokens // 2] - fvu[kind][tokens]) / fvu[kind][tokens // 2] >= s.gain]
        tokens *= 2
    for kind, by_t in fvu.items():
        steps = ", ".join(f"{t:,} tokens FVU {v:.4f}" for t, v in sorted(by_t.items()))
        print(f"plateau {kind:>16}: {steps}")


def study_grid(study: Study) -> list[dict]:
    """k = 32 at every layer (the target's cells) first, then the other ks at the sweep layer;
    seed outermost within each (a study stopped early has every cell at its first seeds)."""
    s, lrs = study.scale, tuned_lrs(study)
    first = [(layer, 32) for layer in s.layers]
    then = [(s.sweep_layer, k) for k in s.ks if k != 32]
    return [dict(kind=kind, layer=layer, k=k, lr=lrs[kind], tokens=s.tokens, seed=seed)
            for cells in (first, then) for seed in s.seeds for layer, k in cells for kind in KINDS]


def report(study: Study, md: Path, png: Path) -> None:
    """The table (mean +- std over seeds per kind, layer, k; the sweep and plateau runs below
    it) and one PNG: FVU, KL and CE recovered against L0 at the sweep layer, and CE recovered
    at k = 32 per layer."""
    s = study.scale
    rows = list(study.done().values())
    grid = {study.run_id(r) for r in study_grid(study)} if len(tuned_lrs(study)) == len(KINDS) else set()
    cells = _groups([r for r in rows if r["id"] in grid], ("layer", "k", "kind"))
    lines = [f"{DEFAULT_MODEL}, n_latents {s.n_latents}, topk, {s.tokens:,} training tokens at batch "
             f"{s.batch_size}, "
             f"{s.eval_tokens:,} held-out tokens; mean +- std over seeds.", ""]
    lines += md_table(["layer", "k", "kind", "seeds", "FVU (mlp_out)", "L0", "KL", "CE recovered", "dead %"],
                      [[str(layer), str(k), kind, str(len(g)), *_cells(g)]
                       for (layer, k, kind), g in sorted(cells.items(), key=lambda c: (c[0][0], c[0][1],
                                                                                      KINDS.index(c[0][2])))])
    other = sorted((r for r in rows if r["stage"] in ("sweep", "plateau")),
                   key=lambda r: (KINDS.index(r["kind"]), r["tokens"], r["lr"]))
    lines += ["", "lr sweep (k 32, seed 0) and plateau runs:", ""]
    lines += md_table(["kind", "layer", "lr", "tokens", "FVU", "CE recovered", "dead %"],
                      [[r["kind"], str(r["layer"]), f"{r['lr']:g}", f"{r['tokens']:,}", f"{r['fvu']:.4f}",
                        f"{r['ce_loss_recovered']:.4f}", f"{100 * r['dead_frac']:.1f}"] for r in other])
    write_text(md, "\n".join(lines) + "\n")
    if cells:
        save_png(_figure(cells, s), png)
    print(f"written: {md}" + (f" and {png}" if cells else ""))


def _cells(group: list[dict]) -> list[str]:
    out = []
    for key, places, scale in (("fvu", 4, 1), ("l0", 1, 1), ("kl_sae", 4, 1), ("ce_loss_recovered", 4, 1),
                               ("dead_frac", 1, 100)):
        m, sd = _mean_std(group, key)
        out.append(f"{scale * m:.{places}f} +- {scale * sd:.{places}f}")
    return out


def _figure(cells: dict[tuple, list[dict]], s: Scale):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2))
    axes = fig.subplots(1, 4)
    for kind in KINDS:
        by_k = sorted((k, g) for (layer, k, kd), g in cells.items() if layer == s.sweep_layer and kd == kind)
        for ax, key in zip(axes[:3], ("fvu", "kl_sae", "ce_loss_recovered"), strict=True):
            ax.errorbar([_mean_std(g, "l0")[0] for _, g in by_k], [_mean_std(g, key)[0] for _, g in by_k],
                        yerr=[_mean_std(g, key)[1] for _, g in by_k], marker="o", capsize=3, label=kind)
        by_layer = sorted((layer, g) for (layer, k, kd), g in cells.items() if k == 32 and kd == kind)
        ce = [_mean_std(g, "ce_loss_recovered") for _, g in by_layer]
        axes[3].errorbar([layer for layer, _ in by_layer], [m for m, _ in ce], yerr=[sd for _, sd in ce],
                         marker="o", capsize=3, label=kind)
    for ax, label in zip(axes[:3], ("held-out FVU of mlp_out", "KL(clean || spliced), nats",
                                    "CE loss recovered"), strict=True):
        ax.set(xscale="log", xlabel=f"L0 (held-out), layer {s.sweep_layer}", ylabel=label)
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[3].axhline(0.95, color="grey", linestyle="--", linewidth=1)
    axes[3].set(xlabel="layer (k = 32)", ylabel="CE loss recovered", xticks=list(s.layers))
    axes[3].legend()
    fig.suptitle(f"{DEFAULT_MODEL}: MLP-out SAE vs transcoders, n {s.n_latents}, mean +- std over seeds")
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sweep", "plateau", "study", "report"])
    p.add_argument("--quick", action="store_true", help="minutes, not hours: tiny sizes, one seed")
    p.add_argument("--workers", type=int, default=2, help="dictionaries trained at once, one thread each")
    args = p.parse_args()
    scale, name = (QUICK, "transcoders-quick") if args.quick else (FULL, "transcoders")
    out, results = Path("benchmarks/out") / name, Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    study = Study(out, results / f"{name}.jsonl", scale, args.workers)
    if args.stage == "sweep":
        sweep(study)
    elif args.stage == "plateau":
        plateau(study)
    elif args.stage == "study":
        study.run_all("study", study_grid(study))
    report(study, results / f"{name}.md", results / f"{name}.png")


if __name__ == "__main__":
    main()
