"""Sparsity reports: sparsity.json, sparsity.md, PNGs and a terminal table, from the report dict.

The dict is `measure`'s, optionally extended by `run` with "modes" (the sparsification sweep),
"predictor" and "checkpoints" sections; each section that is present gets its table and plot.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

NAME = "sparsity"  # sparsity.json, sparsity.md
DENSITY_PNG, UNION_PNG = "density_per_layer.png", "union_vs_batch.png"
MODES_PNG, STEPS_PNG = "loss_vs_density.png", "density_vs_step.png"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _layer_table(r: dict) -> tuple[list[str], list[list[str]]]:
    sizes = list(r["layers"][0]["union_density"])
    head = ["layer", "d_ff", "active/token", "density", "p10", "p50", "p90", "p99", "dead",
            "always on", *[f"union {s}" for s in sizes]]
    rows = []
    for layer in r["layers"]:
        p = layer["density_percentiles"]
        rows.append([str(layer["layer"]), str(layer["d_ff"]), f"{layer['active_mean']:.1f}",
                     _pct(layer["density"]), _pct(p["p10"]), _pct(p["p50"]), _pct(p["p90"]),
                     _pct(p["p99"]), str(layer["dead_neurons"]), str(layer["always_on_neurons"]),
                     *[_pct(layer["union_density"][s]) for s in sizes]])
    return head, rows


def _modes_table(r: dict) -> tuple[list[str], list[list[str]]]:
    head = ["mode", "target", "density reached", "delta CE (nats)", "KL(clean || sparse)"]
    rows = [[m["mode"], "-" if m["target"] is None else _pct(m["target"]), _pct(m["density"]),
             f"{m['delta_ce']:+.4f}", f"{m['kl']:.4f}"] for m in r["modes"]["runs"]]
    return head, rows


def _predictor_table(r: dict) -> tuple[list[str], list[list[str]]]:
    head = ["layer", "rank", "recall", "precision", "|h| mass recall", "computed", "truly active"]
    rows = [[str(p["layer"]), str(p["rank"]), _num(p["recall"]), _num(p["precision"]),
             _num(p["mass_recall"]), _pct(p["predicted_density"]), _pct(p["true_density"])]
            for p in r["predictor"]["layers"]]
    return head, rows


def _steps_table(r: dict) -> tuple[list[str], list[list[str]]]:
    n = len(r["checkpoints"][0]["layer_density"])
    head = ["step", "tokens seen", "model density", *[f"layer {i}" for i in range(n)]]
    rows = [[str(c["step"]), f"{c['tokens_seen']:,}", _pct(c["density"]),
             *[_pct(d) for d in c["layer_density"]]] for c in r["checkpoints"]]
    return head, rows


def _header(r: dict) -> list[str]:
    return [
        f"MLP activation sparsity of {r['model']} ({r['activation']} MLPs; active: {r['active_means']})",
        f"data: {r['data']} ({r['split']}), {r['tokens']:,} tokens in {r['rows']:,} rows of "
        f"{r['context_length']}; union groups drawn within forward batches of {r['batch_rows']} rows",
        f"model-wide density {_pct(r['density'])}: MLP FLOPs {r['flops_fraction_sparse_down']:.3f} of "
        f"dense with a sparse down-projection, {r['flops_fraction_active_set_known']:.3f} if the "
        "active set were known before the up-projection",
    ]


def _sections(r: dict):
    yield ("Per layer (density = active neurons / d_ff per token; union N = neurons active on any "
           "of N tokens)"), _layer_table(r)
    if "modes" in r:
        m = r["modes"]
        yield (f"Sparsification modes spliced into every MLP ({m['tokens']:,} held-out tokens, CE "
               f"clean {m['ce_clean']:.4f}; thresholds calibrated on {m['calibration_tokens']:,} "
               "train tokens)"), _modes_table(r)
    if "predictor" in r:
        p = r["predictor"]
        yield (f"Active-set predictor (low rank, trained on {p['train_tokens']:,} train tokens, "
               f"target recall {p['target_recall']}): only predicted neurons computed -> delta CE "
               f"{p['delta_ce']:+.4f} nats, KL {p['kl']:.4f}; {_pct(p['density'])} of neurons computed, "
               f"MLP FLOPs {p['flops_fraction']:.3f} of dense with the predictor's own"), _predictor_table(r)
    if "checkpoints" in r:
        yield "Density during training (intermediate checkpoints)", _steps_table(r)


def format_summary(r: dict) -> str:
    lines = _header(r)
    for title, (head, rows) in _sections(r):
        lines += ["", title, *text_table([head, *rows], right=True)]
    return "\n".join(lines)


def _density_plot(r: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    layers = [x["layer"] for x in r["layers"]]
    ax.bar(layers, [100 * x["density"] for x in r["layers"]], color="tab:blue", label="mean")
    lo = [100 * x["density_percentiles"]["p10"] for x in r["layers"]]
    hi = [100 * x["density_percentiles"]["p90"] for x in r["layers"]]
    ax.vlines(layers, lo, hi, color="black", label="p10-p90 over tokens")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("active MLP neurons per token (%)")
    ax.set_title(f"{r['model']}: MLP activation density ({r['tokens']:,} tokens)", fontsize=10)
    ax.legend()
    return fig


def _union_plot(r: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for x in r["layers"]:
        pts = [(int(s), 100 * v) for s, v in x["union_density"].items() if v is not None]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"layer {x['layer']}")
    ax.set_xscale("log", base=2)
    sizes = [int(s) for s in r["layers"][0]["union_density"]]
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(0, 100)
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("union of active neurons (% of d_ff)")
    ax.set_title("Active neurons of a batch: the union grows toward dense", fontsize=10)
    ax.legend()
    return fig


def _modes_plot(r: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    runs = r["modes"]["runs"]
    for mode in dict.fromkeys(m["mode"] for m in runs):
        pts = sorted((100 * m["density"], m["delta_ce"]) for m in runs if m["mode"] == mode)
        ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("MLP density reached (% of neurons per token)")
    ax.set_ylabel("held-out CE change (nats/token)")
    ax.set_title("Loss against density, one curve per sparsification mode", fontsize=10)
    ax.legend()
    return fig


def _steps_plot(r: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    cks = r["checkpoints"]
    steps = [c["step"] for c in cks]
    for i in range(len(cks[0]["layer_density"])):
        ax.plot(steps, [100 * c["layer_density"][i] for c in cks], marker="o", label=f"layer {i}")
    ax.plot(steps, [100 * c["density"] for c in cks], color="black", linestyle="--", label="model")
    ax.set_xlabel("training step")
    ax.set_ylabel("active MLP neurons per token (%)")
    ax.set_title("Does activation sparsity emerge during training?", fontsize=10)
    ax.legend()
    return fig


def _plots(r: dict) -> list[Plot]:
    """The density and union plots, then one per optional section the report holds."""
    plots = [Plot(DENSITY_PNG, "density per layer", _density_plot),
             Plot(UNION_PNG, "union vs batch", _union_plot)]
    if "modes" in r:
        plots.append(Plot(MODES_PNG, "loss vs density", _modes_plot))
    if "checkpoints" in r:
        plots.append(Plot(STEPS_PNG, "density vs step", _steps_plot))
    return plots


def _markdown(r: dict) -> str:
    lines = [f"# Activation sparsity: {r['model']}", "", *(f"{x}." for x in _header(r)), ""]
    for title, (head, rows) in _sections(r):
        lines += [f"## {title}", "", *md_table(head, rows), ""]
    lines += [*md_images(_plots(r)), f"saelab {r['saelab_version']}, {r['seconds']} s.", ""]
    return "\n".join(lines)


def write_report(r: dict, out_dir: str | Path) -> list[Path]:
    """Write sparsity.json, sparsity.md and the PNGs into `out_dir` (each atomically)."""
    return write_report_files(out_dir, NAME, r, _markdown(r), _plots(r), r)
