"""Features against neurons: do dictionary latents make more faithful small circuits than the
MLP neurons they rebuild, or than a random rotation of the same activations?

On the circuit-task model (zoo:tasks-4l-v3: 4 layers, d_mlp 512, ReLU) every basis describes the
same activations, `blocks.L.mlp.hook_post` of every layer:
- neurons: 512 nodes a layer;
- rotation: the same space in a random orthogonal basis, 512 nodes a layer, no error node;
- a dictionary of each allocator (topk, gradient_topk, feature_choice, mutual_choice, relu),
  512 latents a layer (as many nodes as neurons, so a fraction of the nodes means the same
  count in every basis) at L0 ~32 (1/16 of the width, the k the other studies use), plus one
  error node a layer, trained with `saelab.training.train` on the task model's own text (the
  zoo recipe's synthetic task documents, `task_corpus.documents`, with its options).
Node scores are EAP-IG (5 steps, inputs) on 32 prompts a task; faithfulness (CPR, CMD, nodes to
f >= 0.8; `evals.circuits.faithfulness`) on 32 held-out prompts, the same prompts for every
basis (32, not recover's 48, and 131k training tokens: the CPU budget of one shared machine).
Error nodes are ranked and pruned like any node. Dictionaries and rotations: 3 seeds.

    python benchmarks/circuit_faithfulness.py study --workers 1  # everything below; resumable
    python benchmarks/circuit_faithfulness.py study --allocators relu  # only relu's runs
    python benchmarks/circuit_faithfulness.py report             # markdown tables + two PNGs

The study appends one JSON line per run to benchmarks/results/circuit_faithfulness.jsonl and
skips runs already there (dictionaries under --work are reused too):
- the sites: per layer, the neurons' own L0 and how many neurons fire at all on the held-out
  text. blocks.1 uses 148 of its 512 neurons (7 a token); blocks.0, 2 and 3 use 512, 414, 500;
- the lr of topk, gradient_topk, feature_choice and mutual_choice, on all four sites
  at once (the study trains the four from one stream, so the sweep's seed-0 runs are the
  study's seed-0 dictionaries): LRS, then x LR_STEP steps past whichever end holds the chosen
  lr, or below the grid while no lr is within the cap, until the chosen lr has a tried lr on
  each side. Rule: the lowest held-out FVU (mean of the four sites)
  among lrs leaving at most MAX_DEAD of the latents dead at every site where at least MIN_EVER
  of the neurons ever fire -- blocks.0, 2 and 3 here; never "among all runs" when none
  qualifies (that fallback chose lrs with half the latents dead). blocks.1 is left out of the
  cap because 512 latents at k 32 there describe activations living on 148 neurons with 7
  active a token: latents die there at lrs that cost nothing elsewhere, so a cap at that site
  measures the site, not the allocator (its dead fraction is still reported). The first
  study's rule (one site, blocks.1; fallback to all runs) is replaced, not kept beside it;
- relu's lr by the same grid and rule, each lr at its own L1 coefficient for held-out L0 ~K
  (`steered`: the allocator study's `bracket_l1` brackets L0 = K with x2 steps from the nearest
  lr's L1, log-log interpolation, re-interpolated while L0 is more than L0_TOLERANCE off K);
  the first study's relu (lr 6e-3, L1 0.0315, L0 ~35) stays in the file, no longer chosen;
- seeds 1 and 2 at each allocator's chosen lr (those of an allocator already bracketed train
  while the others' sweeps go on), the circuits of every dictionary, the neurons and three
  rotations;
- the plateau check last: each allocator (PLATEAU order) at its chosen lr, seed 0, two and
  four times the budget (BUDGETS; relu at each budget's own L1: its L0 falls as it trains on),
  and their circuits; the report gives FVU and CPR per doubling.
Reused from the first study (same settings, same ids; the rows moved into this file with their
directories): the neurons' and rotations' circuits, feature_choice's and mutual_choice's lr 2e-3
dictionaries (their sweeps' first point) and relu's. All of the first study's rows, under its
rule, are kept in circuit_faithfulness.v1.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import torch

from saelab import allocators
from saelab.data.heldout import heldout_activations
from saelab.data.tokens import TokenData
from saelab.evals import reconstruction_stats
from saelab.evals.circuits.bases import basis as make_basis
from saelab.evals.circuits.bases import rotation
from saelab.evals.circuits.recovery import AttributionConfig, recover
from saelab.evals.render import md_table, save_png
from saelab.models import load_model
from saelab.sae import SAE
from saelab.storage.files import write_text
from saelab.training import TrainConfig, train

MODEL = "zoo:tasks-4l-v3"
RECIPE = "tasks-4l-v3"
HOOKS = tuple(f"blocks.{layer}.mlp.hook_post" for layer in range(4))
SWEEP_HOOK = "blocks.1.mlp.hook_post"
ALLOCATORS = ("topk", "gradient_topk", "feature_choice", "mutual_choice", "relu")
TASKS = ("ioi", "greater-than", "docstring", "induction")
N_LATENTS, K = 512, 32
TOKENS, BATCH = 131_072, 512  # 256 steps; the plateau runs measure what doubling still gains
LRS = (2e-3, 4e-3, 8e-3)  # the first grid; the default rule gives 2.1e-3 at d_in = n = 512
LR_STEP, LR_EXTEND = 2.0, 3  # grid step; at most this many lrs added to bracket the chosen one
L1_START = (0.025, 0.05)  # relu: the first L1 coefficients tried at an lr (the allocator study's)
L0_TOLERANCE = 0.1  # relu: a run within this of L0 = K (relative) needs no other L1
L1_REFINE = 2  # relu: at most this many re-interpolations from every run at one lr and budget
SEEDS = (0, 1, 2)
MAX_DEAD = 0.05  # of the latents, at each capped site
MIN_EVER = 0.5  # a site takes the dead cap if this fraction of its neurons ever fires
PLATEAU = ("topk", "mutual_choice", "gradient_topk", "feature_choice", "relu")  # in this order
BUDGETS = (2 * TOKENS, 4 * TOKENS)  # the plateau runs' budgets: one and two doublings
DOCS = 60_000  # task documents in the data file (~1.5M tokens; ~95% train, 5% held out)
EVAL_TOKENS = 16_384
BUFFER = 2**15  # shuffle-buffer tokens: the default 2^17 x 4 sites x 512 floats took ~4 GB a worker
PROMPTS = 32  # scored, and as many held out, per task


# ---------------------------------------------------------------- data and results


def write_data(path: Path) -> None:
    """The task model's training text as a .jsonl (`saelab train --data` reads it): the zoo
    recipe's synthetic documents with its options (the stdlib share and copy rows left out;
    the circuits are measured on task prompts)."""
    from saelab.zoo import RECIPES, task_corpus

    if path.exists():
        return
    r, tok = RECIPES[RECIPE], load_model(MODEL).tokenizer
    vocab = sorted((w for w in tok.get_vocab() if w not in (task_corpus.EOT, task_corpus.UNK) and w.strip()),
                   key=tok.get_vocab().get)
    docs = task_corpus.documents(12_345, vocab, r.gt_all_starts, r.gt_end_years, r.gt_weight)
    write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in itertools.islice(docs, DOCS)))


def done(results: Path) -> dict[str, dict]:
    from allocators import read_results  # imported where used, as pick_lr is
    return read_results(results)


def append(results: Path, row: dict) -> None:
    with results.open("a") as f:  # one line per O_APPEND write: workers never interleave
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- jobs


class Worker:
    """The model, data and held-out activations one process keeps between jobs."""

    def __init__(self, work: Path, results: Path):
        torch.set_num_threads(1)
        self.work, self.results, self.data = work, results, work / "task_data.jsonl"
        self.model = load_model(MODEL)
        self._held: dict[str, torch.Tensor] = {}

    def held(self, hook: str) -> torch.Tensor:
        if hook not in self._held:
            data = TokenData(str(self.data), "heldout", self.model.context_length)
            self._held[hook] = heldout_activations(self.model, data, hook, EVAL_TOKENS)
        return self._held[hook]

    def train(self, job: dict) -> dict:
        """Train (or reuse) one dictionary per hook of the job; held-out FVU, L0, dead per hook."""
        out = self.work / "runs" / job["id"].replace(":", "_").replace(",", "_").replace("=", "-")
        hooks = list(job["hooks"])
        dirs = {h: out / h for h in hooks} if len(hooks) > 1 else {hooks[0]: out}
        start = time.perf_counter()
        if not all((d / "cfg.json").exists() for d in dirs.values()):
            train(TrainConfig.of(model=MODEL, hook=hooks if len(hooks) > 1 else hooks[0],
                                 data=str(self.data), context_length=self.model.context_length,
                                 n_latents=N_LATENTS, k=K, allocator=job["allocator"], lr=job["lr"],
                                 l1_coefficient=job["l1"], tokens=job["tokens"], batch_size=BATCH,
                                 seed=job["seed"], out=str(out), overwrite=True, checkpoint_every=0,
                                 buffer_tokens=BUFFER))
        stats = {}
        for h, d in dirs.items():
            sae = SAE.load(str(d))
            s = reconstruction_stats(sae, self.held(h))
            stats[h] = {k: round(s[k], 5) for k in ("fvu", "l0", "dead_frac")}
        return {**job, "dir": str(out), "sites": stats, "seconds": round(time.perf_counter() - start, 1),
                "fvu": round(statistics.mean(s["fvu"] for s in stats.values()), 5),
                "l0": round(statistics.mean(s["l0"] for s in stats.values()), 2),
                "dead_frac": round(max(s["dead_frac"] for s in stats.values()), 5)}

    def circuits(self, job: dict) -> list[dict]:
        """EAP-IG circuits of one basis on every task."""
        if job["basis"] == "neurons":
            b = make_basis(self.model, "neurons")
        elif job["basis"] == "rotation":
            b = rotation(self.model, job["seed"])
        else:
            b = make_basis(self.model, job["dir"])
        cfg = AttributionConfig(attr_prompts=PROMPTS, faith_prompts=PROMPTS, completeness=False)
        rows = []
        for task in TASKS:
            tid = f"{job['id']}:{task}"
            if tid in done(self.results):
                continue
            start = time.perf_counter()
            r = recover(self.model, task, b, "eap-ig", cfg, progress=False, truth=False)
            f = r["faithfulness"]
            row = {"id": tid, "stage": "circuit", "basis": job["basis"], "seed": job["seed"],
                   **{k: job[k] for k in ("lr", "l1", "tokens") if k in job}, "task": task,
                   "method": "eap-ig",
                   "metric": r["metric"], "nodes": r["nodes"],
                   "error_nodes": r["error_nodes"], "cpr": r["cpr"], "cmd": r["cmd"],
                   "nodes_to_08": r["nodes_to_08"], "sizes": f["sizes"],
                   "fractions": f["fractions"], "faithfulness": f["faithfulness"],
                   "error_nodes_kept": f["error_nodes_kept"], "m_full": f["m_full"],
                   "m_empty": f["m_empty"], "seconds": round(time.perf_counter() - start, 1)}
            append(self.results, row)
            rows.append(row)
            print(f"{tid}: CPR {row['cpr']:.3f} CMD {row['cmd']:.3f} to0.8 {row['nodes_to_08']} "
                  f"({row['seconds']:.0f} s)", flush=True)
        return rows

    def sites(self) -> dict:
        """Per site, the neurons' own L0 (ReLU: exact zeros) and how many neurons fire at all
        on the held-out text: how many directions the site's activations use."""
        on = {h: self.held(h) > 0 for h in HOOKS}
        return {"id": "sites", "stage": "sites",
                "l0": {h: round(float(a.sum(-1).float().mean()), 2) for h, a in on.items()},
                "ever": {h: int(a.any(0).sum()) for h, a in on.items()}}

    def run(self, job: dict) -> None:
        if job["id"] in done(self.results):
            return
        if job["stage"] == "sites":
            append(self.results, self.sites())
            return
        if job["stage"] == "circuit":
            self.circuits(job)
            return
        row = self.train(job)
        append(self.results, row)
        print(f"{job['id']}: FVU {row['fvu']:.4f} L0 {row['l0']:.1f} dead {row['dead_frac']:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)


_WORKER: Worker | None = None


def _start(work: Path, results: Path) -> None:
    global _WORKER
    _WORKER = Worker(work, results)


def _run(job: dict) -> None:
    assert _WORKER is not None
    _WORKER.run(job)


def run_jobs(args, jobs: list[dict]) -> dict[str, dict]:
    """Run the jobs not yet in the results, `--workers` at a time; every row by id."""
    todo = [j for j in jobs if j["id"] not in done(args.results)
            and not (j["stage"] == "circuit" and all(f"{j['id']}:{t}" in done(args.results) for t in TASKS))]
    if args.workers > 1 and len(todo) > 1:
        try:
            with ProcessPoolExecutor(min(args.workers, len(todo)), mp_context=get_context("spawn"),
                                     initializer=_start, initargs=(args.work, args.results)) as pool:
                list(pool.map(_run, todo))
        except BrokenProcessPool:  # a worker was killed (out of memory on a shared machine)
            print("a worker died; running the jobs left again", flush=True)
            return run_jobs(args, jobs)
    elif todo:
        _start(args.work, args.results)
        for j in todo:
            _run(j)
    return done(args.results)


def train_job(stage: str, allocator: str, lr: float, l1: float, seed: int, hooks: tuple[str, ...],
              tokens: int = TOKENS) -> dict:
    kind = allocators.get(allocator)
    key = f"l1={l1}" if not kind.budget else f"k={K}"
    return {"id": f"{stage}:{allocator},{key},lr={lr},seed={seed},tokens={tokens},hooks={len(hooks)}",
            "stage": stage, "allocator": allocator, "lr": lr, "l1": l1, "seed": seed,
            "hooks": list(hooks), "tokens": tokens}


# ---------------------------------------------------------------- stages


def capped(site_row: dict) -> list[str]:
    """The sites the dead cap applies to: those where at least half the neurons fire somewhere
    on the held-out text (see the module docstring)."""
    return [h for h in HOOKS if site_row["ever"][h] >= N_LATENTS * MIN_EVER]


def dead_capped(row: dict, sites: list[str]) -> float:
    return max(row["sites"][h]["dead_frac"] for h in sites)


def pick(rows: list[dict], sites: list[str]) -> float | None:
    """The lr of the lowest mean held-out FVU among runs within the dead cap on `sites`; None
    when no run is (then the grid extends down instead of falling back to all runs)."""
    from allocators import pick_lr  # imported where used: benchmarks/ is not a package

    eligible = [{**r, "dead_frac": dead_capped(r, sites)} for r in rows]
    if all(r["dead_frac"] > MAX_DEAD for r in eligible):
        return None
    return pick_lr(eligible, MAX_DEAD)


def next_lr(grid: list[float], rows: list[dict], sites: list[str]) -> float | None:
    """The lr to add so that the chosen one has a tried lr on each side (x LR_STEP past the end
    that holds it, or below the grid when none is within the cap); None once it has."""
    from allocators import bracket_step

    return bracket_step(grid, pick(rows, sites), LR_STEP)


def circuit_job(basis: str, seed: int, row: dict | None = None) -> dict:
    """Circuits of neurons or a rotation, or of the dictionary of a training `row` (its lr and L1
    in the id: an allocator's circuits are those of its chosen lr)."""
    if row is None:
        return {"id": f"circuit:{basis}:{seed}", "stage": "circuit", "basis": basis, "seed": seed}
    tokens = "" if row["tokens"] == TOKENS else f",tokens={row['tokens']}"
    return {"id": f"circuit:{basis}:{seed}:lr={row['lr']},l1={row['l1']}{tokens}", "stage": "circuit",
            "basis": basis, "seed": seed, "dir": row["dir"], "lr": row["lr"], "l1": row["l1"],
            "tokens": row["tokens"]}


def sweep(args, rows: dict[str, dict], sites: list[str],
          kinds: list[str]) -> tuple[dict[str, dict], dict[str, float]]:
    """The lrs of `kinds` (budget allocators): seed 0, all four sites (these are the study's
    seed-0 dictionaries), LRS then x LR_STEP steps until the chosen lr is bracketed (at most
    LR_EXTEND more)."""
    grids = {a: list(LRS) for a in kinds}

    def job(a: str, lr: float) -> dict:
        return train_job("study", a, lr, 0.0, SEEDS[0], HOOKS)

    def settled() -> list[dict]:  # seeds 1 and 2 of the allocators whose lr is already bracketed
        return [train_job("study", a, lr, 0.0, s, HOOKS) for a, g in grids.items()
                if all(job(a, x)["id"] in rows for x in g)
                and next_lr(g, [rows[job(a, x)["id"]] for x in g], sites) is None
                and (lr := pick([rows[job(a, x)["id"]] for x in g], sites)) for s in SEEDS[1:]]

    for round_ in range(LR_EXTEND + 1):
        rows = run_jobs(args, [job(a, lr) for a, g in grids.items() for lr in g] + settled())
        if round_ == LR_EXTEND:  # an lr added now would never be trained
            break
        moved = False
        for a, g in grids.items():
            lr = next_lr(g, [rows[job(a, x)["id"]] for x in g], sites)
            if lr is not None:
                g.insert(0, lr) if lr < g[0] else g.append(lr)
                moved = True
        if not moved:
            break
    chosen = {}
    for a, g in grids.items():
        chosen[a] = report_choice(a, [rows[job(a, x)["id"]] for x in g], sites)
    return rows, chosen


def report_choice(allocator: str, tried: list[dict], sites: list[str]) -> float:
    """The chosen lr of a sweep (within the cap once the grid has grown enough), printed with
    every tried lr."""
    lr = pick(tried, sites) or min(r["lr"] for r in tried)
    print(f"{allocator}: lr {lr:g}: " + ", ".join(
        f"{r['lr']:g} (L1 {r['l1']:g}) FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {dead_capped(r, sites):.3f}"
        for r in tried), flush=True)
    return lr


def runs_at(rows: dict[str, dict], allocator: str, lr: float, tokens: int) -> list[dict]:
    """Every seed-0 dictionary of `allocator` trained at (`lr`, `tokens`), whatever its L1."""
    return [r for r in rows.values() if r["stage"] in ("study", "plateau") and r["allocator"] == allocator
            and (r["lr"], r["tokens"], r["seed"]) == (lr, tokens, SEEDS[0])]


def nearest_k(runs: list[dict]) -> dict:
    """The run whose held-out L0 is nearest K (log scale): an L1-steered kind's dictionary at an
    (lr, budget) among the L1s tried there; the one run of a budget allocator."""
    return min(runs, key=lambda r: abs(math.log(r["l0"] / K)))


def steered(args, allocator: str, lr: float, tokens: int, stage: str,
            start: tuple[float, ...] = L1_START) -> dict:
    """Seed 0 of an L1-steered kind (relu) at `lr` and `tokens`, at the L1 for held-out L0 ~K:
    the run nearest K among those tried there (any L1, all as `stage`; none: `start`'s) if
    within L0_TOLERANCE; else the allocator study's `bracket_l1` brackets K from them and
    the interpolated L1 is trained, re-interpolated from every run while off K (at most
    L1_REFINE times). Its L0 drifts with lr and budget (at lr 6e-3: 35.6 at 131k tokens, 27.4 at
    262k with one L1), so each (lr, budget) gets its own."""
    from allocators import bracket_l1  # imported where used: benchmarks/ is not a package

    def tried() -> list[dict]:
        return runs_at(done(args.results), allocator, lr, tokens)

    def run(l1s: list[float]) -> list[dict]:
        have = {r["l1"] for r in tried()}
        run_jobs(args, [train_job(stage, allocator, lr, v, SEEDS[0], HOOKS, tokens)
                        for v in l1s if v not in have])
        by_l1 = {r["l1"]: r for r in tried()}
        return [{**by_l1[v], "l1_coefficient": v} for v in l1s]

    for _ in range(L1_REFINE + 1):
        have = tried() or run(sorted(start))  # a first try on K needs no bracket
        if abs(nearest_k(have)["l0"] / K - 1) <= L0_TOLERANCE:
            break
        l1, _ = bracket_l1(run, sorted({r["l1"] for r in have}), K, LR_EXTEND)
        run([l1])
    best = nearest_k(tried())
    print(f"{allocator} lr {lr:g}, {tokens:,} tokens: " + ", ".join(
        f"L1 {r['l1']:g} L0 {r['l0']:.1f}" for r in sorted(tried(), key=lambda r: r["l1"]))
        + f" -> L1 {best['l1']:g}", flush=True)
    return best


def steered_sweep(args, sites: list[str], allocator: str) -> tuple[float, float, list[dict]]:
    """(lr, L1) of an L1-steered kind under the budget allocators' rule, each lr at its own L1
    for L0 ~K (`steered`, first trying the L1 of the nearest lr already steered): LRS, x LR_STEP
    steps until the chosen lr is bracketed; and the runs compared."""
    grid, found = list(LRS), {}

    def at(lr: float) -> dict:
        if lr not in found:
            near = min(found, key=lambda x: abs(math.log(x / lr)), default=None)
            found[lr] = steered(args, allocator, lr, TOKENS, "study",
                                L1_START if near is None else (found[near]["l1"],))
        return found[lr]

    for _ in range(LR_EXTEND):  # at most LR_EXTEND lrs added; `tried` trains the last
        lr = next_lr(grid, [at(x) for x in grid], sites)
        if lr is None:
            break
        grid.insert(0, lr) if lr < grid[0] else grid.append(lr)
    tried = [at(x) for x in grid]
    lr = report_choice(allocator, tried, sites)
    return lr, next(r["l1"] for r in tried if r["lr"] == lr), tried


def study(args) -> None:
    """Sites (which take the dead cap), the lr sweeps of `--allocators` (their seed-0
    dictionaries; relu's with an L1 per lr), their seeds 1 and 2 and circuits; then the plateau
    checks and their circuits."""
    from allocators import l1_steered

    kinds = [a for a in ALLOCATORS if a in args.allocators.split(",")]
    rows = run_jobs(args, [{"id": "sites", "stage": "sites"}])
    sites = capped(rows["sites"])
    rows, lrs = sweep(args, rows, sites, [a for a in kinds if not l1_steered(a)])
    params, l1s = {a: (lr, 0.0) for a, lr in lrs.items()}, {}
    for a in [a for a in kinds if l1_steered(a)]:
        lr, l1, tried = steered_sweep(args, sites, a)
        params[a], l1s[a] = (lr, l1), [[r["lr"], r["l1"]] for r in tried]
    rows = done(args.results)
    for a, (lr, l1) in params.items():
        old = rows.get(f"choice:{a}")
        if old is None or not old["swept"] or (old["lr"], old["l1"]) != (lr, l1):  # the later row wins
            append(args.results, {"id": f"choice:{a}", "stage": "choice", "allocator": a, "lr": lr, "l1": l1,
                                  "capped_sites": sites, "swept": True,
                                  **({"l1s": l1s[a]} if a in l1s else {})})
    trains = [train_job("study", a, *params[a], s, HOOKS) for s in SEEDS for a in kinds]
    rows = run_jobs(args, trains)
    fixed = [circuit_job("neurons", 0)] + [circuit_job("rotation", s) for s in SEEDS]
    run_jobs(args, fixed + [circuit_job(j["allocator"], j["seed"], rows[j["id"]]) for j in trains])
    longer = [train_job("plateau", a, *params[a], SEEDS[0], HOOKS, t) for t in BUDGETS
              for a in PLATEAU if a in kinds and not l1_steered(a)]
    rows = run_jobs(args, longer)
    dicts = [rows[j["id"]] for j in longer]
    for a in [a for a in PLATEAU if a in kinds and l1_steered(a)]:
        lr, l1 = params[a]
        for t in BUDGETS:  # each budget first tries the L1 of the one before
            dicts.append(steered(args, a, lr, t, "plateau", (l1,)))
            l1 = dicts[-1]["l1"]
    run_jobs(args, [circuit_job(r["allocator"], r["seed"], r) for r in dicts])


# ---------------------------------------------------------------- report

BASES = ("neurons", "rotation", *ALLOCATORS)
COLOURS = dict(zip(BASES, ("black", "grey", "tab:blue", "tab:orange", "tab:green", "tab:red",
                           "tab:purple"), strict=True))


def mean_std(values: list) -> str:
    """mean ± sample std (counts to whole numbers), or the one value."""
    if not values:
        return "n/a"
    counts = all(isinstance(v, int) for v in values)
    if len(values) == 1:
        return str(values[0]) if counts else f"{values[0]:.3f}"
    d = 0 if counts else 3
    return f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values):.{d}f}"


def site_name(hook: str) -> str:
    return f"blocks.{hook.split('.')[1]}"


def sweep_rows(rows: list[dict], choice: dict) -> list[dict]:
    """An allocator's lr sweep: its seed-0 dictionaries at each tried lr's L1 (relu: the L1 for
    L0 ~K at that lr, `l1s`; the others: 0), by lr."""
    pairs = {(lr, l1) for lr, l1 in choice.get("l1s", [])}
    return sorted((r for r in rows if r["stage"] == "study" and r["allocator"] == choice["allocator"]
                   and r["seed"] == SEEDS[0] and r["tokens"] == TOKENS
                   and ((r["lr"], r["l1"]) in pairs if pairs else r["l1"] == choice["l1"])),
                  key=lambda r: r["lr"])


def by_budget(rows: list[dict], choice: dict) -> dict[int, dict]:
    """Seed 0 of an allocator at its chosen lr at TOKENS and each of BUDGETS (`nearest_k` of the
    runs there: relu's L1 is set per budget), for the budgets it has run at."""
    keyed = {r["id"]: r for r in rows}
    return {t: nearest_k(found) for t in (TOKENS, *BUDGETS)
            if (found := runs_at(keyed, choice["allocator"], choice["lr"], t))}


def budget_cpr(rows: list[dict], run: dict) -> dict[str, float]:
    """CPR per task of the circuits of one training row."""
    return {r["task"]: r["cpr"] for r in rows if r["stage"] == "circuit" and r["basis"] == run["allocator"]
            and r["seed"] == run["seed"] and (r["lr"], r["l1"], r.get("tokens", TOKENS))
            == (run["lr"], run["l1"], run["tokens"])}


def plateau_lines(rows: list[dict], choices: dict[str, dict]) -> list[str]:
    """Per allocator (seed 0, chosen lr), each budget's mean FVU (change per doubling), L0, dead
    at the capped sites and CPR per task: how far from a plateau the study's budget is."""
    head = ["allocator"] + [f"{t:,} tokens: FVU (per doubling) / L0 / dead" for t in (TOKENS, *BUDGETS)] + [
        f"CPR {t} (" + " -> ".join(f"{b / 1000:.0f}k" for b in (TOKENS, *BUDGETS)) + ")" for t in TASKS]
    table = []
    for a, c in choices.items():
        runs = by_budget(rows, c)
        if len(runs) < 2:
            continue
        fvus = [runs[t]["fvu"] if t in runs else None for t in (TOKENS, *BUDGETS)]
        cells = []
        for i, t in enumerate((TOKENS, *BUDGETS)):
            if t not in runs:
                cells.append("n/a")
                continue
            r, prev = runs[t], fvus[i - 1] if i else None
            step = f" ({r['fvu'] / prev - 1:+.1%})" if prev else ""
            l1 = f" (L1 {r['l1']:g})" if r["l1"] else ""
            dead = dead_capped(r, c["capped_sites"])
            cells.append(f"{r['fvu']:.4f}{step} / {r['l0']:.1f}{l1} / {dead:.1%}")
        cprs = [budget_cpr(rows, runs[t]) for t in runs]
        table.append([a, *cells, *(" -> ".join(f"{cp[task]:.3f}" if task in cp else "n/a" for cp in cprs)
                                  for task in TASKS)])
    if not table:
        return []
    return ["", f"Budget (seed 0, each allocator's chosen lr; relu at each budget's own L1 for L0 ~{K}): "
            "mean held-out FVU, its change from the budget before, L0, dead at the capped sites; CPR per "
            "task at each budget:", "", *md_table(head, table)]


def training_notes(rows: list[dict], choices: dict[str, dict], uncapped: list[str]) -> list[str]:
    """The sites and each allocator's lr sweep (the chosen lr in bold)."""
    out = []
    site = [r for r in rows if r["stage"] == "sites"]
    if site:
        out.append("- sites (held-out task text): neurons active per token / neurons that ever fire: "
                   + ", ".join(f"{site_name(h)} {site[0]['l0'][h]:.1f} / {site[0]['ever'][h]}" for h in HOOKS)
                   + f"; dead cap {MAX_DEAD:.0%} on " + ", ".join(
                       site_name(h) for h in HOOKS if h not in uncapped))
    out.append("- lr sweeps (seed 0; mean FVU over the four sites, mean L0, dead at the capped sites "
               "(max) / at " + ", ".join(site_name(h) for h in uncapped) + "; relu: each lr at its own L1):")
    for c in choices.values():
        out.append(f"  - {c['allocator']}: " + ", ".join(
            (f"**{r['lr']:g}**" if r["lr"] == c["lr"] else f"{r['lr']:g}")
            + (f" (L1 {r['l1']:g})" if r["l1"] else "")
            + f" FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {dead_capped(r, c['capped_sites']):.1%}"
            + "".join(f" / {r['sites'][h]['dead_frac']:.1%}" for h in uncapped) for r in sweep_rows(rows, c)))
    return out


def report(args) -> None:
    from matplotlib.figure import Figure

    rows = list(done(args.results).values())
    choices = {r["allocator"]: r for r in rows if r["stage"] == "choice"}

    def chosen(r: dict) -> bool:  # a dictionary at its allocator's chosen lr and L1 and the budget
        c = choices.get(r["allocator"] if r["stage"] == "study" else r["basis"])
        return c is not None and (r["lr"], r["l1"], r.get("tokens", TOKENS)) == (c["lr"], c["l1"], TOKENS)

    circ = [r for r in rows if r["stage"] == "circuit"
            and (r["basis"] in ("neurons", "rotation") or chosen(r))]
    trained = {(r["allocator"], r["seed"]): r for r in rows if r["stage"] == "study" and chosen(r)}
    capped_sites = next(iter(choices.values()))["capped_sites"] if choices else list(HOOKS)
    uncapped = [h for h in HOOKS if h not in capped_sites]

    def values(basis: str, task: str, key) -> list:
        return [key(r) if callable(key) else r[key] for r in circ
                if r["basis"] == basis and r["task"] == task]

    def to08(basis: str, task: str) -> str:
        vals = values(basis, task, "nodes_to_08")
        if not vals:
            return "n/a"
        missing = sum(v is None for v in vals)
        vals = [v for v in vals if v is not None]
        s = mean_std(vals) if vals else "never"
        return s + (f" ({missing} never)" if missing and vals else "")

    def at(k: int):
        return lambda r: r["faithfulness"][r["sizes"].index(k)]

    def errors08(r: dict) -> int | None:
        return None if r["nodes_to_08"] is None else r["error_nodes_kept"][r["sizes"].index(r["nodes_to_08"])]

    lines = [f"EAP-IG node scores on {PROMPTS} prompts a task, faithfulness on {PROMPTS} held-out ones; "
             "mean ± std over seeds (neurons: one basis). Nodes: 2,048 (+4 error nodes for a "
             "dictionary). FVU and L0: held-out task text, mean of the four sites; dead: the "
             "largest fraction at the capped sites / at " + ", ".join(site_name(h) for h in uncapped)
             + f"; lr: each allocator's own (the sweep below), {TOKENS:,} training tokens.", ""]
    bases = [b for b in BASES if any(r["basis"] == b for r in circ)]

    def seeds(b: str) -> list[int]:
        return sorted({r["seed"] for r in circ if r["basis"] == b})

    def fit(b: str, key) -> str:
        fits = [key(trained[(b, s)]) for s in seeds(b) if (b, s) in trained]
        return mean_std(fits) if fits else "n/a"

    def dead(b: str) -> str:
        return fit(b, lambda r: dead_capped(r, capped_sites)) + "".join(
            " / " + fit(b, lambda r, h=h: r["sites"][h]["dead_frac"]) for h in uncapped)

    def lr(b: str) -> str:
        c = choices.get(b)
        return "n/a" if c is None else f"{c['lr']:g}" + (f" (L1 {c['l1']:g})" if c["l1"] else "")

    lines += ["CPR (higher is better) / CMD (lower is better):", ""]
    lines += md_table(["basis", "seeds", "lr", "FVU", "L0", "dead"] + list(TASKS), [
        [b, str(len(seeds(b))), lr(b), "0" if b in ("neurons", "rotation") else fit(b, lambda r: r["fvu"]),
         fit(b, lambda r: r["l0"]), dead(b)]
        + [f"{mean_std(values(b, t, 'cpr'))} / {mean_std(values(b, t, 'cmd'))}" for t in TASKS]
        for b in bases])
    lines += ["", "Smallest evaluated circuit with f >= 0.8 (error nodes it keeps) / f of the top "
              "20 nodes / f of the top 50 nodes:", ""]
    lines += md_table(["basis"] + list(TASKS), [
        [b] + [f"{to08(b, t)} ({mean_std([e for e in values(b, t, errors08) if e is not None])}) / "
               f"{mean_std(values(b, t, at(20)))} / {mean_std(values(b, t, at(50)))}" for t in TASKS]
        for b in bases])
    lines += ["", *training_notes(rows, choices, uncapped)]
    lines += plateau_lines(rows, choices)
    text = "\n".join(lines) + "\n"
    write_text(args.out_dir / "circuit_faithfulness.md", text)
    print(text)

    fig = Figure(figsize=(14, 3.6))
    for i, task in enumerate(TASKS):
        ax = fig.add_subplot(1, len(TASKS), i + 1)
        for b in BASES:
            runs = [r for r in circ if r["basis"] == b and r["task"] == task]
            if not runs:
                continue
            x = runs[0]["fractions"]
            f = torch.tensor([r["faithfulness"] for r in runs])
            mean = f.mean(0)
            ax.plot(x[1:], mean[1:], color=COLOURS[b], label=b, lw=1.5 if b in ("neurons", "rotation") else 1)
            if len(runs) > 1:
                sd = f.std(0)
                ax.fill_between(x[1:], (mean - sd)[1:], (mean + sd)[1:], color=COLOURS[b], alpha=0.15)
        ax.axhline(0.8, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("fraction of nodes kept")
        if i == 0:
            ax.set_ylabel("faithfulness f")
            ax.legend(fontsize=7)
    fig.suptitle(f"{MODEL}, mlp.hook_post x 4 layers (2,048 nodes + error nodes): EAP-IG circuits",
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, args.out_dir / "circuit_faithfulness.png")
    if plateau_lines(rows, choices):
        save_png(budget_figure(rows, choices, circ), args.out_dir / "circuit_faithfulness_budget.png")


def budget_figure(rows: list[dict], choices: dict[str, dict], circ: list[dict]):
    """Mean FVU and mean CPR over the tasks against the training budget, seed 0 of each
    allocator (`by_budget`), the neurons' and rotations' CPR as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    fvu_ax, cpr_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for a, c in choices.items():
        runs = by_budget(rows, c)
        tokens = sorted(runs)
        fvu_ax.plot(tokens, [runs[t]["fvu"] for t in tokens], "o-", color=COLOURS[a], label=a)
        cprs = [(t, cp) for t in tokens if len(cp := budget_cpr(rows, runs[t])) == len(TASKS)]
        cpr_ax.plot([t for t, _ in cprs], [statistics.mean(cp.values()) for _, cp in cprs], "o-",
                    color=COLOURS[a], label=a)
    for b in ("neurons", "rotation"):
        cpr = [r["cpr"] for r in circ if r["basis"] == b]
        if cpr:
            cpr_ax.axhline(statistics.mean(cpr), color=COLOURS[b], ls="--", lw=1, label=f"{b} (not trained)")
    for ax, name in ((fvu_ax, "held-out FVU, mean of the four sites"),
                     (cpr_ax, "CPR, mean of the four tasks")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(name)
    fvu_ax.set_yscale("log")
    cpr_ax.legend(fontsize=7)
    fig.suptitle("Seed 0 of each allocator at its chosen lr: does the budget move FVU and circuits?",
                 fontsize=10)
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["study", "report"])
    p.add_argument("--work", type=Path, default=Path("runs/circuit_faithfulness"),
                   help="dictionaries and the task-text file")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="study: whose runs, comma-separated")
    args = p.parse_args()
    args.results = args.out_dir / "circuit_faithfulness.jsonl"
    if unknown := set(args.allocators.split(",")) - set(ALLOCATORS):
        p.error(f"--allocators: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ALLOCATORS)}")
    if args.stage == "report":
        report(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    write_data(args.work / "task_data.jsonl")
    study(args)


if __name__ == "__main__":
    main()
