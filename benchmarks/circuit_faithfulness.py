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

    python benchmarks/circuit_faithfulness.py study --workers 2  # everything below; resumable
    python benchmarks/circuit_faithfulness.py report             # markdown table + curves PNG

The study appends one JSON line per run to benchmarks/results/circuit_faithfulness.jsonl and
skips runs already there (dictionaries under --work are reused too):
- relu's L1 coefficient for L0 ~K: four values at CALIBRATE_LR, log-log interpolated (relu
  keeps that lr: its lr is not swept, for time);
- the lr of each other allocator: LRS on one site (`SWEEP_HOOK`) at the study's budget, one
  seed, picked by held-out FVU among runs leaving at most 5% of latents dead, among all runs if
  none does (benchmarks/allocators.py's rule);
- the plateau check: topk at twice the budget (its gain is in the report);
- the dictionaries (every allocator x seed, all four sites from one stream) and their circuits,
  the neurons' and the rotations'.
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
TOKENS, BATCH = 131_072, 512  # 256 steps; `plateau` measures what doubling still gains
LRS = (2e-3, 6e-3, 1.8e-2)  # the default rule gives 2.1e-3 at d_in = n = 512
L1S = (0.0125, 0.025, 0.05, 0.1)  # relu's L1 coefficients tried at CALIBRATE_LR
CALIBRATE_LR = 6e-3
SEEDS = (0, 1, 2)
MAX_DEAD = 0.05
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
            if "neurons:l0" not in done(self.results):  # the neurons' own L0 (ReLU: exact zeros)
                l0 = {h: round(float((self.held(h) > 0).sum(-1).float().mean()), 2) for h in HOOKS}
                append(self.results, {"id": "neurons:l0", "stage": "neurons", "sites": l0,
                                      "l0": round(statistics.mean(l0.values()), 2)})
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
                   "task": task, "method": "eap-ig", "metric": r["metric"], "nodes": r["nodes"],
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

    def run(self, job: dict) -> None:
        if job["id"] in done(self.results):
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


def calibrated_l1(rows: list[dict]) -> float:
    """relu's L1 coefficient for L0 = K: log-log interpolation between the two tried values
    whose L0s bracket K (the nearest one if none do)."""
    pts = sorted((r["l1"], r["l0"]) for r in rows)
    for (a, la), (b, lb) in itertools.pairwise(pts):
        if (la - K) * (lb - K) <= 0 and la != lb:
            t = (math.log(K) - math.log(la)) / (math.log(lb) - math.log(la))
            return round(math.exp(math.log(a) + t * (math.log(b) - math.log(a))), 4)
    return min(pts, key=lambda p: abs(math.log(p[1] / K)))[0]


def calibration_jobs() -> list[dict]:
    return [train_job("l1", "relu", CALIBRATE_LR, l1, 0, (SWEEP_HOOK,)) for l1 in L1S]


def lr_jobs(allocator: str, l1: float) -> list[dict]:
    return [train_job("sweep", allocator, lr, l1, 0, (SWEEP_HOOK,)) for lr in LRS]


def best_lr(allocator: str, rows: list[dict]) -> float:
    """benchmarks/allocators.py's pick: the lowest FVU within the dead cap (among all runs if
    none is)."""
    from allocators import pick_lr

    lr = pick_lr(rows, MAX_DEAD)
    print(f"{allocator}: lr {lr} (l1 {rows[0]['l1']}): " + ", ".join(
        f"{r['lr']}: FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {r['dead_frac']:.3f}" for r in rows),
        flush=True)
    return lr


def plateau_job(lr: float) -> dict:
    return train_job("plateau", "topk", lr, 0.0, 0, (SWEEP_HOOK,), 2 * TOKENS)


def circuit_job(basis: str, seed: int, row: dict | None = None) -> dict:
    return {"id": f"circuit:{basis}:{seed}", "stage": "circuit", "basis": basis, "seed": seed,
            **({"dir": row["dir"]} if row else {})}


def study(args) -> None:
    """relu's L1 and the other allocators' lrs first; then seed by seed (so that a study cut
    short holds whole seeds), each wave training the next seed's dictionaries while the last
    seed's circuits are scored."""
    budget = [a for a in ALLOCATORS if allocators.get(a).budget]
    calib = calibration_jobs()
    sweeps = {a: lr_jobs(a, 0.0) for a in budget}
    rows = run_jobs(args, calib)
    l1 = calibrated_l1([rows[j["id"]] for j in calib])
    print(f"relu: l1 {l1} for L0 ~{K} at lr {CALIBRATE_LR}", flush=True)

    def lr_of(a: str) -> tuple[float, float]:
        return (best_lr(a, [rows[j["id"]] for j in sweeps[a]]), 0.0) if a in budget else (CALIBRATE_LR, l1)

    # the first seed's dictionaries of the allocators whose lrs are known train beside the sweep
    ready = [a for a in ALLOCATORS if a not in budget or all(j["id"] in rows for j in sweeps[a])]
    first = [train_job("study", a, *lr_of(a), SEEDS[0], HOOKS) for a in ready]
    fixed = [circuit_job("neurons", 0), circuit_job("rotation", SEEDS[0])]
    rows = run_jobs(args, fixed + [j for js in sweeps.values() for j in js] + first)
    lrs = {a: lr_of(a) for a in ALLOCATORS}
    trains = {s: [train_job("study", a, *lrs[a], s, HOOKS) for a in ALLOCATORS] for s in SEEDS}
    extra = {SEEDS[1]: [plateau_job(lrs["topk"][0])]}
    earlier: list[dict] = []  # dictionaries of the seeds before this wave's
    for s in [*SEEDS, None]:
        now = (trains[s] + [circuit_job("rotation", s)] + extra.get(s, [])) if s is not None else []
        trained = earlier + [j for j in now if j["id"] in rows]
        rows = run_jobs(args, now + [circuit_job(j["allocator"], j["seed"], rows[j["id"]]) for j in trained
                                     if j["stage"] == "study"])
        earlier += trains[s] if s is not None else []


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


def training_notes(rows: list[dict]) -> list[str]:
    """The sweep's lrs (the chosen one in bold), relu's L1, the plateau check, the neurons' L0."""
    out = []
    study = {r["allocator"]: r for r in rows if r["stage"] == "study"}
    for a in ALLOCATORS:
        tried = sorted((r for r in rows if r["stage"] == "sweep" and r["allocator"] == a),
                       key=lambda r: r["lr"])
        if a in study and tried:
            out.append(f"- {a}: " + ", ".join(
                (f"**{r['lr']:g}**" if r["lr"] == study[a]["lr"] else f"{r['lr']:g}")
                + f" FVU {r['fvu']:.4f} L0 {r['l0']:.1f} dead {r['dead_frac']:.1%}" for r in tried)
                + (f" (l1 {study[a]['l1']})" if not allocators.get(a).budget else ""))
    calib = sorted((r for r in rows if r["stage"] == "l1"), key=lambda r: r["l1"])
    if calib:
        out.append(f"- relu L1 at lr {CALIBRATE_LR:g}: " + ", ".join(
            f"{r['l1']:g} L0 {r['l0']:.1f}" for r in calib))
    plat = [r for r in rows if r["stage"] == "plateau"]
    base = [r for r in rows if r["stage"] == "sweep" and r["allocator"] == "topk"
            and plat and r["lr"] == plat[0]["lr"]]
    if plat and base:
        gain = (base[0]["fvu"] - plat[0]["fvu"]) / base[0]["fvu"]
        out.append(f"- plateau: topk on {SWEEP_HOOK} at lr {plat[0]['lr']:g}, FVU {base[0]['fvu']:.4f} "
                   f"at {TOKENS:,} tokens, {plat[0]['fvu']:.4f} at {2 * TOKENS:,} "
                   + (f"(doubling gains {gain:.1%})" if gain >= 0 else
                      f"(the longer run collapsed, {plat[0]['dead_frac']:.0%} dead: no plateau measured)"))
    neu = [r for r in rows if r["stage"] == "neurons"]
    if neu:
        out.append("- neurons active (> 0) per token, held-out task text: " + ", ".join(
            f"{h.split('.')[1]}: {v:.1f}" for h, v in neu[0]["sites"].items()))
    return out


def report(args) -> None:
    from matplotlib.figure import Figure

    from saelab.evals.render import md_table, save_png

    rows = list(done(args.results).values())
    circ = [r for r in rows if r["stage"] == "circuit"]
    trained = {(r["allocator"], r["seed"]): r for r in rows if r["stage"] == "study"}

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
             "dictionary). FVU and L0: held-out task text, mean of the four sites.", ""]
    bases = [b for b in BASES if any(r["basis"] == b for r in circ)]

    def seeds(b: str) -> list[int]:
        return sorted({r["seed"] for r in circ if r["basis"] == b})

    def fit(b: str, key: str) -> str:
        fits = [trained[(b, s)][key] for s in seeds(b) if (b, s) in trained]
        return mean_std(fits) if fits else {"fvu": "0", "l0": "n/a", "dead_frac": "n/a"}[key]

    lines += ["CPR (higher is better) / CMD (lower is better):", ""]
    lines += md_table(["basis", "seeds", "FVU", "L0", "dead"] + list(TASKS), [
        [b, str(len(seeds(b))), fit(b, "fvu"), fit(b, "l0"), fit(b, "dead_frac")]
        + [f"{mean_std(values(b, t, 'cpr'))} / {mean_std(values(b, t, 'cmd'))}" for t in TASKS]
        for b in bases])
    lines += ["", "Smallest evaluated circuit with f >= 0.8 (error nodes it keeps) / f of the top "
              "20 nodes / f of the top 50 nodes:", ""]
    lines += md_table(["basis"] + list(TASKS), [
        [b] + [f"{to08(b, t)} ({mean_std([e for e in values(b, t, errors08) if e is not None])}) / "
               f"{mean_std(values(b, t, at(20)))} / {mean_std(values(b, t, at(50)))}" for t in TASKS]
        for b in bases])
    lines += ["", *training_notes(rows)]
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
