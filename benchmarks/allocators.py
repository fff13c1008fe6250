"""The allocators measured fairly: each at its own learning rate, tuned at the budget it is
compared at; k in {8, 16, 32, 64}, three seeds, two layers of the default zoo model.

    python benchmarks/allocators.py sweep      # lr per allocator, at two dictionary sizes
    python benchmarks/allocators.py plateau    # how much longer runs still gain, and the order
    python benchmarks/allocators.py study      # k x seeds x layers at the tuned lrs
    python benchmarks/allocators.py variants   # aux_zipf vs AuxK; gradient_topk raw vs normalised
    python benchmarks/allocators.py report     # table (markdown), FVU/KL-vs-L0 PNGs, variants.png
    add --quick to any of them for a minutes-long smoke run (small sizes, one seed);
    --workers N runs N SAEs at a time, one thread each (default 2: this machine's cores)

Every SAE trains from one activation cache (both layers, with loss gradients for gradient_topk)
and is scored on held-out tokens it never saw. Stages append one JSON line per run to
OUT/results.jsonl and skip runs already there, so a stopped study resumes where it stopped.
The lr grid is fixed, then extended (x2 steps, up to `lr_extend` times) past whichever end holds
the best value, so every tuned lr is bracketed by a worse one on each side.
The study trains every SAE for `sweep_tokens`, the budget its lr was tuned at. Held-out FVU is
not flat there: the plateau stage doubles the budget at k = 32 until a doubling gains less than
`gain` or `plateau_max` is reached, and prints each allocator's gain per doubling and the order
of the allocators at every budget, which is what a fixed-budget comparison must preserve.
The sweep and plateau stages score by held-out FVU alone (cheap); the study and variants stages run
`saelab.evals.evaluate`: FVU, L0, KL and delta CE with the selection each SAE uses at inference
(gradient_topk: plain topk; batch-level allocators: their thresholds), dead latents (never active
in the eval window), rare ones (active on 1-9 of its tokens: if few, the window is long enough
for the rarest live latents) and dense ones (active on > 10% of tokens).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from saelab.data.cache import MANIFEST, build_cache
from saelab.data.heldout import heldout_activations
from saelab.data.tokens import TokenData
from saelab.evals import evaluate, reconstruction_stats
from saelab.models import load_model
from saelab.sae import SAE
from saelab.storage.files import write_json, write_text
from saelab.training import TrainConfig, train
from saelab.zoo import DEFAULT_MODEL

ALLOCATORS = ["topk", "gradient_topk", "feature_choice", "mutual_choice"]
FORMATS = {"fvu": 4, "l0": 1, "kl_sae": 4, "delta_loss": 4}  # the table's columns: decimal places


@dataclass(frozen=True)
class Scale:
    """Sizes of one study: the full one, or --quick."""

    hooks: tuple[str, ...]
    cache_tokens: int
    n_latents: tuple[int, ...]  # sweep sizes; the first is the study's
    lrs: tuple[float, ...]  # the starting grid, log-spaced by factors of 2
    sweep_tokens: int  # the sweep's budget, and the study's
    plateau_start: int  # tokens of the first plateau run; doubled until the gain is < `gain`
    plateau_max: int
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    eval_tokens: int
    gain: float = 0.03
    lr_extend: int = 3  # grid extensions (one x2 step each) past an edge that holds the best lr
    max_dead: float = 0.05  # an lr leaving more of the latents dead on held-out tokens is not chosen
    betas: tuple[float, ...] = (4.0, 16.0, 64.0)  # gradient_topk raw score: the betas tried


# The study's dictionary is n = 512 (expansion 4): at 2048 its 96 runs take ~4x as long, beyond
# this machine's ~2 hours; the sweep and plateau stages also ran at 2048 (benchmarks/results).
FULL = Scale(hooks=("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"), cache_tokens=2_000_000,
             n_latents=(512, 2048), lrs=(2e-3, 4e-3, 8e-3, 1.6e-2), sweep_tokens=2_000_000,
             plateau_start=1_000_000, plateau_max=8_000_000, ks=(8, 16, 32, 64), seeds=(0, 1, 2),
             eval_tokens=2**17)
QUICK = Scale(hooks=("blocks.1.hook_resid_post",), cache_tokens=65_536, n_latents=(256, 512),
              lrs=(1e-3, 4e-3), sweep_tokens=65_536, plateau_start=32_768, plateau_max=131_072,
              ks=(8, 32), seeds=(0,), eval_tokens=4096, lr_extend=1)


class Study:
    """The cache, the held-out activations and the results file one output directory holds."""

    def __init__(self, out: Path, scale: Scale, workers: int = 1):
        self.out, self.scale, self.workers = out, scale, workers
        self.results = out / "results.jsonl"
        self.model = load_model(DEFAULT_MODEL)
        self.cache = out / "cache"
        if not (self.cache / MANIFEST).exists():
            build_cache(self.model, TokenData(), list(scale.hooks), self.cache, scale.cache_tokens,
                        with_grads=True, overwrite=True)
        self.heldout = TokenData(split="heldout")
        self._x: dict[str, object] = {}

    def done(self) -> dict[str, dict]:
        if not self.results.exists():
            return {}
        rows = [json.loads(line) for line in self.results.read_text().splitlines() if line]
        return {r["id"]: r for r in rows}

    @staticmethod
    def with_dead_window(fields: dict) -> dict:
        """The run's training fields with AuxK's dead window: 1/20 of the run."""
        return {**fields, "dead_tokens": max(fields["tokens"] // 20, 4096)}

    @classmethod
    def run_id(cls, full_eval: bool, fields: dict) -> str:
        """The run's key in results.jsonl: its scoring and every training field."""
        fields = cls.with_dead_window(fields)
        return ("eval:" if full_eval else "fvu:") + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))

    def run_all(self, stage: str, full_eval: bool, runs: list[dict]) -> list[dict]:
        """Every run's row, training the missing ones `workers` at a time (one thread each)."""
        todo = [f for f in runs if self.run_id(full_eval, f) not in self.done()]
        if self.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=get_context("spawn"),
                                     initializer=_start_worker, initargs=(self.out, self.scale)) as pool:
                list(pool.map(_run_in_worker, [(stage, full_eval, f) for f in todo]))
        else:
            for f in todo:
                self.run(stage, full_eval, **f)
        done = self.done()
        return [done[self.run_id(full_eval, f)] for f in runs]

    def run(self, stage: str, full_eval: bool, **fields) -> dict:
        """Train one SAE (or reuse a finished run with the same fields and scoring, whichever
        stage ran it) and score it on held-out tokens."""
        run_id = self.run_id(full_eval, fields)
        if run_id in (done := self.done()):
            return done[run_id]
        fields = self.with_dead_window(fields)
        out = self.out / "runs" / run_id.replace(":", "/").replace(",", "_").replace("=", "-")
        start = time.perf_counter()
        (result,) = train(TrainConfig.of(cache=str(self.cache), out=str(out), overwrite=True,
                                         checkpoint_every=0, **fields)).values()
        seconds = time.perf_counter() - start
        if full_eval:
            r = evaluate(str(out), tokens=self.scale.eval_tokens, model=self.model, data=self.heldout)
            scores = {key: r[key] for key in ("fvu", "l0", "kl_sae", "delta_loss", "dead_frac",
                                              "dense_frac_10pct", "tokens")}
            # latents seen on fewer than 10 window tokens: if few, the window is long enough
            # that "never seen" (dead) is not just "too rare for the window"
            counts = [d * r["tokens"] for d in r["latent_density"]]
            scores["rare_frac"] = sum(0 < c < 9.5 for c in counts) / len(counts)
        else:
            scores = reconstruction_stats(SAE.load(str(out)), self.heldout_x(fields["hook"]))
        scores["eval_tokens"] = scores.pop("tokens")  # the run's own `tokens` is its training budget
        row = {"id": run_id, "stage": stage, **fields, **scores, "train_seconds": round(seconds, 1),
               "tokens_per_s": round(result.summary["tokens_per_s"])}
        with self.results.open("a") as f:  # one short line per O_APPEND write: workers never interleave
            f.write(json.dumps(row) + "\n")
        print(f"{stage} {run_id}: FVU {row['fvu']:.4f}, L0 {row['l0']:.1f} ({seconds:.0f} s, "
              f"{row['tokens_per_s']:,} tok/s)", flush=True)
        return row

    def heldout_x(self, hook: str):
        if hook not in self._x:
            self._x[hook] = heldout_activations(self.model, self.heldout, hook, self.scale.eval_tokens)
        return self._x[hook]


_WORKER: Study | None = None


def _start_worker(out: Path, scale: Scale) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Study(out, scale)


def _run_in_worker(job: tuple[str, bool, dict]) -> None:
    stage, full_eval, fields = job
    _WORKER.run(stage, full_eval, **fields)


def pick_lr(rows: list[dict], max_dead: float) -> float:
    """The lr of the lowest held-out FVU among runs leaving at most `max_dead` of the latents
    dead (never active on the held-out tokens); among all runs if none does. Without the cap
    the sweep picks lrs that buy the last percent of FVU with a third of the dictionary."""
    eligible = [r for r in rows if r["dead_frac"] <= max_dead] or rows
    return min(eligible, key=lambda r: r["fvu"])["lr"]


def best_lrs(study: Study) -> dict[tuple[str, int], float]:
    """(allocator, n_latents) -> the chosen lr of the sweep (`pick_lr`)."""
    s = study.scale
    rows = [r for r in study.done().values()
            if r["id"].startswith("fvu:") and r["tokens"] == s.sweep_tokens and r["k"] == 32]
    return {key: pick_lr(group, s.max_dead)
            for key, group in _groups(rows, ("allocator", "n_latents")).items()}


def sweep(study: Study) -> None:
    """lr per allocator and dictionary size, at k = 32 (the default), one seed, the first hook:
    the grid, then x2 steps past the end that holds the chosen lr, until it is inside."""
    s = study.scale
    grids = {(a, n): list(s.lrs) for n in s.n_latents for a in ALLOCATORS}
    for round_ in range(s.lr_extend + 1):
        runs = [dict(allocator=a, hook=s.hooks[0], n_latents=n, k=32, lr=lr, tokens=s.sweep_tokens)
                for (a, n), grid in grids.items() for lr in grid]
        rows = _groups(study.run_all("sweep", False, runs), ("allocator", "n_latents"))
        moved = False
        for key, grid in grids.items():
            best = pick_lr(rows[key], s.max_dead)
            if round_ < s.lr_extend and best == grid[-1]:
                grid.append(grid[-1] * 2)
                moved = True
            elif round_ < s.lr_extend and best == grid[0]:
                grid.insert(0, grid[0] / 2)
                moved = True
        if not moved:
            break
    for (allocator, n), lr in sorted(best_lrs(study).items()):
        print(f"chosen lr {allocator:>15} n={n:>5}: {lr:g}")


def plateau(study: Study) -> None:
    """How far each allocator is from a plateau at the study's budget: at k = 32 and its tuned
    lr, the budget doubles from `plateau_start` until held-out FVU improves by less than `gain`
    (relative) or the next budget would pass `plateau_max`. Prints the gain per doubling and the
    allocators' order at each budget (the study compares them at `sweep_tokens`)."""
    s, n = study.scale, study.scale.n_latents[0]
    lrs = best_lrs(study)
    fvu: dict[str, dict[int, float]] = {a: {} for a in ALLOCATORS}
    tokens, live = s.plateau_start, list(ALLOCATORS)
    while live and tokens <= s.plateau_max:
        runs = [dict(allocator=a, hook=s.hooks[0], n_latents=n, k=32, lr=lrs[(a, n)], tokens=tokens)
                for a in live]
        for a, r in zip(live, study.run_all("plateau", False, runs), strict=True):
            fvu[a][tokens] = r["fvu"]
        live = [a for a in live if tokens // 2 not in fvu[a]
                or (fvu[a][tokens // 2] - fvu[a][tokens]) / fvu[a][tokens // 2] >= s.gain]
        tokens *= 2
    for t in sorted({t for by_t in fvu.values() for t in by_t}):
        at_t = sorted((by_t[t], a) for a, by_t in fvu.items() if t in by_t)
        print(f"{t:>10,} tokens: " + " < ".join(f"{a} {v:.4f}" for v, a in at_t))
    for a in ALLOCATORS:
        steps = sorted(fvu[a].items())
        gains = [f"{100 * (f0 - f1) / f0:.0f}%" for (_, f0), (_, f1) in itertools.pairwise(steps)]
        print(f"plateau {a:>15} (lr {lrs[(a, n)]:g}): gain per doubling {', '.join(gains)}")


def study_runs(study: Study, stage: str, runs: list[dict]) -> list[dict]:
    """Fully evaluated rows of `runs`, completed with the study's dictionary size, budget
    (`sweep_tokens`) and each allocator's lr tuned at that size and budget."""
    s = study.scale
    n, lrs = s.n_latents[0], best_lrs(study)
    return study.run_all(stage, True, [dict(n_latents=n, lr=lrs[(r["allocator"], n)],
                                            tokens=s.sweep_tokens, **r) for r in runs])


def grid_runs(scale: Scale) -> list[dict]:
    """The study's grid, seed outermost: a study stopped early has every cell at its first seeds."""
    return [dict(allocator=a, hook=hook, k=k, seed=seed, aux="auxk")
            for seed in scale.seeds for k in scale.ks for hook in scale.hooks for a in ALLOCATORS]


def variant_runs(study: Study) -> list[dict]:
    """At k = 32 on the first hook, every seed: aux_zipf for every allocator (against the grid's
    AuxK runs), and gradient_topk's raw (published) score beside the normalised default, its
    beta chosen by KL at the first seed from `betas` (beta * mean|W_dec g| is ~1 at beta = 16
    here: e averages ~0.064 for random unit directions on this cache)."""
    s = study.scale
    base = dict(hook=s.hooks[0], k=32)
    raw = dict(base, allocator="gradient_topk", aux="auxk", grad_score="raw")
    tried = [dict(raw, beta=b, seed=s.seeds[0]) for b in s.betas]
    kl = [r["kl_sae"] for r in study_runs(study, "variants", tried)]
    best = tried[kl.index(min(kl))]["beta"]
    # seed outermost, as in the grid
    return [run for seed in s.seeds for run in
            [dict(base, allocator=a, aux="aux_zipf", seed=seed) for a in ALLOCATORS]
            + [dict(raw, beta=best, seed=seed)]]


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(study: Study) -> None:
    """results.md (mean +- std over seeds), one FVU-vs-L0 / KL-vs-L0 PNG per hook, and
    variants.png (the variants stage against the grid's runs at the same k and hook)."""
    import matplotlib

    matplotlib.use("Agg")
    rows = list(study.done().values())
    for r in rows:
        raw = r.get("grad_score") == "raw"
        r["variant"] = r.get("aux", "") + (f", raw beta {r['beta']:g}" if raw else "")
    full = [r for r in rows if r["id"].startswith("eval:")]
    write_text(study.out / "results.md", _table(rows, full))
    _l0_plots(study.out, [r for r in full if r["variant"] == "auxk"])
    if any(r["stage"] == "variants" for r in full):
        _variants_plot(study.out, full)
    print(f"written: {study.out / 'results.md'} and the PNGs beside it")


def _table(rows: list[dict], full: list[dict]) -> str:
    header = ["hook", "allocator", "variant", "k", "seeds", "FVU", "L0", "KL", "delta CE", "dead %",
              "rare %", "dense >10% %"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (hook, allocator, variant, k), group in sorted(
            _groups(full, ("hook", "allocator", "variant", "k")).items()):
        cells = [f"{m:.{places}f} +- {sd:.{places}f}" for key, places in FORMATS.items()
                 for m, sd in [_mean_std(group, key)]]
        cells += [f"{100 * m:.1f} +- {100 * sd:.1f}" for key in ("dead_frac", "rare_frac", "dense_frac_10pct")
                  for m, sd in [_mean_std(group, key)]]
        lines.append(f"| {hook} | {allocator} | {variant} | {k} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "| allocator | n_latents | lr | tokens | held-out FVU |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['allocator']} | {r['n_latents']} | {r['lr']:g} | {r['tokens']:,} | {r['fvu']:.4f} |"
              for r in sorted((r for r in rows if r["id"].startswith("fvu:")),
                              key=lambda r: (r["allocator"], r["n_latents"], r["tokens"], r["lr"]))]
    return "\n".join(lines) + "\n"


def _l0_plots(out: Path, grid: list[dict]) -> None:
    import matplotlib.pyplot as plt

    for (hook,), group in _groups(grid, ("hook",)).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for (allocator,), arows in sorted(_groups(group, ("allocator",)).items()):
            by_k = sorted(_groups(arows, ("k",)).items())
            for ax, key in zip(axes, ("fvu", "kl_sae"), strict=True):
                ax.errorbar([_mean_std(g, "l0")[0] for _, g in by_k], [_mean_std(g, key)[0] for _, g in by_k],
                            yerr=[_mean_std(g, key)[1] for _, g in by_k], marker="o", capsize=3,
                            label=allocator)
        for ax, label in zip(axes, ("held-out FVU", "KL(clean || spliced), nats"), strict=True):
            ax.set(xscale="log", yscale="log", xlabel="L0 (held-out)", ylabel=label)
            ax.legend()
        fig.suptitle(f"{DEFAULT_MODEL} {hook}: mean +- std over seeds")
        fig.tight_layout()
        fig.savefig(out / f"l0_{hook}.png", dpi=110)
        plt.close(fig)


def _variants_plot(out: Path, full: list[dict]) -> None:
    """FVU, KL and dead latents of every (allocator, variant) at the variants stage's k and hook."""
    import matplotlib.pyplot as plt

    k, hook = next((r["k"], r["hook"]) for r in full if r["stage"] == "variants")
    cells = sorted(_groups([r for r in full if r["k"] == k and r["hook"] == hook],
                           ("allocator", "variant")).items())
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, label in zip(axes, ("fvu", "kl_sae", "dead_frac"), ("held-out FVU", "KL, nats", "dead"),
                              strict=True):
        stats = [_mean_std(g, key) for _, g in cells]
        ax.barh(range(len(cells)), [m for m, _ in stats], xerr=[sd for _, sd in stats], capsize=3)
        ax.set_yticks(range(len(cells)), [f"{a} ({v})" for (a, v), _ in cells] if ax is axes[0] else [])
        ax.set_xlabel(label)
    fig.suptitle(f"{DEFAULT_MODEL} {hook}, k = {k}: mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(out / "variants.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sweep", "plateau", "study", "variants", "report"])
    p.add_argument("--quick", action="store_true", help="minutes, not hours: small sizes, one seed")
    p.add_argument("--workers", type=int, default=2, help="SAEs trained at once, one thread each")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory [default: benchmarks/out/allocators(-quick)]")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    out = args.out or Path("benchmarks/out/allocators" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, scale, args.workers)
    write_json(out / "scale.json", {"model": DEFAULT_MODEL, **scale.__dict__})
    if args.stage == "sweep":
        sweep(study)
    elif args.stage == "plateau":
        plateau(study)
    elif args.stage == "study":
        study_runs(study, "study", grid_runs(scale))
    elif args.stage == "variants":
        study_runs(study, "variants", variant_runs(study))
    report(study)


if __name__ == "__main__":
    main()
