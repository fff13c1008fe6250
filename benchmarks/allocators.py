"""The allocators measured fairly: each at its own tuned learning rate, trained to a plateau,
k in {8, 16, 32, 64}, three seeds, two layers of the default zoo model.

    python benchmarks/allocators.py sweep      # lr per allocator, at two dictionary sizes
    python benchmarks/allocators.py plateau    # tokens per allocator until doubling stops paying
    python benchmarks/allocators.py study      # k x seeds x layers at those settings
    python benchmarks/allocators.py aux        # aux_zipf against AuxK, every allocator
    python benchmarks/allocators.py report     # table (markdown) and FVU/KL-vs-L0 PNGs
    add --quick to any of them for a minutes-long smoke run (small sizes, one seed)

Every SAE trains from one activation cache (both layers, with loss gradients for gradient_topk)
and is scored on held-out tokens it never saw. Stages append one JSON line per run to
OUT/results.jsonl and skip runs already there, so a stopped study resumes where it stopped.
The sweep and plateau stages score by held-out FVU alone (cheap); the study and aux stages run
`saelab.evals.evaluate`: FVU, L0, KL and delta CE with the selection each SAE uses at inference
(gradient_topk: plain topk; batch-level allocators: their thresholds), dead latents (never active
in the eval window) and dense latents (active on > 10% of tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from saelab.cache import MANIFEST, build_cache
from saelab.data import TokenData
from saelab.evals import evaluate, reconstruction_stats
from saelab.heldout import heldout_activations
from saelab.io import write_json, write_text
from saelab.models import load_model
from saelab.sae import SAE
from saelab.training import TrainConfig, train
from saelab.zoo import DEFAULT_MODEL

ALLOCATORS = ["topk", "gradient_topk", "feature_choice", "mutual_choice"]


@dataclass(frozen=True)
class Scale:
    """Sizes of one study: the full one, or --quick."""

    hooks: tuple[str, ...]
    cache_tokens: int
    n_latents: tuple[int, ...]  # sweep sizes; the first is the study's
    lrs: tuple[float, ...]
    sweep_tokens: int
    plateau_start: int  # tokens of the first plateau run; doubled until the gain is < `gain`
    plateau_max: int
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    eval_tokens: int
    gain: float = 0.03


FULL = Scale(hooks=("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"), cache_tokens=2_000_000,
             n_latents=(2048, 8192), lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), sweep_tokens=2_000_000,
             plateau_start=1_000_000, plateau_max=16_000_000, ks=(8, 16, 32, 64), seeds=(0, 1, 2),
             eval_tokens=2**17)
QUICK = Scale(hooks=("blocks.1.hook_resid_post",), cache_tokens=65_536, n_latents=(256, 512),
              lrs=(1e-3, 4e-3), sweep_tokens=65_536, plateau_start=32_768, plateau_max=131_072,
              ks=(8, 32), seeds=(0,), eval_tokens=4096)


class Study:
    """The cache, the held-out activations and the results file one output directory holds."""

    def __init__(self, out: Path, scale: Scale):
        self.out, self.scale = out, scale
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

    def run(self, stage: str, full_eval: bool, **fields) -> dict:
        """Train one SAE (or reuse a finished run with the same fields and scoring, whichever
        stage ran it) and score it on held-out tokens."""
        fields["dead_tokens"] = max(fields["tokens"] // 20, 4096)  # AuxK's window: 1/20 of the run
        run_id = ("eval:" if full_eval else "fvu:") + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
        if run_id in (done := self.done()):
            return done[run_id]
        out = self.out / "runs" / run_id.replace(":", "/").replace(",", "_").replace("=", "-")
        start = time.perf_counter()
        (result,) = train(TrainConfig.of(cache=str(self.cache), out=str(out), overwrite=True,
                                         checkpoint_every=0, **fields)).values()
        seconds = time.perf_counter() - start
        if full_eval:
            r = evaluate(str(out), tokens=self.scale.eval_tokens, model=self.model, data=self.heldout)
            scores = {key: r[key] for key in ("fvu", "l0", "kl_sae", "delta_loss", "dead_frac",
                                              "dense_frac_10pct", "tokens")}
        else:
            scores = reconstruction_stats(SAE.load(str(out)), self.heldout_x(fields["hook"]))
        scores["eval_tokens"] = scores.pop("tokens")  # the run's own `tokens` is its training budget
        row = {"id": run_id, "stage": stage, **fields, **scores, "train_seconds": round(seconds, 1),
               "tokens_per_s": round(result.summary["tokens_per_s"])}
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{run_id}: FVU {row['fvu']:.4f}, L0 {row['l0']:.1f} ({seconds:.0f} s)", flush=True)
        return row

    def heldout_x(self, hook: str):
        if hook not in self._x:
            self._x[hook] = heldout_activations(self.model, self.heldout, hook, self.scale.eval_tokens)
        return self._x[hook]


def best_lrs(study: Study) -> dict[tuple[str, int], float]:
    """(allocator, n_latents) -> the swept lr with the lowest held-out FVU."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in study.done().values():
        if r["id"].startswith("fvu:") and r["tokens"] == study.scale.sweep_tokens:
            key = (r["allocator"], r["n_latents"])
            if key not in best or r["fvu"] < best[key][0]:
                best[key] = (r["fvu"], r["lr"])
    return {key: lr for key, (_, lr) in best.items()}


def sweep(study: Study) -> None:
    """lr per allocator and dictionary size, at k = 32 (the default), one seed, the first hook."""
    s = study.scale
    for n in s.n_latents:
        for allocator in ALLOCATORS:
            for lr in s.lrs:
                study.run("sweep", False, allocator=allocator, hook=s.hooks[0], n_latents=n, k=32,
                          lr=lr, tokens=s.sweep_tokens)
    for (allocator, n), lr in sorted(best_lrs(study).items()):
        print(f"best lr {allocator:>15} n={n:>5}: {lr:g}")


def plateau(study: Study) -> dict[str, int]:
    """allocator -> tokens: the budget doubles until held-out FVU improves by less than `gain`
    (relative) from one budget to the next, at k = 32 and the allocator's tuned lr."""
    s, lrs, budgets = study.scale, best_lrs(study), {}
    for allocator in ALLOCATORS:
        lr, tokens, last = lrs[(allocator, s.n_latents[0])], s.plateau_start, None
        while True:
            r = study.run("plateau", False, allocator=allocator, hook=s.hooks[0],
                          n_latents=s.n_latents[0], k=32, lr=lr, tokens=tokens)
            if last is not None and (last - r["fvu"]) / last < s.gain or 2 * tokens > s.plateau_max:
                budgets[allocator] = tokens
                break
            last, tokens = r["fvu"], 2 * tokens
        print(f"plateau {allocator:>15}: {budgets[allocator]:,} tokens at lr {lr:g}")
    return budgets


def study_runs(study: Study, stage: str, aux_kinds: tuple[str, ...], ks, hooks, seeds) -> None:
    """Every (hook, allocator, k, seed, aux) at the allocator's tuned lr and plateau budget,
    fully evaluated."""
    n, lrs, budgets = study.scale.n_latents[0], best_lrs(study), plateau(study)
    for hook in hooks:
        for allocator in ALLOCATORS:
            for k in ks:
                for seed in seeds:
                    for aux in aux_kinds:
                        study.run(stage, True, allocator=allocator, hook=hook, n_latents=n, k=k,
                                  seed=seed, aux=aux, lr=lrs[(allocator, n)],
                                  tokens=budgets[allocator])


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(study: Study) -> None:
    """results.md (mean +- std over seeds) and one FVU-vs-L0 / KL-vs-L0 PNG per hook."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(study.done().values())
    lines = ["| hook | allocator | aux | k | seeds | FVU | L0 | KL | delta CE | dead | dense >10% |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    full = [r for r in rows if r["id"].startswith("eval:")]
    for (hook, allocator, aux, k), group in sorted(
            _groups(full, ("hook", "allocator", "aux", "k")).items()):
        cells = [f"{m:.4f} +- {sd:.4f}" for m, sd in (_mean_std(group, key) for key in
                 ("fvu", "l0", "kl_sae", "delta_loss"))]
        cells += [f"{100 * _mean_std(group, key)[0]:.2f}%" for key in ("dead_frac", "dense_frac_10pct")]
        lines.append(f"| {hook} | {allocator} | {aux} | {k} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "| allocator | n_latents | lr | tokens | held-out FVU |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['allocator']} | {r['n_latents']} | {r['lr']:g} | {r['tokens']:,} | {r['fvu']:.4f} |"
              for r in sorted((r for r in rows if r["id"].startswith("fvu:")),
                              key=lambda r: (r["allocator"], r["n_latents"], r["tokens"], r["lr"]))]
    write_text(study.out / "results.md", "\n".join(lines) + "\n")
    for hook, group in _groups([r for r in full if r["aux"] == "auxk"], ("hook",)).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for allocator, arows in sorted(_groups(group, ("allocator",)).items()):
            by_k = sorted(_groups(arows, ("k",)).items())
            for ax, key in zip(axes, ("fvu", "kl_sae"), strict=True):
                ax.errorbar([_mean_std(g, "l0")[0] for _, g in by_k], [_mean_std(g, key)[0] for _, g in by_k],
                            yerr=[_mean_std(g, key)[1] for _, g in by_k], marker="o", capsize=3,
                            label=allocator[0])
        for ax, label in zip(axes, ("held-out FVU", "KL(clean || spliced), nats"), strict=True):
            ax.set(xscale="log", yscale="log", xlabel="L0 (held-out)", ylabel=label)
            ax.legend()
        fig.suptitle(f"{DEFAULT_MODEL} {hook[0]}: mean +- std over seeds")
        fig.tight_layout()
        fig.savefig(study.out / f"l0_{hook[0]}.png", dpi=110)
        plt.close(fig)
    print(f"written: {study.out / 'results.md'} and the l0_*.png plots")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sweep", "plateau", "study", "aux", "report"])
    p.add_argument("--quick", action="store_true", help="minutes, not hours: small sizes, one seed")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory [default: benchmarks/out/allocators(-quick)]")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    out = args.out or Path("benchmarks/out/allocators" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, scale)
    write_json(out / "scale.json", {"model": DEFAULT_MODEL, **scale.__dict__})
    if args.stage == "sweep":
        sweep(study)
    elif args.stage == "plateau":
        plateau(study)
    elif args.stage == "study":
        study_runs(study, "study", ("auxk",), scale.ks, scale.hooks, scale.seeds)
    elif args.stage == "aux":
        study_runs(study, "aux", ("auxk", "aux_zipf"), (32,), scale.hooks[:1], scale.seeds)
    report(study)


if __name__ == "__main__":
    main()
