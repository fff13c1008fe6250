"""Circuit reports: circuits.json, circuits.md, a head-grid PNG and a ROC PNG, and a summary.

The JSON holds `CircuitResult.summary()` (keys `node_roc_auc`, `edge_roc_auc`, ...) plus the
per-trial counts, so the plots can be redrawn from it alone. Its ground-truth part gives each
head's patched effect with its standard error over prompts and, where measured, the circuit's
Jaccard across disjoint prompt sets; a task whose circuit is not stable has `in_headline` false,
and `headline` leaves it out of cross-task means.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

from . import scoring
from .discover import CircuitResult

NAME = "circuits"  # circuits.json, circuits.md
GRID_PNG, ROC_PNG = "circuit_heads.png", "circuit_roc.png"


def _pm(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def _rows(s: dict) -> list[tuple[str, str]]:
    gt = s["ground_truth"]
    node, edge = s["node_precision_recall_f1"], s["edge_precision_recall_f1"]
    rows = [
        ("node ROC AUC", f"{_pm(s['node_roc_auc'])} over {s['trials']} trials, held-out prompts"),
        ("edge ROC AUC", _pm(s["edge_roc_auc"])),
        ("node precision / recall / F1",
         " / ".join(_pm(node[k], 2) for k in ("precision", "recall", "f1"))),
        ("edge precision / recall / F1",
         " / ".join(_pm(edge[k], 2) for k in ("precision", "recall", "f1")) if edge else "n/a"),
        ("threshold", s["threshold"]),
        ("recovered heads (trial 0)", " ".join(s["recovered_heads_trial0"]) or "none"),
        ("ground-truth heads", " ".join(gt["heads"]) + f" ({gt['ablation']} patching, "
         f"{gt['prompts']} prompts, |effect| > {gt['share']:.3g} of the total)"),
        ("ground-truth effects (+- SE over prompts)", ", ".join(
            f"{h} {gt['node_effect'][h]:.3f} +- {gt['node_effect_se'][h]:.3f}" for h in gt["heads"])
         or "none"),
        ("task metric", f"{gt['metric']}: clean {gt['clean_metric']:.3f}, counterfactual "
         f"{gt['counterfactual_metric']:.3f}"),
        ("ground-truth stability", _stability(gt["stability"])),
        ("ground-truth edges", f"{len(gt['edges'])}"),
        ("SAE method cost", f"{_pm(s['method_seconds_per_trial'], 2)} s, "
         f"{s['method_forward_passes_per_trial']} forward passes per trial"
         + (f" and {s['method_backward_passes_per_trial']} backward"
            if s.get("method_backward_passes_per_trial") else "")
         + (f" (+ {s['method_local_backward_passes_per_trial']} through one attention layer "
            "for the routed edge score)" if s.get("method_local_backward_passes_per_trial") else "")),
        ("patching cost, heads", f"{s['patching_node_seconds']:.2f} s, "
         f"{s['patching_node_forward_passes']} forward passes"),
        ("patching cost, heads + edges", f"{s['patching_edge_seconds']:.2f} s, "
         f"{s['patching_edge_forward_passes']} forward passes"),
    ]
    if "published" in s:
        p = s["published"]
        rows.append(("published heads", f"{' '.join(p['heads'])} ({p['source']}); node ROC AUC "
                                        f"against them {_pm(p['node_roc_auc'])}"))
    return rows


def _stability(st: dict | None) -> str:
    if st is None:
        return "not measured (one prompt set)"
    verdict = "stable" if st["stable"] else "NOT STABLE: left out of cross-task means"
    return (f"{verdict}; Jaccard {' / '.join(f'{j:.2f}' for j in st['jaccard'])} between "
            f"{st['sets']} disjoint sets of {st['prompts_per_set']} prompts (min "
            f"{st['min_jaccard']:.2f}, stable at >= {st['threshold']}); "
            f"{st['forward_passes']} more forward passes, {st['seconds']:.1f} s")


def headline(summaries: list[dict], key: str = "node_roc_auc") -> dict:
    """Mean over tasks of each task's mean `key`, counting only tasks whose ground truth is
    stable (`in_headline`); the others are listed, not averaged in."""
    kept = [s for s in summaries if s["in_headline"] and s[key]["mean"] is not None]
    means = [s[key]["mean"] for s in kept]
    return {"key": key, "mean": sum(means) / len(means) if means else None,
            "tasks": [s["task"] for s in kept],
            "excluded": [s["task"] for s in summaries if not s["in_headline"]]}


def format_summary(result: CircuitResult | dict) -> str:
    s = result.summary() if isinstance(result, CircuitResult) else result
    c = s["config"]
    where = {"last": "at the last position", "mean": "averaged over positions",
             "all": "at every position"}[c["position"]]
    lines = [f"Circuit discovery: {s['task']} on {s['model']} ({c['sae']} SAE, {c['n_latents']} "
             f"latents, {c.get('score', 'unique')} score, head outputs {where}, {c['train_prompts']} "
             f"training prompts, {c['prompts']} held-out prompts)"]
    return "\n".join(lines + text_table(_rows(s)))


def _grid_plot(r: CircuitResult) -> Figure:
    L, H = r.n_layers, r.n_heads
    panels = [("SAE node score (mean over trials)", r.node_scores.mean(0), None),
              ("patching effect (ground truth)", r.truth.node_effect, r.truth.nodes)]
    if r.published_entry is not None:
        from .published import head_mask

        mask = head_mask(r.published_entry, L, H)
        panels.append(("published heads", mask.float(), mask))
    fig = Figure(figsize=(4 * len(panels), 0.5 * L + 2), layout="constrained")
    for i, (title, values, marks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        im = ax.imshow(values.reshape(L, H).numpy(), cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        if marks is not None:
            for idx in marks.nonzero().flatten().tolist():
                ax.text(idx % H, idx // H, "*", ha="center", va="center",
                        color="red", fontsize=12)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{r.task} on {r.model}: * marks ground-truth circuit heads", fontsize=10)
    return fig


def _roc_plot(r: CircuitResult) -> Figure:
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    emask = r.truth.edge_mask
    for i, (kind, scores, truth, aucs) in enumerate([
        ("node", list(r.node_counts), r.truth.nodes, r.node_auc),
        ("edge", [e[emask] for e in r.edge_counts], r.truth.edges[emask], r.edge_auc),
    ]):
        ax = fig.add_subplot(1, 2, i + 1)
        if not aucs:
            ax.set_title(f"{kind}: no ground truth")
            continue
        for s in scores:
            fpr, tpr = scoring.roc_curve(s, truth)
            ax.plot(fpr, tpr, color="tab:blue", alpha=0.4, linewidth=1)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        mean = torch.tensor(aucs).nanmean().item()
        ax.set_title(f"{kind} ROC, {len(aucs)} trials (mean AUC {mean:.3f})", fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    return fig


PLOTS = (Plot(GRID_PNG, "per-head scores", _grid_plot), Plot(ROC_PNG, "ROC curves", _roc_plot))


def _markdown(s: dict) -> str:
    lines = [f"# Circuit discovery: {s['task']} on {s['model']}", "", *md_table(("", ""), _rows(s))]
    lines += ["", "Forward passes are counted per prompt (a batched pass over P prompts is P). "
              "ROC AUC is computed on held-out prompts the SAE did not train on; edges are "
              "scored as edges against path-patched edges.", "", *md_images(PLOTS)]
    return "\n".join(lines)


def write_report(result: CircuitResult, out_dir: str | Path) -> list[Path]:
    """Write circuits.json, circuits.md and the two PNGs into `out_dir`; returns their paths."""
    s = result.summary()
    data = {**s, "node_counts": result.node_counts.tolist(),
            "edge_counts": [e.nan_to_num(-1).tolist() for e in result.edge_counts]}
    return write_report_files(out_dir, NAME, data, _markdown(s), PLOTS, result)
