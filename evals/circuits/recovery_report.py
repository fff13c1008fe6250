"""Reports of `recovery.recover`: circuits.json, circuits.md, a faithfulness-curve PNG and a
score-against-exact-effect PNG, and a terminal summary, all drawn from the report dict."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

NAME = "circuits"
CURVE_PNG, AGREE_PNG = "circuit_faithfulness.png", "circuit_agreement.png"


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def rows(r: dict) -> list[tuple[str, str]]:
    f, c = r["faithfulness"], r["cost"]
    out = [
        ("method / basis", f"{r['method']} on {r['basis']} ({r['nodes']} nodes, "
         f"{r['error_nodes']} error nodes)"),
        ("CPR (area under f, higher better)", _num(r["cpr"])),
        ("CMD (area under |1 - f|, lower better)", _num(r["cmd"])),
        ("nodes to f >= 0.8", f"{_num(r['nodes_to_08'])} ({_num(f['fraction_to_08'], 4)} of nodes)"),
        ("node ROC AUC vs exact patching", _num(r["node_roc_auc"])),
        ("Pearson r with exact effects", _num(r["pearson"])),
        ("method cost", f"{c['seconds']} s, {c['forward_passes']} forward + "
         f"{c['backward_passes']} backward passes ({c['prompts']} prompts)"),
        ("faithfulness prompts", f"{f['prompts']} held out, {f['ablation']} patching, "
         f"m(full) {f['m_full']}, m(empty) {f['m_empty']} ({f['metric']})"),
    ]
    if r.get("truth"):
        t = r["truth"]["cost"]
        out.append(("exact patching cost", f"{t['seconds']} s, {t['forward_passes']} forward passes"))
        out.append(("ground-truth circuit", " ".join(r["truth"]["circuit"][:40]) or "none"))
    elif r.get("truth_note"):
        out.append(("ground truth", r["truth_note"]))
    return out


def format_summary(r: dict) -> str:
    return "\n".join([f"Circuit recovery, {r['task']} on {r['model']}", *text_table(rows(r))])


def _curve(r: dict) -> Figure:
    f = r["faithfulness"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    x = [max(v, 0.5 / f["nodes"]) for v in f["fractions"]]  # k = 0 drawn at half a node
    ax.plot(x, f["faithfulness"], marker="o", label="faithfulness f(C)")
    if f["completeness"]:
        ax.plot(x, f["completeness"], marker="x", linestyle="--", label="f(all but C)")
    ax.axhline(0.8, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of nodes kept (top |score|)")
    ax.set_ylabel("f")
    ax.set_title(f"{r['task']}: {r['method']} on {r['basis']}; CPR {r['cpr']:.3f}, "
                 f"CMD {r['cmd']:.3f}", fontsize=10)
    ax.legend()
    return fig


def _agreement(r: dict) -> Figure:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    truth = r["truth"]["all"] if r.get("truth") and "all" in r["truth"] else None
    if truth:
        names = list(r["scores"])
        ax.scatter([truth[n] for n in names], [r["scores"][n] for n in names], s=8)
        lo = min(min(truth.values()), min(r["scores"].values()))
        hi = max(max(truth.values()), max(r["scores"].values()))
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax.set_xlabel("exact patching effect (normalised)")
    ax.set_ylabel(f"{r['method']} score")
    ax.set_title(f"Pearson r = {_num(r['pearson'])}", fontsize=10)
    return fig


def plots(r: dict) -> list[Plot]:
    out = [Plot(CURVE_PNG, "faithfulness and completeness against circuit size", _curve)]
    if r.get("truth") and r["method"] != "patching":
        out.append(Plot(AGREE_PNG, "method score against exact patching effect", _agreement))
    return out


def markdown(r: dict) -> str:
    f = r["faithfulness"]
    size_rows = [(str(k), f"{x:.4g}", f"{v:.3f}", _num(c) if c is not None else "n/a", str(e))
                 for k, x, v, c, e in zip(f["sizes"], f["fractions"], f["faithfulness"],
                                          f["completeness"] or [None] * len(f["sizes"]),
                                          f["error_nodes_kept"], strict=True)]
    lines = [f"# Circuit recovery: {r['task']} on {r['model']}", "",
             *md_table(("quantity", "value"), rows(r)), "",
             "## Faithfulness per circuit size", "",
             *md_table(("nodes kept", "fraction", "f(C)", "f(all but C)", "error nodes kept"),
                       size_rows), "",
             *md_images(plots(r))]
    return "\n".join(lines)


def write_report(r: dict, out_dir: str | Path) -> list[Path]:
    return write_report_files(out_dir, NAME, r, markdown(r), plots(r), r)
