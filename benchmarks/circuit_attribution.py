"""Node attribution against exact patching on the task model: agreement and circuit faithfulness.

For each task and basis: exact patching of every node on `--prompts` prompts is the ground
truth; each method scores the same prompts; Pearson r of its scores with the exact effects,
node ROC AUC against the ground-truth circuit (|effect| above an equal share), and CPR / CMD /
nodes to f >= 0.8 of its top-node circuits on as many held-out prompts. Wall time is measured
in `--rounds` interleaved rounds and reported as the median's ratio to exact patching's (both
on this machine, in this run); passes are per prompt.

    python benchmarks/circuit_attribution.py --tasks ioi docstring --bases heads
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from saelab.evals.circuits.attribution import attribute
from saelab.evals.circuits.bases import basis as make_basis
from saelab.evals.circuits.discover import DiscoverConfig
from saelab.evals.circuits.faithfulness import faithfulness
from saelab.evals.circuits.recovery import AttributionConfig, report
from saelab.models import load_model
from saelab.tasks import default_metric, draw_distinct, tokenize


def run(args) -> list[dict]:
    model = load_model(args.model)
    rows = []
    for task in args.tasks:
        metric = default_metric(task)
        train = DiscoverConfig().train_prompts  # codes' SAE rows, after the held-out ones
        drawn = draw_distinct(task, 2 * args.prompts + train, args.seed)
        codes_rows = drawn.subset([*range(args.prompts), *range(2 * args.prompts, len(drawn))])
        scored = tokenize(drawn.subset(range(args.prompts)), model.tokenizer, model.context_length)
        held = tokenize(drawn.subset(range(args.prompts, 2 * args.prompts)), model.tokenizer,
                        model.context_length)
        for spec in args.bases:
            b = make_basis(model, spec)
            methods = ["patching", "eap", "eap-ig"] + (["codes"] if b.name == "heads" else [])
            times: dict[str, list[float]] = {m: [] for m in methods}
            scores = {}
            for r in range(args.rounds):
                for m in methods:
                    if m == "patching" and r >= args.patch_rounds:
                        continue
                    start = time.perf_counter()
                    if m == "codes":
                        a = attribute(model, codes_rows, b, "codes", prompts=args.prompts, seed=args.seed + r,
                                      progress=False, codes_config=DiscoverConfig())
                    else:
                        a = attribute(model, scored, b, m, metric=metric, max_nodes=10**6,
                                      progress=False)
                    times[m].append(time.perf_counter() - start)
                    scores.setdefault(m, a)
            cfg = AttributionConfig(attr_prompts=args.prompts, faith_prompts=args.prompts,
                                    max_patch_nodes=10**6, attr_metric=metric, attr_seed=args.seed)
            base = statistics.median(times["patching"])
            for m in methods:
                faith = faithfulness(model, held, b, scores[m].scores, metric=metric,
                                     completeness=False, progress=False)
                out = report(model, task, b, scores[m], scores["patching"], faith, m, cfg, metric)
                row = {k: out[k] for k in ("task", "basis", "method", "nodes", "pearson",
                                           "node_roc_auc", "cpr", "cmd", "nodes_to_08")}
                row.update(forward_passes=scores[m].forward_passes,
                           backward_passes=scores[m].backward_passes,
                           seconds_median=statistics.median(times[m]),
                           time_ratio_to_patching=statistics.median(times[m]) / base,
                           rounds=len(times[m]), prompts=args.prompts)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:tasks-4l-v2")
    p.add_argument("--tasks", nargs="+", default=["ioi", "docstring", "induction", "greater-than"])
    p.add_argument("--bases", nargs="+", default=["heads"])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--patch-rounds", type=int, default=3,
                   help="rounds that re-time exact patching (1 for large bases)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = run(args)
    if args.out:
        from saelab.storage.files import write_json

        write_json(args.out, {"settings": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()}, "rows": rows})
    print(f"{'task':<13}{'basis':<10}{'method':<9}{'r':>7}{'AUC':>7}{'CPR':>7}{'CMD':>7}"
          f"{'to0.8':>7}{'fwd':>8}{'bwd':>6}{'t/patch':>9}")
    for r in rows:
        def f(v):
            return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"{r['task']:<13}{r['basis'][:9]:<10}{r['method']:<9}{f(r['pearson']):>7}"
              f"{f(r['node_roc_auc']):>7}{f(r['cpr']):>7}{f(r['cmd']):>7}{f(r['nodes_to_08']):>7}"
              f"{r['forward_passes']:>8}{r['backward_passes']:>6}{r['time_ratio_to_patching']:>9.3f}")


if __name__ == "__main__":
    main()
