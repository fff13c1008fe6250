"""Reports of `recovery.recover`: circuits.json, circuits.md, a faithfulness-curve PNG, a
score-against-exact-effect PNG, with edges an edge-faithfulness PNG, and a terminal summary,
all drawn from the report dict."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

NAME = "circuits"
CURVE_PNG, AGREE_PNG = "circuit_faithfulness.png", "circuit_agreement.png"
EDGE_PNG = "circuit_edge_faithfulness.png"


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
    return out + (edge_rows(r["edges"]) if r.get("edges") else [])


def edge_rows(e: dict) -> list[tuple[str, str]]:
    f, c = e["faithfulness"], e["cost"]
    out = [
        ("head-to-head edges", f"{e['edges']} scored by {e['method']} (Q + K + V; "
         f"{e['graph_edges']} edges in the factorized graph)"),
        ("edge CPR / CMD", f"{_num(e['cpr'])} / {_num(e['cmd'])}"),
        ("edges to f >= 0.8", f"{_num(e['edges_to_08'])} ("
         f"{_num(f['fraction_to_08'] if f else None, 4)} of edges)"),
        ("edge ROC AUC vs path patching", _num(e["edge_roc_auc"])),
        ("edge Pearson r with path patching", _num(e["pearson"])),
        ("edge method cost", f"{c['seconds']} s, {c['forward_passes']} forward + "
         f"{c['backward_passes']} backward passes ({c['prompts']} prompts)"),
        ("edge faithfulness", f"{f['prompts']} held out, m(full) {f['m_full']}, m(every "
         f"head-to-head edge cut) {f['m_empty']}, {f['forward_passes']} forward passes" if f
         else e["faithfulness_note"]),
    ]
    if e.get("truth"):
        t = e["truth"]["cost"]
        out.append(("path patching cost", f"{t['seconds']} s, {t['forward_passes']} forward passes"))
    else:
        out.append(("edge ground truth", e["truth_note"]))
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


def _edge_curve(r: dict) -> Figure:
    e, n = r["edges"]["faithfulness"], r["faithfulness"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    x = [max(v, 0.5 / e["edges"]) for v in e["fractions"]]  # k = 0 drawn at half an edge
    ax.plot(x, e["faithfulness"], marker="o", label=f"edges: f(C), m(none kept) {e['m_empty']:.3g}")
    if e["completeness"]:
        ax.plot(x, e["completeness"], marker="x", linestyle="--", label="edges: f(all but C)")
    ax.plot([max(v, 0.5 / n["nodes"]) for v in n["fractions"]], n["faithfulness"], color="gray",
            marker=".", linewidth=0.8, label=f"nodes: f(C), m(none kept) {n['m_empty']:.3g}")
    ax.axhline(0.8, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of head-to-head edges (nodes) kept (top |score|)")
    ax.set_ylabel("f")
    ax.set_title(f"{r['task']}: {r['method']} edges; CPR {r['edges']['cpr']:.3f}, "
                 f"CMD {r['edges']['cmd']:.3f}", fontsize=10)
    ax.legend()
    return fig


def plots(r: dict) -> list[Plot]:
    out = [Plot(CURVE_PNG, "faithfulness and completeness against circuit size", _curve)]
    if r.get("truth") and r["method"] != "patching":
        out.append(Plot(AGREE_PNG, "method score against exact patching effect", _agreement))
    if r.get("edges") and r["edges"]["faithfulness"]:
        out.append(Plot(EDGE_PNG, "faithfulness of head-to-head edge circuits against size", _edge_curve))
    return out


def edge_markdown(e: dict) -> list[str]:
    f = e["faithfulness"]
    size_rows = [(str(k), f"{x:.4g}", f"{v:.3f}", _num(c))
                 for k, x, v, c in zip(f["sizes"], f["fractions"], f["faithfulness"],
                                       f["completeness"] or [None] * len(f["sizes"]), strict=True)
                 ] if f else []
    truth = e["truth"]["all"] if e.get("truth") else {}
    top_rows = [(name, f"{score:.4f}", _num(truth.get(name), 4)) for name, score in e["top"]]
    return ["## Head-to-head edges", "",
            "A pruned edge feeds the receiving head's Q, K and V inputs the sender's counterfactual "
            "output; edges from the embeddings and MLPs and into the MLPs and logits are kept, so "
            "edge f is scaled by what cutting every head-to-head edge removes (m(empty) "
            f"{f['m_empty'] if f else 'n/a'}), node f by what patching every node removes.", "",
            *(md_table(("edges kept", "fraction", "f(C)", "f(all but C)"), size_rows) if f
              else [e["faithfulness_note"]]), "",
            *md_table(("edge (sender->receiver)", f"{e['method']} score", "path-patched effect"),
                      top_rows), ""]


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
             *(edge_markdown(r["edges"]) if r.get("edges") else []),
             *md_images(plots(r))]
    return "\n".join(lines)


def write_report(r: dict, out_dir: str | Path) -> list[Path]:
    return write_report_files(out_dir, NAME, r, markdown(r), plots(r), r)
