"""Head-to-head edge scores against path patching on the task model.

For each task: path patching of every head-to-head direct path (`patching.ground_truth`, the
sender's counterfactual change added to the receiver layer's input, the receiver's output
spliced into a clean run) on `--prompts` prompts is the ground truth; EAP and EAP-IG edge
scores (`edges.attribute_edges`, Q + K + V) on the same prompts are compared with it: Pearson r
over all head pairs, and the edge ROC AUC of |score| against the ground truth's edge circuit
(|effect| above an equal share). Wall time: the ratio of each method's median to path
patching's over `--rounds` interleaved rounds (this machine, this run); passes per prompt.

    python benchmarks/circuit_edges.py --tasks ioi docstring
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from saelab.evals.circuits import scoring
from saelab.evals.circuits.edges import attribute_edges
from saelab.evals.circuits.patching import ground_truth
from saelab.evals.circuits.recovery import pearson
from saelab.models import load_model
from saelab.tasks import default_metric, draw_distinct, tokenize


def run(args) -> list[dict]:
    model = load_model(args.model)
    rows = []
    for task in args.tasks:
        metric = default_metric(task)
        tok = tokenize(draw_distinct(task, args.prompts, args.seed), model.tokenizer, model.context_length)
        times: dict[str, list[float]] = {"path patching": [], "eap": [], "eap-ig": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            truth = ground_truth(model, tok, metric=metric, progress=False)
            times["path patching"].append(time.perf_counter() - start)
            got = {}
            for method in ("eap", "eap-ig"):
                start = time.perf_counter()
                got[method] = attribute_edges(model, tok, method, metric=metric)
                times[method].append(time.perf_counter() - start)
        mask = truth.edge_mask
        exact = truth.edge_effect[mask]
        base = statistics.median(times["path patching"])
        for method, e in got.items():
            est = e.head_edges()[mask]
            rows.append({"task": task, "method": method, "edges": int(mask.sum()),
                         "pearson": round(pearson(est, exact) or float("nan"), 4),
                         "edge_roc_auc": round(scoring.roc_auc(est.abs(), truth.edges[mask]), 4),
                         "passes": e.forward_passes // len(tok) + e.backward_passes // len(tok),
                         "path_patching_passes": truth.edge_passes // len(tok),
                         "time_vs_path_patching": round(statistics.median(times[method]) / base, 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:tasks-4l-v2")
    p.add_argument("--tasks", nargs="+", default=["ioi", "docstring"])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/circuit_edges.json")
    args = p.parse_args()
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
