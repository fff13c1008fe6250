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
    python benchmarks/circuit_faithfulness.py report             # markdown table + curves PNG

The study appends one JSON line per run to benchmarks/results/circuit_faithfulness.jsonl and
skips runs already there (dictionaries under --work are reused too):
- the sites: per layer, the neurons' own L0 and how many neurons fire at all on the held-out
  text. blocks.1 uses 148 of its 512 neurons (7 a token); blocks.0, 2 and 3 use 512, 414, 500;
- the lr of topk, gradient_topk, feature_choice and mutual_choice (SWEPT), on all four sites
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
- relu (KEPT) keeps the first study's lr 6e-3 and L1 0.0315 (four L1s at that lr, log-log
  interpolated to L0 32; held-out L0 ~35 on four sites), its dictionaries and circuits reused:
  its lr is not swept (each lr would need its own L1 calibration), within the cap (3.5% dead);
- seeds 1 and 2 at each allocator's chosen lr (those of an allocator already bracketed train
  while the others' sweeps go on), the circuits of every dictionary, the neurons and three
  rotations;
- the plateau check last: each allocator (PLATEAU order) at its chosen lr, seed 0, twice the
  budget; the report gives each one's FVU gain.
Reused from the first study (same settings, same ids; the rows moved into this file with their
directories): the neurons' and rotations' circuits, feature_choice's and mutual_choice's lr 2e-3
dictionaries (their sweeps' first point) and relu's. All of the first study's rows, under its
rule, are kept in circuit_faithfulness.v1.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
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
SWEPT = ("topk", "gradient_topk", "feature_choice", "mutual_choice")  # lr swept under this rule
# relu keeps the first study's lr (its calibration lr) and L1 (for L0 ~32), dictionaries and
# circuits reused: sweeping its lr means recalibrating its L1 at each, not affordable here
KEPT = {"relu": (6e-3, 0.0315)}
SEEDS = (0, 1, 2)
MAX_DEAD = 0.05  # of the latents, at each capped site
MIN_EVER = 0.5  # a site takes the dead cap if this fraction of its neurons ever fires
PLATEAU = ("topk", "mutual_choice", "gradient_topk", "feature_choice", "relu")  # in this order
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
    best = pick(rows, sites)
    if best is None or best == grid[0]:
        return grid[0] / LR_STEP
    return grid[-1] * LR_STEP if best == grid[-1] else None


def circuit_job(basis: str, seed: int, row: dict | None = None) -> dict:
    """Circuits of neurons or a rotation, or of the dictionary of a training `row` (its lr and L1
    in the id: an allocator's circuits are those of its chosen lr)."""
    if row is None:
        return {"id": f"circuit:{basis}:{seed}", "stage": "circuit", "basis": basis, "seed": seed}
    tokens = "" if row["tokens"] == TOKENS else f",tokens={row['tokens']}"
    return {"id": f"circuit:{basis}:{seed}:lr={row['lr']},l1={row['l1']}{tokens}", "stage": "circuit",
            "basis": basis, "seed": seed, "dir": row["dir"], "lr": row["lr"], "l1": row["l1"],
            "tokens": row["tokens"]}


def sweep(args, rows: dict[str, dict], sites: list[str]) -> tuple[dict[str, dict], dict[str, float]]:
    """The SWEPT allocators' lrs: seed 0, all four sites (these are the study's seed-0
    dictionaries), LRS then x LR_STEP steps until the chosen lr is bracketed (at most LR_EXTEND
    more)."""
    grids = {a: list(LRS) for a in SWEPT}

    def job(a: str, lr: float) -> dict:
        return train_job("study", a, lr, 0.0, SEEDS[0], HOOKS)

    def settled() -> list[dict]:  # seeds 1 and 2 of the allocators whose lr is already bracketed
        return [train_job("study", a, lr, 0.0, s, HOOKS) for a, g in grids.items()
                if all(job(a, x)["id"] in rows for x in g)
                and next_lr(g, [rows[job(a, x)["id"]] for x in g], sites) is None
                and (lr := pick([rows[job(a, x)["id"]] for x in g], sites)) for s in SEEDS[1:]]

    for _ in range(LR_EXTEND + 1):
        rows = run_jobs(args, [job(a, lr) for a, g in grids.items() for lr in g] + settled())
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
        tried = [rows[job(a, x)["id"]] for x in g]
        chosen[a] = pick(tried, sites) or min(g)  # within the cap once the grid has grown enough
        print(f"{a}: lr {chosen[a]:g}: " + ", ".join(
            f"{r['lr']:g} FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {dead_capped(r, sites):.3f}"
            for r in tried), flush=True)
    return rows, chosen


def study(args) -> None:
    """Sites (which take the dead cap), the SWEPT allocators' lr sweeps (their seed-0
    dictionaries), their seeds 1 and 2 and circuits; then the plateau checks and their
    circuits."""
    rows = run_jobs(args, [{"id": "sites", "stage": "sites"}])
    sites = capped(rows["sites"])
    rows, lrs = sweep(args, rows, sites)
    params = {**{a: (lrs[a], 0.0) for a in SWEPT}, **KEPT}
    for a, (lr, l1) in params.items():
        if f"choice:{a}" not in rows:
            append(args.results, {"id": f"choice:{a}", "stage": "choice", "allocator": a, "lr": lr,
                                  "l1": l1, "capped_sites": sites, "swept": a in SWEPT})
    trains = [train_job("study", a, *params[a], s, HOOKS) for s in SEEDS for a in ALLOCATORS]
    rows = run_jobs(args, trains)
    fixed = [circuit_job("neurons", 0)] + [circuit_job("rotation", s) for s in SEEDS]
    run_jobs(args, fixed + [circuit_job(j["allocator"], j["seed"], rows[j["id"]]) for j in trains])
    longer = [train_job("plateau", a, *params[a], SEEDS[0], HOOKS, 2 * TOKENS) for a in PLATEAU]
    rows = run_jobs(args, longer)
    run_jobs(args, [circuit_job(j["allocator"], j["seed"], rows[j["id"]]) for j in longer])


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


def sweep_rows(rows: list[dict], allocator: str, l1: float) -> list[dict]:
    """An allocator's lr sweep (or check): its seed-0 dictionaries at L1 `l1`, by lr."""
    return sorted((r for r in rows if r["stage"] == "study" and r["allocator"] == allocator
                   and r["seed"] == SEEDS[0] and r["l1"] == l1), key=lambda r: r["lr"])


def plateau_gain(rows: list[dict], allocator: str, choice: dict) -> tuple[float, dict, dict] | None:
    """Relative drop in mean held-out FVU from TOKENS to 2 x TOKENS at the chosen lr (seed 0),
    and the two rows."""
    def at(stage: str) -> list[dict]:
        return [r for r in rows if r["stage"] == stage and r["allocator"] == allocator
                and r["seed"] == SEEDS[0] and (r["lr"], r["l1"]) == (choice["lr"], choice["l1"])]
    base, long = at("study"), at("plateau")
    if not (base and long):
        return None
    return (base[0]["fvu"] - long[0]["fvu"]) / base[0]["fvu"], base[0], long[0]


def training_notes(rows: list[dict], choices: dict[str, dict], uncapped: list[str]) -> list[str]:
    """The sites, each allocator's lr sweep (the chosen lr in bold), the plateau checks."""
    out = []
    site = [r for r in rows if r["stage"] == "sites"]
    if site:
        out.append("- sites (held-out task text): neurons active per token / neurons that ever fire: "
                   + ", ".join(f"{site_name(h)} {site[0]['l0'][h]:.1f} / {site[0]['ever'][h]}" for h in HOOKS)
                   + f"; dead cap {MAX_DEAD:.0%} on " + ", ".join(
                       site_name(h) for h in HOOKS if h not in uncapped))
    out.append("- lr sweeps (seed 0; mean FVU over the four sites, mean L0, dead at the capped sites "
               "(max) / at " + ", ".join(site_name(h) for h in uncapped) + "):")
    for a, c in choices.items():
        tried = sweep_rows(rows, a, c["l1"])
        out.append(f"  - {a}: " + ", ".join(
            (f"**{r['lr']:g}**" if r["lr"] == c["lr"] else f"{r['lr']:g}")
            + f" FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {dead_capped(r, c['capped_sites']):.1%}"
            + "".join(f" / {r['sites'][h]['dead_frac']:.1%}" for h in uncapped) for r in tried)
            + ("" if c.get("swept") else " (lr kept from the first study)"))
    gains = {a: g for a, c in choices.items() if (g := plateau_gain(rows, a, c))}
    if gains:
        out.append(f"- plateau (seed 0, chosen lr; mean FVU at {TOKENS:,} -> {2 * TOKENS:,} tokens, "
                   "its change, dead at the capped sites at the longer budget): " + ", ".join(
                       f"{a} {b['fvu']:.4f} -> {long['fvu']:.4f} ({-g:+.1%}, dead "
                       f"{dead_capped(long, choices[a]['capped_sites']):.1%})"
                       for a, (g, b, long) in gains.items()))
    return out


def report(args) -> None:
    from matplotlib.figure import Figure

    from saelab.evals.render import md_table, save_png

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
    longer = [r for r in rows if r["stage"] == "circuit" and r.get("tokens", TOKENS) != TOKENS]
    if longer:
        lines.append(f"- circuits of the {2 * TOKENS:,}-token dictionaries (seed 0), CPR per task "
                     f"({', '.join(TASKS)}): " + "; ".join(
                         f"{b} " + ", ".join(f"{r['cpr']:.3f}" for t in TASKS for r in longer
                                             if r["basis"] == b and r["task"] == t)
                         for b in BASES if any(r["basis"] == b for r in longer)))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["study", "report"])
    p.add_argument("--work", type=Path, default=Path("runs/circuit_faithfulness"),
                   help="dictionaries and the task-text file")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    args.results = args.out_dir / "circuit_faithfulness.jsonl"
    if args.stage == "report":
        report(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    write_data(args.work / "task_data.jsonl")
    study(args)


if __name__ == "__main__":
    main()
