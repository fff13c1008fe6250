"""Transcoders against SAEs at the same site: an MLP-out SAE (blocks.L.hook_mlp_out) against a
transcoder from the MLP's input (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out), with
and without --skip, topk at equal L0, each at its own tuned lr, three seeds, on the default zoo
model's MLPs.

    python benchmarks/transcoders.py sweep     # lr per kind at k = 32, one seed, the sweep layer
    python benchmarks/transcoders.py plateau   # how much doubling the budget still gains
    python benchmarks/transcoders.py study     # every layer at k = 32, the sweep layer at every k
    python benchmarks/transcoders.py matched   # a second k per kind at the matched layers: L0 curves
    python benchmarks/transcoders.py deaths    # which dead latents AuxK cannot reach; longer warmups
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
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from allocators import _groups, _matched, _mean_std, pick_lr, read_results  # the allocator study's helpers

from saelab.data.cache import MANIFEST, build_cache
from saelab.data.heldout import heldout_activations
from saelab.data.tokens import TokenData
from saelab.evals import evaluate
from saelab.evals.latents import LatentStats
from saelab.evals.render import md_table, save_png
from saelab.models import load_model
from saelab.sae import SAE
from saelab.storage.files import write_text
from saelab.training import TrainConfig, train
from saelab.training.config import OptimConfig
from saelab.zoo import DEFAULT_MODEL

KINDS = ("sae", "transcoder", "skip transcoder")
SCORES = ("fvu", "l0", "kl_sae", "ce_loss_recovered", "dead_frac", "dense_frac_10pct")


@dataclass(frozen=True)
class Scale:
    """Sizes of one study: the full one, or --quick."""

    layers: tuple[int, ...]
    sweep_layer: int  # the lr sweep, the plateau check and the k axis run here
    plateau_layers: tuple[int, ...]  # the plateau check, the sweep layer first
    plateau_seeds: tuple[int, ...]  # more seeds at the sweep layer's largest budget: the step's noise
    cache_tokens: int
    n_latents: int
    lrs: tuple[float, ...]  # the starting grid, log-spaced by factors of 2
    tokens: int  # every run's budget (the sweep's too)
    batch_size: int
    plateau_max: int
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    matched_layers: tuple[int, ...]  # where each kind gets an L0 curve for the matched-L0 table
    sae_ks: tuple[int, ...]  # the SAE's ks beside 32 there (its L0 is k)
    transcoder_ks: tuple[int, ...]  # the transcoders' (their L0 sits below k)
    eval_tokens: int
    lr_extend: int = 2
    max_dead: float = 0.05
    gain: float = 0.03  # the plateau check stops doubling below this relative FVU gain
    death_warmups: tuple[int, ...] = (200,)  # lr warmup steps the deaths stage tries beside the default


FULL = Scale(layers=(0, 1, 2, 3), sweep_layer=1, plateau_layers=(1, 3), plateau_seeds=(1,),
             cache_tokens=2_000_000, n_latents=512,
             lrs=(4e-3, 8e-3, 1.6e-2, 3.2e-2), tokens=500_000, batch_size=1024, plateau_max=2_000_000,
             ks=(16, 32, 64), seeds=(0, 1, 2), eval_tokens=2**14, matched_layers=(1, 3), sae_ks=(16, 24),
             transcoder_ks=(16,))
QUICK = Scale(layers=(1,), sweep_layer=1, plateau_layers=(1,), plateau_seeds=(), cache_tokens=65_536,
              n_latents=128, lrs=(4e-3, 1.6e-2), tokens=32_768, batch_size=256, plateau_max=65_536,
              ks=(8, 32), seeds=(0,), eval_tokens=2048,
              matched_layers=(1,), sae_ks=(16,), transcoder_ks=(16,), lr_extend=1)


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

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id.replace(",", "_").replace("=", "-").replace(" ", "-")

    def run(self, stage: str, run: dict) -> dict:
        """Train one dictionary (`run`: kind, layer, k, lr, tokens, seed) and score it."""
        run_id = self.run_id(run)
        out = self.run_dir(run_id)
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
    """At k = 32 and each kind's tuned lr, per plateau layer: the budget doubles from the
    study's until no kind's held-out FVU gains `gain` (relative) or `plateau_max` is passed.
    Every kind runs at every budget, so the ranking can be read at each; `plateau_seeds` repeat
    the sweep layer's largest budget, and at that budget the SAE's other ks run on every
    plateau layer (`largest_matched`)."""
    s = study.scale
    largest = s.tokens
    for layer in s.plateau_layers:
        fvu: dict[str, dict[int, float]] = {kind: {} for kind in KINDS}
        tokens, gaining = s.tokens, True
        while gaining and tokens <= s.plateau_max:
            rows = study.run_all("plateau", plateau_runs(study, layer, tokens))
            for kind, r in zip(KINDS, rows, strict=True):
                fvu[kind][tokens] = r["fvu"]
            gaining = any(tokens // 2 not in by_t or 1 - by_t[tokens] / by_t[tokens // 2] >= s.gain
                          for by_t in fvu.values())
            tokens *= 2
        largest = tokens // 2 if layer == s.sweep_layer else largest
        for kind, by_t in fvu.items():
            steps = ", ".join(f"{t:,} tokens FVU {v:.4f}" for t, v in sorted(by_t.items()))
            print(f"plateau layer {layer} {kind:>16}: {steps}")
    study.run_all("plateau", [run for seed in s.plateau_seeds
                              for run in plateau_runs(study, s.sweep_layer, largest, seed)])
    study.run_all("plateau", largest_matched(study, largest))


def largest_matched(study: Study, tokens: int) -> list[dict]:
    """The runs that compare the kinds at equal L0 at budget `tokens`, first seed, every plateau
    layer: each kind at k = 32 (the plateau's runs), the SAE at its other ks too."""
    s, lrs = study.scale, tuned_lrs(study)
    return [dict(kind=kind, layer=layer, k=k, lr=lrs[kind], tokens=tokens, seed=s.seeds[0])
            for layer in s.plateau_layers for kind in KINDS
            for k in ((*s.sae_ks, 32) if kind == "sae" else (32,))]


def plateau_runs(study: Study, layer: int, tokens: int, seed: int | None = None) -> list[dict]:
    """One run per kind (in KINDS' order) at `layer` and `tokens`: k = 32, its tuned lr, `seed`
    (default: the first)."""
    s, lrs = study.scale, tuned_lrs(study)
    return [dict(kind=kind, layer=layer, k=32, lr=lrs[kind], tokens=tokens,
                 seed=s.seeds[0] if seed is None else seed) for kind in KINDS]


def plateau_rows(study: Study) -> dict[tuple[int, str], list[dict]]:
    """(layer, kind) -> its plateau runs done so far, by seed and budget (the study's, doubled)."""
    s, done = study.scale, study.done()
    out: dict[tuple[int, str], list[dict]] = {(layer, kind): [] for layer in s.plateau_layers
                                              for kind in KINDS}
    for layer in s.plateau_layers:
        for seed in (s.seeds[0], *s.plateau_seeds):
            tokens = s.tokens
            while tokens <= s.plateau_max:
                for run in plateau_runs(study, layer, tokens, seed):
                    if (row := done.get(study.run_id(run))) is not None:
                        out[(layer, run["kind"])].append(row)
                tokens *= 2
    return out


def study_grid(study: Study) -> list[dict]:
    """k = 32 at every layer (the target's cells) first, then the other ks at the sweep layer;
    seed outermost within each (a study stopped early has every cell at its first seeds)."""
    s, lrs = study.scale, tuned_lrs(study)
    first = [(layer, 32) for layer in s.layers]
    then = [(s.sweep_layer, k) for k in s.ks if k != 32]
    return [dict(kind=kind, layer=layer, k=k, lr=lrs[kind], tokens=s.tokens, seed=seed)
            for cells in (first, then) for seed in s.seeds for layer, k in cells for kind in KINDS]


def matched_grid(study: Study) -> list[dict]:
    """An L0 curve per kind at each matched layer: k = 32 and the kind's other ks, every seed
    (seed outermost, as in `study_grid`). Matching at the transcoders' L0 (below 32) needs the
    SAE below 32; the transcoders' k = 16 reaches below the SAE's lowest L0 for the other side."""
    s, lrs = study.scale, tuned_lrs(study)
    ks = {kind: (*(s.sae_ks if kind == "sae" else s.transcoder_ks), 32) for kind in KINDS}
    return [dict(kind=kind, layer=layer, k=k, lr=lrs[kind], tokens=s.tokens, seed=seed)
            for seed in s.seeds for layer in s.matched_layers for kind in KINDS for k in ks[kind]]


MATCHED = (("fvu", "FVU"), ("kl_sae", "KL"), ("ce_loss_recovered", "CE recovered"))


def matched_rows(cells: dict[tuple, list[dict]]) -> list[list[str]]:
    """Each transcoder cell (layer, k, kind) beside the SAE at the same L0: the SAE's curve
    log-log interpolated to the cell's L0, or, below the SAE's lowest L0, both at that L0 with
    the transcoder interpolated along its own curve (`allocators._matched`; never extrapolated).
    Per metric: the transcoder, the SAE, and the gap (transcoder - SAE) / combined std."""
    out = []
    for (layer, k, kind), group in sorted(cells.items()):
        if kind == "sae":
            continue
        own = _mean_std(group, "l0")[0]
        ats = [_matched((own, *_mean_std(group, key)), _curve(cells, layer, kind, key),
                        _curve(cells, layer, "sae", key)) for key, _ in MATCHED]
        found = [at for at in ats if at is not None]
        if len(found) < len(ats):
            continue
        row = [str(layer), kind, str(k), f"{own:.1f}", f"{found[0][0]:.1f}"]
        for _, mine, mine_sd, theirs, theirs_sd in found:
            sd = math.hypot(mine_sd, theirs_sd)
            row += [f"{mine:.4f} +- {mine_sd:.4f}", f"{theirs:.4f} +- {theirs_sd:.4f}",
                    f"{(mine - theirs) / sd:+.1f}" if sd > 0 else "one seed"]
        out.append(row)
    return out


def _curve(cells: dict[tuple, list[dict]], layer: int, kind: str,
           key: str) -> list[tuple[float, float, float]]:
    """(L0, mean, std) of `key` per k of `kind` at `layer`, sorted by L0."""
    return sorted((_mean_std(g, "l0")[0], *_mean_std(g, key)) for (ly, _, kd), g in cells.items()
                  if ly == layer and kd == kind)


def dead_split(sae: SAE, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(share of latents never active on the rows x, (n,) mask of those whose pre-activation is
    positive on none of them). The main loss and AuxK both pass relu(pre), so a latent negative
    on every token gets no gradient from either: those are the dead AuxK cannot reach; the rest
    of the dead are positive somewhere but never inside a token's top k."""
    stats = LatentStats(sae.cfg.n_latents)
    code = sae.encode(x)
    stats.update(code.idx, code.vals)
    return (stats.fires == 0).double().mean().item(), sae.pre_acts(x).amax(0) <= 0


def deaths(study: Study, md: Path) -> None:
    """Why latents die: every seed-0 k = 32 run whose directory is at hand (the lr sweep, the
    plateau budgets, each layer, and each kind at the sweep layer with longer lr warmups, trained
    here) with its held-out dead share split by `dead_split`, and the training log's dead share
    at a tenth of the run (dead window: 1/20 of the run)."""
    s, lrs = study.scale, tuned_lrs(study)
    study.run_all("deaths", [dict(kind=kind, layer=s.sweep_layer, k=32, lr=lrs[kind], tokens=s.tokens,
                                  seed=s.seeds[0], warmup_steps=w)
                             for kind in KINDS for w in s.death_warmups])
    default_warmup = OptimConfig().warmup_steps
    rows = sorted((r for r in study.done().values() if r["k"] == 32 and r["seed"] == s.seeds[0]
                   and (study.run_dir(r["id"]) / "sae.safetensors").exists()),
                  key=lambda r: (r["layer"], KINDS.index(r["kind"]), r["tokens"], r["lr"],
                                 r.get("warmup_steps", default_warmup)))
    acts: dict[str, torch.Tensor] = {}
    body = []
    for r in rows:
        sae = SAE.load(study.run_dir(r["id"]))
        hook = str(sae.cfg.hook)  # set by every training run
        if hook not in acts:
            acts[hook] = heldout_activations(study.model, study.heldout, hook, s.eval_tokens)
        dead, never = dead_split(sae, acts[hook])
        log = json.loads((study.run_dir(r["id"]) / "metrics.json").read_text())["log"]
        early = next(e["dead_frac"] for e in log if e["tokens"] >= r["tokens"] / 10)
        norms = sae.W_enc.detach().norm(dim=1)
        body.append([str(r["layer"]), r["kind"], f"{r['lr']:g}", str(r.get("warmup_steps", default_warmup)),
                     f"{r['tokens']:,}", f"{r['fvu']:.4f}", f"{100 * early:.1f}", f"{100 * dead:.1f}",
                     f"{100 * never.double().mean():.1f}",
                     f"{norms[never].median():.2f}" if never.any() else "", f"{norms.median():.2f}"])
    lines = [f"Dead latents of the seed-{s.seeds[0]} k = 32 runs ({s.eval_tokens:,} held-out tokens): "
             "training's dead share at a tenth of the run, held-out dead, the held-out dead whose "
             "pre-activation is positive on no token (no gradient from the loss or AuxK reaches them), "
             "and the median encoder row norm of those and of all latents.", "",
             *md_table(["layer", "kind", "lr", "warmup steps", "tokens", "FVU", "train dead at 1/10 %",
                        "dead %", "never positive %", "|W_enc| never positive", "|W_enc| all"], body)]
    write_text(md, "\n".join(lines) + "\n")
    print("\n".join(lines))


def report(study: Study, md: Path, png: Path) -> None:
    """The table (mean +- std over seeds per kind, layer, k; the sweep and plateau runs below
    it) and one PNG: FVU, KL and CE recovered against L0 at the sweep layer, and CE recovered
    at k = 32 per layer."""
    s = study.scale
    rows = list(study.done().values())
    tuned = len(tuned_lrs(study)) == len(KINDS)
    grid = {study.run_id(r) for r in study_grid(study) + matched_grid(study)} if tuned else set()
    cells = _groups([r for r in rows if r["id"] in grid], ("layer", "k", "kind"))
    matched = {study.run_id(r) for r in matched_grid(study)} if tuned else set()
    lines = [f"{DEFAULT_MODEL}, n_latents {s.n_latents}, topk, {s.tokens:,} training tokens at batch "
             f"{s.batch_size}, "
             f"{s.eval_tokens:,} held-out tokens; mean +- std over seeds.", ""]
    lines += md_table(["layer", "k", "kind", "seeds", "FVU (mlp_out)", "L0", "KL", "CE recovered", "dead %"],
                      [[str(layer), str(k), kind, str(len(g)), *_cells(g)]
                       for (layer, k, kind), g in sorted(cells.items(), key=lambda c: (c[0][0], c[0][1],
                                                                                      KINDS.index(c[0][2])))])
    lines += ["", "At matched L0 (each kind's cells at the matched layers, every seed): the transcoder at "
              "its L0 beside the SAE log-log interpolated there between its neighbouring k, or, below the "
              "SAE's lowest L0, both at that L0 with the transcoder interpolated along its own curve "
              "(never extrapolated); gap = (transcoder - SAE) / combined std.", ""]
    lines += md_table(["layer", "kind", "k", "own L0", "matched L0",
                       *(col for _, name in MATCHED for col in (name, f"{name} SAE", f"{name} gap (sd)"))],
                      matched_rows(_groups([r for r in rows if r["id"] in matched], ("layer", "k", "kind"))))
    plateaus = plateau_rows(study) if tuned else {}
    largest = max((r["tokens"] for r in plateaus.get((s.sweep_layer, "sae"), [])
                   if r["seed"] == s.seeds[0]), default=s.tokens)  # where `plateau` ran largest_matched
    at_largest = {study.run_id(r) for r in largest_matched(study, largest)} if tuned else set()
    lines += ["", f"At matched L0 after {largest:,} tokens (seed {s.seeds[0]} only, so no gaps in sd; the "
              "same interpolation):", ""]
    lines += md_table(["layer", "kind", "k", "own L0", "matched L0",
                       *(col for _, name in MATCHED for col in (name, f"{name} SAE", f"{name} gap (sd)"))],
                      matched_rows(_groups([r for r in rows if r["id"] in at_largest],
                                           ("layer", "k", "kind"))))
    lines += ["", "Plateau (k 32, each kind's lr): the budget doubled; change = relative to half the "
              "budget, same seed.", ""]
    lines += md_table(["layer", "kind", "seed", "tokens", "FVU", "change", "L0", "KL", "change",
                       "CE recovered", "dead %"], [row for (layer, kind), runs in plateaus.items()
                                   for row in _plateau_cells(layer, kind, runs)])
    sweep_rows = sorted((r for r in rows if r["stage"] == "sweep"),
                        key=lambda r: (KINDS.index(r["kind"]), r["lr"]))
    lines += ["", "lr sweep (k 32, seed 0):", ""]
    lines += md_table(["kind", "layer", "lr", "tokens", "FVU", "CE recovered", "dead %"],
                      [[r["kind"], str(r["layer"]), f"{r['lr']:g}", f"{r['tokens']:,}", f"{r['fvu']:.4f}",
                        f"{r['ce_loss_recovered']:.4f}", f"{100 * r['dead_frac']:.1f}"] for r in sweep_rows])
    write_text(md, "\n".join(lines) + "\n")
    if cells:
        save_png(_figure(cells, s), png)
    if any(len(runs) > 1 for runs in plateaus.values()):
        save_png(_plateau_figure(plateaus, s), png.with_name(png.stem + "_plateau.png"))
    print(f"written: {md}" + (f" and {png}" if cells else ""))


def _plateau_cells(layer: int, kind: str, runs: list[dict]) -> list[list[str]]:
    def change(i: int, key: str) -> str:
        half = runs[i - 1] if i > 0 else None
        if half is None or half["seed"] != runs[i]["seed"] or 2 * half["tokens"] != runs[i]["tokens"]:
            return ""
        return f"{runs[i][key] / half[key] - 1:+.0%}"

    return [[str(layer), kind, str(r["seed"]), f"{r['tokens']:,}", f"{r['fvu']:.4f}", change(i, "fvu"),
             f"{r['l0']:.1f}",
             f"{r['kl_sae']:.4f}", change(i, "kl_sae"), f"{r['ce_loss_recovered']:.4f}",
             f"{100 * r['dead_frac']:.1f}"] for i, r in enumerate(runs)]


def _plateau_figure(plateaus: dict[tuple[int, str], list[dict]], s: Scale):
    """One row per plateau layer: FVU, KL, CE recovered and dead share against the budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2 * len(s.plateau_layers)))
    axes = fig.subplots(len(s.plateau_layers), 4, squeeze=False)
    for row, layer in zip(axes, s.plateau_layers, strict=True):
        for kind in KINDS:
            first = [r for r in plateaus[(layer, kind)] if r["seed"] == s.seeds[0]]
            more = [r for r in plateaus[(layer, kind)] if r["seed"] != s.seeds[0]]
            for ax, key, scale in zip(row, ("fvu", "kl_sae", "ce_loss_recovered", "dead_frac"),
                                      (1, 1, 1, 100), strict=True):
                line, = ax.plot([r["tokens"] for r in first], [scale * r[key] for r in first], marker="o",
                                label=kind)
                ax.plot([r["tokens"] for r in more], [scale * r[key] for r in more], "x",
                        color=line.get_color())
        for ax, label in zip(row, ("held-out FVU of mlp_out", "KL(clean || spliced), nats",
                                   "CE loss recovered", "dead latents (held-out), %"), strict=True):
            ax.set(xscale="log", xlabel=f"training tokens, layer {layer}", ylabel=label)
            ax.legend()
        row[0].set_yscale("log")
        row[1].set_yscale("log")
    fig.suptitle(f"{DEFAULT_MODEL}: k 32, each kind's lr, the budget doubled (line: seed {s.seeds[0]}; "
                 "x: other seeds)")
    fig.tight_layout()
    return fig


def _cells(group: list[dict]) -> list[str]:
    out = []
    for key, places, scale in (("fvu", 4, 1), ("l0", 1, 1), ("kl_sae", 4, 1), ("ce_loss_recovered", 4, 1),
                               ("dead_frac", 1, 100)):
        m, sd = _mean_std(group, key)
        out.append(f"{scale * m:.{places}f} +- {scale * sd:.{places}f}")
    return out


def _figure(cells: dict[tuple, list[dict]], s: Scale):
    """One row per matched layer: FVU, KL and CE recovered against L0 (cells with every seed);
    beside the first, CE recovered at k = 32 per layer."""
    from matplotlib.figure import Figure

    layers = s.matched_layers
    fig = Figure(figsize=(16, 4.2 * len(layers)))
    axes = fig.subplots(len(layers), 4, squeeze=False)
    for row, layer in zip(axes, layers, strict=True):
        for kind in KINDS:
            by_k = sorted((k, g) for (ly, k, kd), g in cells.items()
                          if ly == layer and kd == kind and len(g) == len(s.seeds))
            for ax, key in zip(row[:3], ("fvu", "kl_sae", "ce_loss_recovered"), strict=True):
                ax.errorbar([_mean_std(g, "l0")[0] for _, g in by_k], [_mean_std(g, key)[0] for _, g in by_k],
                            yerr=[_mean_std(g, key)[1] for _, g in by_k], marker="o", capsize=3, label=kind)
        for ax, label in zip(row[:3], ("held-out FVU of mlp_out", "KL(clean || spliced), nats",
                                       "CE loss recovered"), strict=True):
            ax.set(xscale="log", xlabel=f"L0 (held-out), layer {layer}", ylabel=label)
            ax.legend()
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[3].set_axis_off()
    ax = axes[0][3]
    ax.set_axis_on()
    for kind in KINDS:
        by_layer = sorted((layer, g) for (layer, k, kd), g in cells.items() if k == 32 and kd == kind)
        ce = [_mean_std(g, "ce_loss_recovered") for _, g in by_layer]
        ax.errorbar([layer for layer, _ in by_layer], [m for m, _ in ce], yerr=[sd for _, sd in ce],
                    marker="o", capsize=3, label=kind)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="layer (k = 32)", ylabel="CE loss recovered", xticks=list(s.layers))
    ax.legend()
    fig.suptitle(f"{DEFAULT_MODEL}: MLP-out SAE vs transcoders, n {s.n_latents}, mean +- std over seeds")
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sweep", "plateau", "study", "matched", "deaths", "report"])
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
    elif args.stage == "matched":
        study.run_all("matched", matched_grid(study))
    elif args.stage == "deaths":
        deaths(study, results / f"{name}_deaths.md")
        return
    report(study, results / f"{name}.md", results / f"{name}.png")


if __name__ == "__main__":
    main()
