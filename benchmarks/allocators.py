"""The allocators measured fairly: each at its own learning rate, tuned at the budget it is
compared at; k in {8, 16, 32, 64}, three seeds, two layers of the default zoo model.

    python benchmarks/allocators.py sweep      # lr per allocator, at two dictionary sizes
    python benchmarks/allocators.py sweep --ks 8   # lr per allocator at k = 8 (per-k lr, below)
    python benchmarks/allocators.py plateau    # how much longer runs still gain, and the order
    python benchmarks/allocators.py study      # k x seeds x layers at the tuned lrs
    python benchmarks/allocators.py variants   # aux_zipf vs AuxK; gradient_topk raw vs normalised
    python benchmarks/allocators.py quality    # sparse probing and absorption of the k = 32 dictionaries
    python benchmarks/allocators.py letters    # their first-letter family and absorption, probed
                                               # alone (SAEBench's negatives)
    python benchmarks/allocators.py report     # tables (markdown), FVU/KL-vs-L0 PNGs, variants.png,
                                               # quality.png
    add --quick to any of them for a minutes-long smoke run (small sizes, one seed);
    --workers N runs N SAEs at a time, one thread each (default 2: this machine's cores);
    --allocators a,b (default: the four batch/token allocators; `quality`: those and EXTRA)
    chooses whom a stage runs; --sizes, --lrs, --ks and --hooks set the sweep's sizes and starting
    grid, the study's k grid and the hooks the cache holds and the study runs.

Every SAE trains from one activation cache (both layers, with loss gradients for gradient_topk)
and is scored on held-out tokens it never saw. Stages append one JSON line per run to
OUT/results.jsonl and skip runs already there, so a stopped study resumes where it stopped.
The lr grid is fixed, then extended (x2 steps, up to `lr_extend` times) past whichever end holds
the best value, so every tuned lr is bracketed by a worse one on each side.
Per-k lr: the sweep tunes at k = 32 and the study reuses that lr at every k, which at k = 8
left jumprelu a third of its latents dead at block 1; `sweep --ks 8 --allocators a,b` tunes a,b
at k = 8 on the first hook by the same rule (first seed, fully evaluated, so the chosen lr's run
is the study's own; starting from the k = 32 lr and its x2 neighbour towards k), and the study
then runs that cell at the chosen lr. The report shows every tried lr of such a cell in its own
table (the k = 32 lr's three seeds stay, to show what changed) and the chosen lr everywhere else.
The study trains every SAE for `sweep_tokens`, the budget its lr was tuned at. Held-out FVU is
not flat there: the plateau stage doubles the budget at k = 32 until a doubling gains less than
`gain` or `plateau_max` is reached, and prints each allocator's gain per doubling and the order
of the allocators at every budget, which is what a fixed-budget comparison must preserve.
The sweep and plateau stages score by held-out FVU alone (cheap); the study and variants stages run
`saelab.evals.evaluate`: FVU, L0, KL and delta CE with the selection each SAE uses at inference
(gradient_topk: plain topk; batch-level allocators: their thresholds), dead latents (never active
in the eval window), rare ones (active on 1-9 of its tokens: if few, the window is long enough
for the rarest live latents) and dense ones (active on > 10% of tokens).
The kinds in EXTRA (jumprelu, matryoshka, relu) run the same stages with `--allocators`.
jumprelu's L0 is steered to k by its controller, not fixed, so the sweep chooses its lr among runs
whose L0 is within `l0_tolerance` of k, and the report compares it with the others at its measured
L0 (log-log interpolation between the reference's neighbouring k; beyond the reference's range,
both at the reference's nearest L0, the kind interpolated there). matryoshka keeps its default
prefixes (n/16, n/4, n). relu's L0 is set by its L1 coefficient alone (`calibrate`): the sweep
brackets L0 = k with L1 values at `calibrate_lr` and interpolates (log-log), then tunes the lr at
that L1 like the others' (L0 within `l0_tolerance` of k), recalibrating at the chosen lr if its
L0 is outside, and keeps the chosen lr only if the other seeds train at it too (relu's third seed
lost 40% of its latents at the lr its first seed chose); the study runs it at k = 32 only (the
quality stage's frame).
The quality stage probes the k = 32 dictionaries of the first hook (`saelab.evals.probes`: sparse
probing per label family and absorption), every seed at probe seed 0 and the first seed's
dictionary at every probe seed, so reseed noise and probe-sample noise sit side by side; a
dictionary the study did not keep on disk is retrained into its run directory and its held-out
FVU checked against the study's row. Quality rows probed before first-letter labels took
SAEBench's negatives (identifiers of other letters; before: every other position) carry no
`letter_negatives`; the letters stage probes every quality row's first-letter family and
absorption alone (`letters:` rows: the same draw for every kind) and the report takes those
columns from it, "n/a" for an older row without one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from matplotlib.figure import Figure

from saelab import allocators as registry
from saelab.data.cache import MANIFEST, build_cache
from saelab.data.heldout import heldout_activations
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals import evaluate, reconstruction_stats
from saelab.evals.probes import probes
from saelab.evals.render import md_table, save_png
from saelab.models import load_model
from saelab.sae import SAE, WEIGHTS_FILE
from saelab.storage.files import write_json, write_text
from saelab.training import TrainConfig, train
from saelab.zoo import DEFAULT_MODEL

ALLOCATORS = ["topk", "gradient_topk", "feature_choice", "mutual_choice"]
EXTRA = ["jumprelu", "matryoshka", "relu"]  # later kinds, run into the same results with --allocators
QUALITY_K = 32
FAMILIES = ("token type", "word", "first letter")  # probe families the quality table shows
QUALITY = {**{f"{fam}_k{k}": f"{fam} k={k}" for fam in FAMILIES for k in (1, 5)},
           "absorption": "absorption"}  # quality row key -> its column
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
    l0_tolerance: float = 0.1  # nor one whose held-out L0 is further than this from k (relative)
    probe_seeds: tuple[int, ...] = (0, 1, 2)  # quality: the first seed's dictionary at each
    train_overrides: tuple[tuple[str, int], ...] = ()  # training fields every run takes (not in ids)
    betas: tuple[float, ...] = (4.0, 16.0, 64.0)  # gradient_topk raw score: the betas tried
    l1s: tuple[float, ...] = (0.025, 0.05)  # relu: the first L1 coefficients tried (x2 steps out)
    calibrate_lr: float = 0.016  # relu: the lr its L1 is first calibrated at


# The study's dictionary is n = 512 (expansion 4): at 2048 its 96 runs take ~4x as long, beyond
# this machine's ~2 hours; the sweep and plateau stages also ran at 2048 (benchmarks/results).
FULL = Scale(hooks=("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"), cache_tokens=2_000_000,
             n_latents=(512, 2048), lrs=(2e-3, 4e-3, 8e-3, 1.6e-2), sweep_tokens=2_000_000,
             plateau_start=1_000_000, plateau_max=8_000_000, ks=(8, 16, 32, 64), seeds=(0, 1, 2),
             eval_tokens=2**17)
QUICK = Scale(hooks=("blocks.1.hook_resid_post",), cache_tokens=65_536, n_latents=(256, 512),
              lrs=(1e-3, 4e-3), sweep_tokens=65_536, plateau_start=32_768, plateau_max=131_072,
              ks=(8, 32), seeds=(0,), eval_tokens=4096, lr_extend=1, probe_seeds=(0, 1),
              train_overrides=(("topk_warmup_steps", 4),))  # 16 steps: jumprelu needs its switch


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
        return read_results(self.results)

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
        self.in_pool("run", [(stage, full_eval, f) for f in todo])
        done = self.done()
        return [done[self.run_id(full_eval, f)] for f in runs]

    def in_pool(self, method: str, jobs: list[tuple]) -> None:
        """self.<method>(*job) for every job, `workers` at a time in processes of one thread."""
        if self.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=get_context("spawn"),
                                     initializer=_start_worker, initargs=(self.out, self.scale)) as pool:
                list(pool.map(_in_worker, [(method, job) for job in jobs]))
        else:
            for job in jobs:
                getattr(self, method)(*job)

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id.replace(":", "/").replace(",", "_").replace("=", "-")

    def train_into(self, out: Path, fields: dict):
        """Train the run `fields` (with its dead window) into `out`; its TrainResult."""
        (result,) = train(TrainConfig.of(cache=str(self.cache), out=str(out), overwrite=True,
                                         checkpoint_every=0, **dict(self.scale.train_overrides),
                                         **self.with_dead_window(fields))).values()
        return result

    def append(self, row: dict) -> None:
        with self.results.open("a") as f:  # one short line per O_APPEND write: workers never interleave
            f.write(json.dumps(row) + "\n")

    def run(self, stage: str, full_eval: bool, fields: dict) -> dict:
        """Train one SAE (or reuse a finished run with the same fields and scoring, whichever
        stage ran it) and score it on held-out tokens."""
        run_id = self.run_id(full_eval, fields)
        if run_id in (done := self.done()):
            return done[run_id]
        out = self.run_dir(run_id)
        start = time.perf_counter()
        result = self.train_into(out, fields)
        fields = self.with_dead_window(fields)
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
        self.append(row)
        print(f"{stage} {run_id}: FVU {row['fvu']:.4f}, L0 {row['l0']:.1f} ({seconds:.0f} s, "
              f"{row['tokens_per_s']:,} tok/s)", flush=True)
        return row

    def quality(self, fields: dict, probe_seed: int) -> dict:
        """The probing row of the fully evaluated run `fields` at `probe_seed` (module docstring):
        family accuracies at k = 1 and 5 (and the ceiling), the mean absorption rate."""
        run_id = self.run_id(True, fields)
        qid = _quality_id(self, fields, probe_seed)
        if qid in (done := self.done()):
            return done[qid]
        study_row = done.get(run_id) or self.run("study", True, fields)
        out, check = self.run_dir(run_id), {}
        if not (out / WEIGHTS_FILE).exists():
            self.train_into(out, fields)
            x = self.heldout_x(fields["hook"])
            check["fvu_retrained"] = reconstruction_stats(SAE.load(str(out)), x)["fvu"]
            print(f"retrained {run_id}: held-out FVU {check['fvu_retrained']:.4f} (study: "
                  f"{study_row['fvu']:.4f})", flush=True)
        r = probes(str(out), tokens=self.scale.eval_tokens // 2, model=self.model, seed=probe_seed)
        row = {"id": qid, "stage": "quality", **self.with_dead_window(fields), "probe_seed": probe_seed,
               "fvu": study_row["fvu"], "l0": study_row["l0"], **check, **_probe_scores(r)}
        self.append(row)
        print(f"quality {qid}: token type k=1 {row['token type_k1']:.3f}, absorption "
              f"{row['absorption']}", flush=True)
        return row

    def letters(self, fields: dict, probe_seed: int) -> dict:
        """The `letters:` row of a dictionary the quality stage probed before first-letter labels
        took SAEBench's negatives: its first-letter family and absorption, probed again."""
        lid = "letters:" + _quality_id(self, fields, probe_seed).removeprefix("probes:")
        if lid in (done := self.done()):
            return done[lid]
        out = self.run_dir(self.run_id(True, fields))
        r = probes(str(out), tokens=self.scale.eval_tokens // 2, model=self.model, seed=probe_seed,
                   labels="letters")
        row = {"id": lid, "stage": "letters", **self.with_dead_window(fields), "probe_seed": probe_seed,
               **_probe_scores(r)}
        self.append(row)
        print(f"letters {lid}: first letter k=1 {row['first letter_k1']:.3f}, absorption "
              f"{row['absorption']}", flush=True)
        return row

    def heldout_x(self, hook: str):
        if hook not in self._x:
            self._x[hook] = heldout_activations(self.model, self.heldout, hook, self.scale.eval_tokens)
        return self._x[hook]


def _probe_scores(r: dict) -> dict:
    """A quality or letters row's scores from a probing report."""
    return {**_family_means(r["labels"].values()), "absorption": r["absorption"]["mean_rate"],
            **{key: r["absorption"][key] for key in ("letters_included", "split_letters")},
            "positions": r["positions"], "letter_negatives": r["letter_negatives"],
            "probe_seconds": r["seconds"]}


LETTER_KEYS = ("first letter_k1", "first letter_k5", "first letter_ceiling", "absorption",
               "letters_included", "split_letters")  # what a letters row replaces in a quality row


def _with_letters(probed: list[dict], rows: dict[str, dict]) -> list[dict]:
    """Quality rows with first-letter columns of SAEBench's negatives: their letters row's (so
    every kind's come from the same draw), else their own if probed so, else None (probed with
    every other position as negatives: not shown)."""
    out = []
    for r in probed:
        again = rows.get("letters:" + r["id"].removeprefix("probes:"))
        if again or "letter_negatives" not in r:
            r = {**r, **{key: (again or {}).get(key) for key in LETTER_KEYS}}
        out.append(r)
    return out


def _family_means(labels) -> dict[str, float]:
    """Mean held-out accuracy per label family of a probing report's label rows: k = 1, k = 5
    and the ceiling, keyed "<family>_k1" and so on."""
    families: dict[str, list[dict]] = {}
    for label in labels:
        families.setdefault(label["family"], []).append(label)
    return {f"{fam}_{key}": statistics.fmean(pick(row) for row in rows)
            for fam, rows in families.items()
            for key, pick in (("k1", lambda row: row["sparse"]["1"]["accuracy"]),
                              ("k5", lambda row: row["sparse"]["5"]["accuracy"]),
                              ("ceiling", lambda row: row["ceiling"]["accuracy"]))}


_WORKER: Study | None = None


def _start_worker(out: Path, scale: Scale) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Study(out, scale)


def _in_worker(job: tuple[str, tuple]) -> None:
    method, args = job
    getattr(_WORKER, method)(*args)


def read_results(path: Path) -> dict[str, dict]:
    """The rows of a study's JSON-lines results file by id ({} before the first run): what a
    resumed stage skips. The transcoder and circuit studies read theirs with it too."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {r["id"]: r for r in rows}


def pick_lr(rows: list[dict], max_dead: float, l0_tolerance: float = math.inf) -> float:
    """The lr of the lowest held-out FVU among runs leaving at most `max_dead` of the latents
    dead (never active on the held-out tokens) and whose held-out L0 is within `l0_tolerance`
    of k; among all runs if none is. Without the dead cap the sweep picks lrs that buy the last
    percent of FVU with a third of the dictionary; without the L0 one, a jumprelu lr whose
    controller overshot k would win on FVU bought with L0. The transcoder and circuit studies
    pass no tolerance: a topk transcoder's L0 sits below k by design."""
    return min(_eligible(rows, max_dead, l0_tolerance) or rows, key=lambda r: r["fvu"])["lr"]


def _eligible(rows: list[dict], max_dead: float, l0_tolerance: float) -> list[dict]:
    """The runs `pick_lr` chooses among: within the dead cap and the L0 tolerance of k."""
    return [r for r in rows if r["dead_frac"] <= max_dead
            and ("k" not in r or abs(r["l0"] / r["k"] - 1) <= l0_tolerance)]


def next_lr(grid: list[float], rows: list[dict], max_dead: float, l0_tolerance: float) -> float | None:
    """The lr a per-k sweep tries next so that its choice (`pick_lr`) has a tried lr on each
    side: x2 past the end of the (ascending) grid that holds it, or below the grid when no run is
    eligible (dead latents and jumprelu's L0 overshoot grow with the lr, so the fallback to the
    lowest FVU of all would walk up); None once the choice is bracketed."""
    best = pick_lr(rows, max_dead, l0_tolerance) if _eligible(rows, max_dead, l0_tolerance) else None
    return bracket_step(grid, best)


def bracket_step(grid: list[float], best: float | None, step: float = 2) -> float | None:
    """The lr to add to the ascending `grid` so that its choice `best` has a tried lr on each
    side: x`step` past the end that holds it, or below the grid when nothing was eligible
    (`best` None); None once `best` is bracketed. The circuit study's sweep shares it."""
    if best is None or best == grid[0]:
        return grid[0] / step
    return grid[-1] * step if best == grid[-1] else None


def best_lrs(study: Study) -> dict[tuple[str, int], float]:
    """(allocator, n_latents) -> the chosen lr of the sweep (`pick_lr`)."""
    s = study.scale
    rows = [r for r in study.done().values() if r["id"].startswith("fvu:") and r["tokens"] == s.sweep_tokens
            and r["k"] == 32 and "l1_coefficient" not in r]  # relu's: `calibrate`
    return {key: pick_lr(group, s.max_dead, s.l0_tolerance)
            for key, group in _groups(rows, ("allocator", "n_latents")).items()}


def per_k_lrs(rows: list[dict], scale: Scale) -> dict[tuple[str, str, int], float]:
    """(allocator, hook, k) -> the lr `sweep_at_k` chose for that cell: `pick_lr` over the
    first seed's fully evaluated grid runs (the study's size and budget, AuxK, no variant) of
    every cell holding more than one lr; a cell no per-k sweep touched holds only the k = 32 lr
    and is left out (the study then uses `best_lrs`)."""
    firsts = [r for r in rows if r["id"].startswith("eval:") and r["aux"] == "auxk"
              and r.get("grad_score") != "raw" and "l1_coefficient" not in r
              and r["seed"] == scale.seeds[0] and r["n_latents"] == scale.n_latents[0]
              and r["tokens"] == scale.sweep_tokens]
    return {key: pick_lr(group, scale.max_dead, scale.l0_tolerance)
            for key, group in _groups(firsts, ("allocator", "hook", "k")).items()
            if len({r["lr"] for r in group}) > 1}


def sweep_at_k(study: Study, allocators: list[str], k: int) -> None:
    """lr per allocator at budget k on the first hook (`sweep --ks`): the study's size and
    budget, its first seed fully evaluated (so the chosen lr's run is the study's own seed-0
    run), starting from the k = 32 lr and its x2 neighbour towards k (smaller budgets train
    fewer latents per token and lose more of them), then `next_lr` until the choice is
    bracketed (at most `lr_extend` more). The study then runs that cell at this lr
    (`per_k_lrs`)."""
    s = study.scale
    if steered := [a for a in allocators if l1_steered(a)]:
        raise SaelabError(f"sweep --ks: {', '.join(steered)} has no per-k lr (its L0 is set by the "
                          f"L1 coefficient `calibrate` finds at k = {QUALITY_K}); drop it from --allocators")
    n, lrs = s.n_latents[0], best_lrs(study)
    for a in allocators:
        lr = lrs[(a, n)]
        grid = [lr / 2, lr] if k < QUALITY_K else [lr, lr * 2]
        base = dict(allocator=a, hook=s.hooks[0], k=k, seed=s.seeds[0], aux="auxk", n_latents=n,
                    tokens=s.sweep_tokens)
        for round_ in range(s.lr_extend + 1):
            rows = study.run_all("sweep", True, [dict(base, lr=v) for v in grid])
            if round_ == s.lr_extend or (more := next_lr(grid, rows, s.max_dead, s.l0_tolerance)) is None:
                break
            grid = sorted([*grid, more])
        print(f"chosen lr {a} k={k} {s.hooks[0]}: {pick_lr(rows, s.max_dead, s.l0_tolerance):g} (k = 32: "
              f"{lr:g}): " + ", ".join(f"lr {r['lr']:g} FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead "
                                       f"{r['dead_frac']:.3f}" for r in rows), flush=True)


def sweep(study: Study, allocators: list[str], sizes: tuple[int, ...]) -> None:
    """lr per allocator and dictionary size, at k = 32 (the default), one seed, the first hook:
    the grid, then x2 steps past the end that holds the chosen lr, until it is inside."""
    s = study.scale
    for a in [a for a in allocators if l1_steered(a)]:
        calibrate(study, a)
    allocators = [a for a in allocators if not l1_steered(a)]
    grids = {(a, n): list(s.lrs) for n in sizes for a in allocators}
    for round_ in range(s.lr_extend + 1):
        runs = [dict(allocator=a, hook=s.hooks[0], n_latents=n, k=32, lr=lr, tokens=s.sweep_tokens)
                for (a, n), grid in grids.items() for lr in grid]
        rows = _groups(study.run_all("sweep", False, runs), ("allocator", "n_latents"))
        moved = False
        for key, grid in grids.items():
            best = pick_lr(rows[key], s.max_dead, s.l0_tolerance)
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


def l1_steered(allocator: str) -> bool:
    """The kind's L0 is set by its L1 coefficient alone (relu): no budget k, no controller."""
    kind = registry.get(allocator)
    return not kind.budget and not kind.learns_thresholds


def l1_for_l0(rows: list[dict], k: float) -> float:
    """The L1 coefficient for held-out L0 = k: log-log interpolation between the two tried
    coefficients whose L0s bracket k (the nearest one if none do); L0 falls as a power of L1."""
    pts = sorted((r["l1_coefficient"], r["l0"]) for r in rows)
    for (a, la), (b, lb) in itertools.pairwise(pts):
        if (la - k) * (lb - k) <= 0 and la != lb:
            t = math.log(k / la) / math.log(lb / la)
            return round(a * (b / a) ** t, 4)
    return min(pts, key=lambda p: abs(math.log(p[1] / k)))[0]


def bracket_l1(run, l1s: list[float], k: float, extend: int) -> tuple[float, list[dict]]:
    """The L1 coefficient for held-out L0 = k (`l1_for_l0`) and the rows it came from: `run(l1s)`
    trains at each coefficient of `l1s` (ascending) and returns rows with `l1_coefficient` and
    `l0`; x2 steps out (at most `extend`) until their L0s bracket k. The circuit study steers
    relu's L1 with it too."""
    for round_ in range(extend + 1):
        rows = run(l1s)
        l0s = [r["l0"] for r in rows]
        if min(l0s) <= k <= max(l0s) or round_ == extend:
            break
        l1s = [*l1s, l1s[-1] * 2] if min(l0s) > k else [l1s[0] / 2, *l1s]
    return l1_for_l0(rows, k), rows


def calibrate(study: Study, allocator: str) -> tuple[float, float]:
    """(lr, L1 coefficient) of an L1-steered kind at the study's size, budget and first hook, for
    held-out L0 ~QUALITY_K (module docstring): L1 calibrated at `calibrate_lr`, then the lr
    grid (x2 either side, extended past an edge that holds the best) at that L1; an lr whose L0
    lands outside `l0_tolerance` of k gets its own L1, so every lr is compared near L0 = k."""
    s = study.scale
    base = dict(allocator=allocator, hook=s.hooks[0], n_latents=s.n_latents[0], k=QUALITY_K,
                tokens=s.sweep_tokens)

    def l1_at(lr: float, l1s: list[float]) -> float:
        """L1 for L0 = k at `lr`: `l1s` (ascending), x2 steps out until their L0s bracket k."""
        l1, rows = bracket_l1(lambda v: study.run_all("calibrate", False, [dict(base, lr=lr, l1_coefficient=x)
                                                                            for x in v]),
                              l1s, QUALITY_K, s.lr_extend)
        print(f"calibrate {allocator} lr {lr:g}: " + ", ".join(
            f"L1 {r['l1_coefficient']:g} L0 {r['l0']:.1f}" for r in rows) + f" -> L1 {l1:g}", flush=True)
        return l1

    l1 = {s.calibrate_lr: l1_at(s.calibrate_lr, list(s.l1s))}
    grid = [s.calibrate_lr / 2, s.calibrate_lr, s.calibrate_lr * 2]
    for round_ in range(s.lr_extend + 1):
        first = l1[s.calibrate_lr]
        rows = study.run_all("calibrate", False, [dict(base, lr=lr, l1_coefficient=l1.get(lr, first))
                                                  for lr in grid])
        for r in rows:  # an lr that moved L0 off k: its own L1, its run at that L1 in the comparison
            if r["lr"] not in l1 and abs(r["l0"] / QUALITY_K - 1) > s.l0_tolerance:
                l1[r["lr"]] = l1_at(r["lr"], [r["l1_coefficient"]])
        l1.update({lr: first for lr in grid if lr not in l1})
        rows = study.run_all("calibrate", False, [dict(base, lr=lr, l1_coefficient=l1[lr]) for lr in grid])
        best = pick_lr(rows, s.max_dead, s.l0_tolerance)
        if round_ == s.lr_extend or best not in (grid[0], grid[-1]):
            break
        grid = [*grid, grid[-1] * 2] if best == grid[-1] else [grid[0] / 2, *grid]

    def trains_every_seed(lr: float) -> bool:
        """The other seeds at (lr, its L1) keep the dead and L0 limits: one seed's best lr can
        sit at the edge of stability (relu's third seed lost 40% of its latents at the lr
        its first seed chose)."""
        seeds = study.run_all("calibrate", False, [dict(base, lr=lr, l1_coefficient=l1[lr], seed=seed)
                                                    for seed in s.seeds[1:]])
        return all(r["dead_frac"] <= s.max_dead and abs(r["l0"] / QUALITY_K - 1) <= s.l0_tolerance
                   for r in seeds)

    while not trains_every_seed(best):
        print(f"{allocator}: lr {best:g} does not train every seed; the next best", flush=True)
        rows = [r for r in rows if r["lr"] != best]
        if not rows:
            raise SaelabError(f"{allocator}: no lr of {grid} trains every seed within the dead and L0 limits")
        best = pick_lr(rows, s.max_dead, s.l0_tolerance)
    print(f"chosen {allocator}: lr {best:g}, L1 {l1[best]:g}: " + ", ".join(
        f"lr {r['lr']:g} L1 {r['l1_coefficient']:g} FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead "
        f"{r['dead_frac']:.3f}" for r in rows), flush=True)
    return best, l1[best]


def plateau(study: Study, allocators: list[str]) -> None:
    """How far each allocator is from a plateau at the study's budget: at k = 32 and its tuned
    lr, the budget doubles from `plateau_start` until held-out FVU improves by less than `gain`
    (relative) or the next budget would pass `plateau_max`. Prints the gain per doubling and the
    allocators' order at each budget (the study compares them at `sweep_tokens`)."""
    s, n = study.scale, study.scale.n_latents[0]
    lrs = best_lrs(study)
    fvu: dict[str, dict[int, float]] = {a: {} for a in allocators}
    tokens, live = s.plateau_start, list(allocators)
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
    for a in allocators:
        steps = sorted(fvu[a].items())
        gains = [f"{100 * (f0 - f1) / f0:.0f}%" for (_, f0), (_, f1) in itertools.pairwise(steps)]
        print(f"plateau {a:>15} (lr {lrs[(a, n)]:g}): gain per doubling {', '.join(gains)}")


def study_fields(study: Study, runs: list[dict]) -> list[dict]:
    """`runs` completed with the study's dictionary size, budget (`sweep_tokens`) and each
    allocator's lr tuned at that size and budget: at the run's k and hook where a per-k sweep
    ran there (`per_k_lrs`), else at k = 32."""
    s = study.scale
    n, lrs, per_k = s.n_latents[0], best_lrs(study), per_k_lrs(list(study.done().values()), s)
    tuned = {a: calibrate(study, a) for a in dict.fromkeys(r["allocator"] for r in runs) if l1_steered(a)}
    return [dict(n_latents=n, lr=tuned[a][0], l1_coefficient=tuned[a][1], tokens=s.sweep_tokens, **r)
            if (a := r["allocator"]) in tuned else
            dict(n_latents=n, lr=per_k.get((a, r["hook"], r["k"]), lrs[(a, n)]), tokens=s.sweep_tokens, **r)
            for r in runs]


def study_runs(study: Study, stage: str, runs: list[dict]) -> list[dict]:
    """Fully evaluated rows of `runs` (`study_fields`)."""
    return study.run_all(stage, True, study_fields(study, runs))


def grid_runs(scale: Scale, allocators: list[str]) -> list[dict]:
    """The study's grid, seed outermost: a study stopped early has every cell at its first seeds.
    An L1-steered kind only where its L1 is calibrated: k = QUALITY_K on the first hook."""
    return [dict(allocator=a, hook=hook, k=k, seed=seed, aux="auxk")
            for seed in scale.seeds for k in scale.ks for hook in scale.hooks for a in allocators
            if not l1_steered(a) or (k, hook) == (QUALITY_K, scale.hooks[0])]


def quality(study: Study, allocators: list[str]) -> None:
    """Probe the grid's dictionaries at k = QUALITY_K on the first hook, in passes: the first
    seed's dictionaries at the first probe seed, then at the others, then each further seed's
    (so a stopped stage has both kinds of noise early, and no worker probes a dictionary another
    is still retraining)."""
    s = study.scale
    seeds = [study_fields(study, [dict(allocator=a, hook=s.hooks[0], k=QUALITY_K, seed=seed, aux="auxk")
                                  for a in allocators]) for seed in s.seeds]
    passes = [[(f, s.probe_seeds[0]) for f in seeds[0]],
              [(f, p) for f in seeds[0] for p in s.probe_seeds[1:]],
              *([(f, s.probe_seeds[0]) for f in runs] for runs in seeds[1:])]
    for jobs in passes:
        done = study.done()
        study.in_pool("quality", [job for job in jobs if _quality_id(study, *job) not in done])


def letters(study: Study, allocators: list[str]) -> None:
    """The first-letter family and absorption of every quality row, probed alone (the same draw
    for every kind, and SAEBench's negatives for rows that predate them): each seed's dictionary
    at the first probe seed, then the first seed's at the others."""
    s, done = study.scale, study.done()
    seeds = [study_fields(study, [dict(allocator=a, hook=s.hooks[0], k=QUALITY_K, seed=seed, aux="auxk")
                                  for a in allocators]) for seed in s.seeds]
    jobs = [(f, s.probe_seeds[0]) for runs in seeds for f in runs] + \
        [(f, p) for f in seeds[0] for p in s.probe_seeds[1:]]
    study.in_pool("letters", [job for job in jobs if _quality_id(study, *job) in done])


def _quality_id(study: Study, fields: dict, probe_seed: int) -> str:
    return f"probes:probe_seed={probe_seed}," + study.run_id(True, fields).removeprefix("eval:")


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
    variants.png (the variants stage against the grid's runs at the same k and hook). A cell a
    per-k sweep tuned shows its chosen lr's runs; its other lrs are in the per-k table."""
    import matplotlib

    matplotlib.use("Agg")
    rows = list(study.done().values())
    for r in rows:
        raw = r.get("grad_score") == "raw"
        r["variant"] = r.get("aux", "") + (f", raw beta {r['beta']:g}" if raw else "")
    per_k = per_k_lrs(rows, study.scale)
    every = [r for r in rows if r["id"].startswith("eval:")]
    full = [r for r in every if _at_study_lr(r, per_k)]
    grid = [r for r in full if r["variant"] == "auxk"]
    probed = _with_letters([r for r in rows if r["id"].startswith("probes:")], study.done())
    write_text(study.out / "results.md", "\n".join([_table(rows, full), *_per_k_table(every, per_k),
                                                     *_matched_tables(grid),
                                                     *_quality_tables(probed, study.scale)]))
    _l0_plots(study.out, grid, per_k)
    if any(r["stage"] == "variants" for r in full):
        _variants_plot(study.out, full)
    if probed:
        save_png(_quality_plot(probed, study.scale), study.out / "quality.png")
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
    lines += [f"| {r['allocator']}{_l1(r)} | {r['n_latents']} | {r['lr']:g} | {r['tokens']:,} "
              f"| {r['fvu']:.4f} |"
              for r in sorted((r for r in rows if r["id"].startswith("fvu:")),
                              key=lambda r: (r["allocator"], r["n_latents"], r["tokens"], r["lr"]))]
    return "\n".join(lines) + "\n"


def _at_study_lr(row: dict, per_k: dict[tuple[str, str, int], float]) -> bool:
    """The evaluated run is at the lr the study uses for its cell: any lr of a cell no per-k
    sweep tuned (one lr per kind there), else the per-k sweep's choice; variants are untouched."""
    lr = per_k.get((row["allocator"], row["hook"], row["k"]))
    return lr is None or row["variant"] != "auxk" or row["lr"] == lr


def _per_k_table(every: list[dict], per_k: dict[tuple[str, str, int], float]) -> list[str]:
    """Every lr tried in each per-k-tuned cell (the sweep's first seed, and the other seeds where
    the study ran them: at the chosen lr and at the k = 32 lr it replaces), mean +- std."""
    tuned = [r for r in every if r["variant"] == "auxk" and (r["allocator"], r["hook"], r["k"]) in per_k]
    if not tuned:
        return []
    head = ["hook", "allocator", "k", "lr", "seeds", "FVU", "L0", "KL", "dead %"]
    body = [[hook, a, str(k), f"{lr:g}" + (" (chosen)" if per_k[(a, hook, k)] == lr else ""), str(len(g)),
             *(f"{m:.{FORMATS[key]}f} +- {sd:.{FORMATS[key]}f}" for key in ("fvu", "l0", "kl_sae")
               for m, sd in [_mean_std(g, key)]),
             "{:.1f} +- {:.1f}".format(*(100 * v for v in _mean_std(g, "dead_frac")))]
            for (hook, a, k, lr), g in sorted(_groups(tuned, ("hook", "allocator", "k", "lr")).items())]
    return ["", "Per-k lr (`sweep --ks`): every lr tried in a tuned cell (first seed; the chosen lr and "
            "the k = 32 lr with every seed the study ran); the other tables use the chosen lr:", "",
            *md_table(head, body)]


def _l1(row: dict) -> str:
    seed = f", seed {row['seed']}" if "seed" in row else ""  # the relu check run beside the sweep's
    return f" (L1 {row['l1_coefficient']:g}, L0 {row['l0']:.1f}{seed})" if "l1_coefficient" in row else ""


def _at_l0(cells: list[tuple[float, float, float]], l0: float) -> tuple[float, float] | None:
    """(mean, std) of a metric at `l0`, from (L0, mean, std) cells sorted by L0: log-log linear
    between the two neighbours (std linear in the same weight); None outside their range."""
    for (l0_a, m_a, sd_a), (l0_b, m_b, sd_b) in itertools.pairwise(cells):
        if l0_a <= l0 <= l0_b:
            t = math.log(l0 / l0_a) / math.log(l0_b / l0_a)
            return math.exp((1 - t) * math.log(m_a) + t * math.log(m_b)), (1 - t) * sd_a + t * sd_b
    return None


def _matched(own: tuple[float, float, float], kind: list[tuple[float, float, float]],
             ref: list[tuple[float, float, float]]) -> tuple[float, float, float, float, float] | None:
    """(L0, kind mean, kind std, reference mean, reference std) at one L0, from (L0, mean, std)
    cells sorted by L0: the kind's cell `own` with the reference interpolated to its L0
    (`_at_l0`); if that is outside the reference's range, the reference's measured L0 nearest to
    it with the kind's cells `kind` interpolated there instead (never extrapolated); None if
    neither is inside or the reference has no cells."""
    if (at := _at_l0(ref, own[0])) is not None:
        return *own, *at
    if not ref:  # the reference has no cells yet (a partial study)
        return None
    near = min(ref, key=lambda c: abs(math.log(c[0] / own[0])))
    mine = _at_l0(kind, near[0])
    return None if mine is None else (near[0], *mine, near[1], near[2])


def _matched_tables(grid: list[dict]) -> list[str]:
    """Each EXTRA kind's FVU and KL at its measured L0 beside topk's and mutual_choice's
    interpolated there, or both at the reference's nearest L0 (`_matched`), per hook and k; the
    gap in combined standard deviations."""
    lines = []
    for key, name in (("fvu", "held-out FVU"), ("kl_sae", "KL")):
        curves = {ha: sorted((_mean_std(g, "l0")[0], *_mean_std(g, key))
                             for g in _groups(rows, ("k",)).values())
                  for ha, rows in _groups(grid, ("hook", "allocator")).items()}
        head = ["hook", "kind", "k", "L0", name,
                *(f"{ref} at that L0 (gap, sd)" for ref in ("topk", "mutual_choice"))]
        body = []
        for (hook, kind, k), group in sorted(_groups(grid, ("hook", "allocator", "k")).items()):
            if kind not in EXTRA:
                continue
            (l0, l0_sd), (m, sd) = _mean_std(group, "l0"), _mean_std(group, key)
            cells = [f"{l0:.1f} +- {l0_sd:.1f}", f"{m:.4f} +- {sd:.4f}"]
            for ref in ("topk", "mutual_choice"):
                at = _matched((l0, m, sd), curves[(hook, kind)], curves.get((hook, ref), []))
                if at is None:
                    cells.append("outside its L0 range")
                    continue
                where, mine, mine_sd, theirs, theirs_sd = at
                moved = "" if where == l0 else f"; at its L0 {where:.1f}, {kind} {mine:.4f}"
                gap = (mine - theirs) / math.hypot(mine_sd, theirs_sd)
                cells.append(f"{theirs:.4f} +- {theirs_sd:.4f} ({gap:+.1f}{moved})")
            body.append([hook, kind, str(k), *cells])
        if body:
            lines += ["", f"{name} at matched L0 (the reference log-log interpolated between its "
                      "neighbouring k to the kind's L0; beyond the reference's range, the kind "
                      "interpolated to the reference's nearest L0 instead, never extrapolated; gap = "
                      "(kind - reference) / combined sd):", "", *md_table(head, body)]
    return lines


def _quality_tables(probed: list[dict], scale: Scale) -> list[str]:
    """Probe metrics per allocator: mean +- std over the seeds' dictionaries (probe seed 0), and
    the first seed's dictionary's std over probe seeds beside it."""
    if not probed:
        return []
    reseed = _groups([r for r in probed if r["probe_seed"] == scale.probe_seeds[0]], ("allocator",))
    reprobe = _groups([r for r in probed if r["seed"] == scale.seeds[0]], ("allocator",))
    head = ["allocator", "dictionaries", "FVU", *QUALITY.values()]
    body = [[a, str(len(g)), *(f"{m:.4f} +- {sd:.4f}" for m, sd in [_mean_std(g, "fvu")]),
             *(_measured(g, key, lambda m, sd: f"{m:.3f} +- {sd:.3f}") for key in QUALITY)]
            for (a,), g in sorted(reseed.items())]
    noise = [[a, f"{len(reprobe[(a,)])} probe seeds",
              *(" / ".join(_measured(g, key, lambda m, sd: f"{sd:.3f}")
                           for g in (reseed[(a,)], reprobe[(a,)])) for key in QUALITY)]
             for (a,) in sorted(reseed) if (a,) in reprobe]
    return ["", f"Feature quality (k = {QUALITY_K}, {probed[0]['hook']}): mean held-out accuracy per "
            "label family, mean absorption rate; mean +- std over seeds (probe seed "
            f"{scale.probe_seeds[0]}):", "", *md_table(head, body), "",
            "Noise: std across the seeds' dictionaries / std across probe seeds of the first seed's:", "",
            *md_table(["allocator", "probe seeds", *QUALITY.values()], noise)]


def _measured(rows: list[dict], key: str, cell) -> str:
    """cell(mean, std) over the rows that measured `key` (a family with too few positions, or
    absorption with no letter whose probe passes, is missing or None), "n/a" if none did."""
    rows = [r for r in rows if r.get(key) is not None]
    return cell(*_mean_std(rows, key)) if rows else "n/a"


def _quality_plot(probed: list[dict], scale: Scale) -> Figure:
    """One panel per quality metric: each allocator's seed dictionaries (dots, mean +- std) and
    its first dictionary at every probe seed (crosses, beside)."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, len(QUALITY), sharey=False)
    kinds = sorted({r["allocator"] for r in probed})
    for ax, (key, label) in zip(axes, QUALITY.items(), strict=True):
        for i, kind in enumerate(kinds):
            mine = [r for r in probed if r["allocator"] == kind and r.get(key) is not None]
            seeds = [r[key] for r in mine if r["probe_seed"] == scale.probe_seeds[0]]
            probes_ = [r[key] for r in mine if r["seed"] == scale.seeds[0]]
            ax.plot([i - 0.12] * len(seeds), seeds, "o", color="C0", ms=4, label="seeds" if i == 0 else None)
            if seeds:
                m, sd = _mean_std([{key: v} for v in seeds], key)
                ax.errorbar(i - 0.12, m, yerr=sd, color="C0", capsize=4, marker="_", ms=12)
            ax.plot([i + 0.12] * len(probes_), probes_, "x", color="C3", ms=5,
                    label="probe seeds, seed-0 dictionary" if i == 0 else None)
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{DEFAULT_MODEL} {probed[0]['hook']}, k = {QUALITY_K}: feature quality, reseed vs "
                 "probe-seed spread")
    return fig


def _l0_plots(out: Path, grid: list[dict], per_k: dict[tuple[str, str, int], float]) -> None:
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
        tuned = ", ".join(f"{a} k={k} lr {lr:g}" for (a, h, k), lr in sorted(per_k.items()) if h == hook)
        fig.suptitle(f"{DEFAULT_MODEL} {hook}: mean +- std over seeds"
                     + (f"\nper-k lr: {tuned}; every other cell at its kind's k = 32 lr" if tuned else ""))
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
    p.add_argument("stage", choices=["sweep", "plateau", "study", "variants", "quality", "letters", "report"])
    p.add_argument("--quick", action="store_true", help="minutes, not hours: small sizes, one seed")
    p.add_argument("--workers", type=int, default=2, help="SAEs trained at once, one thread each")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory [default: benchmarks/out/allocators(-quick)]")
    p.add_argument("--allocators", type=lambda t: t.split(","), default=None,
                   help="comma-separated kinds a stage runs [default: the four; quality: and EXTRA]")
    p.add_argument("--sizes", type=lambda t: tuple(int(n) for n in t.split(",")), default=None,
                   help="sweep: dictionary sizes [default: the scale's]")
    p.add_argument("--lrs", type=lambda t: tuple(float(v) for v in t.split(",")), default=None,
                   help="sweep: the starting lr grid [default: the scale's]")
    p.add_argument("--ks", type=lambda t: tuple(int(v) for v in t.split(",")), default=None,
                   help="study: the k grid [default: the scale's]; sweep: tune the lr at these k "
                        "instead (per-k lr, on the first hook)")
    p.add_argument("--hooks", type=lambda t: tuple(t.split(",")), default=None,
                   help="the hooks the cache holds and the study runs [default: the scale's]")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    scale = replace(scale, hooks=args.hooks or scale.hooks, lrs=args.lrs or scale.lrs, ks=args.ks or scale.ks)
    probing = args.stage in ("quality", "letters")
    allocators = args.allocators or (ALLOCATORS + EXTRA if probing else ALLOCATORS)
    out = args.out or Path("benchmarks/out/allocators" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, scale, args.workers)
    write_json(out / "scale.json", {"model": DEFAULT_MODEL, **scale.__dict__})
    if args.stage == "sweep" and args.ks:
        for k in args.ks:
            sweep_at_k(study, allocators, k)
    elif args.stage == "sweep":
        sweep(study, allocators, args.sizes or scale.n_latents)
    elif args.stage == "plateau":
        plateau(study, allocators)
    elif args.stage == "study":
        study_runs(study, "study", grid_runs(scale, allocators))
    elif args.stage == "variants":
        study_runs(study, "variants", variant_runs(study))
    elif args.stage == "quality":
        quality(study, allocators)
    elif args.stage == "letters":
        letters(study, allocators)
    report(study)


if __name__ == "__main__":
    main()
