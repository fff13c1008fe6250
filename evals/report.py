"""Eval reports: eval.json, eval.md, two PNG histograms, and a one-screen terminal summary.

Everything is drawn from the report dict alone (`evaluate`'s return value, or eval.json read
back), so a report can be re-rendered without re-running the model.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from saelab.evals.latents import RARE_FIRES
from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

NAME = "eval"  # eval.json, eval.md
DENSITY_PNG, L0_PNG = "latent_density.png", "l0_histogram.png"


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _rows(r: dict) -> list[tuple[str, str, str]]:
    """(metric, value, meaning) rows shared by the markdown table and the terminal summary."""
    t = r["tokens"]
    return [
        ("tokens", _fmt(t), f"non-BOS/pad held-out positions ({r['rows']:,} rows of {r['context_length']})"),
        ("L0", _fmt(r["l0"]), "mean active latents per token"),
        ("explained variance", _fmt(r["explained_variance"]),
         "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, mean over the set"),
        ("FVU", _fmt(r["fvu"]), "fraction of variance unexplained"),
        ("MSE", _fmt(r["mse"]), "mean squared error per element"),
        ("cosine similarity", _fmt(r["cosine_similarity"]), "mean per-token cos(x, x_hat)"),
        ("dead latents", f"{r['dead_latents']:,} ({r['dead_frac']:.2%})",
         f"never active in the {t:,}-token window"),
        ("rare latents", f"{r['rare_latents']:,} ({r['rare_frac']:.2%})",
         f"active on 1-{RARE_FIRES - 1} of the {t:,} tokens: too few to tell from dead"),
        ("dense latents >10%", f"{r['dense_latents_10pct']:,} ({r['dense_frac_10pct']:.2%})",
         "active on more than 10% of tokens"),
        ("dense latents >1%", f"{r['dense_latents_1pct']:,} ({r['dense_frac_1pct']:.2%})",
         "active on more than 1% of tokens"),
        ("CE clean", _fmt(r["ce_clean"]), f"nats/token over {r['predicted_positions']:,} predictions"),
        ("CE SAE", _fmt(r["ce_sae"]), "reconstruction spliced in at the hook"),
        ("CE zero ablation", _fmt(r["ce_zero"]), "hook activation set to 0"),
        ("CE mean ablation", _fmt(r["ce_mean"]), "hook activation set to its eval-set mean"),
        ("delta loss", _fmt(r["delta_loss"]), "CE SAE - CE clean"),
        ("CE loss recovered", _fmt(r["ce_loss_recovered"]), "(CE zero - CE SAE) / (CE zero - CE clean)"),
        ("KL(clean || SAE)", _fmt(r["kl_sae"]), "nats per prediction"),
        ("KL(clean || zero)", _fmt(r["kl_zero"]), "nats per prediction"),
        ("KL div score", _fmt(r["kl_div_score"]), "(KL zero - KL SAE) / KL zero"),
    ]


def _title(r: dict) -> str:
    if r.get("target_hook"):  # a transcoder: scored on its target, spliced in there
        kind = "skip transcoder" if r.get("skip") else "transcoder"
        return (f"{r['allocator']} {kind}, {r['n_latents']:,} latents, k={r['k']}, on {r['model']} "
                f"{r['hook']} -> {r['target_hook']} (FVU and splices at the target)")
    return (f"{r['allocator']} SAE, {r['n_latents']:,} latents, k={r['k']}, on {r['model']} "
            f"{r['hook']}")


def format_summary(report: dict) -> str:
    """A one-screen text summary for the terminal."""
    lines = [f"Evaluated {_title(report)}",
             f"  data: {report['data']} ({report['split']})"]
    rows = _rows(report) + (_circuit_rows(report["circuit"]) if report.get("circuit") else [])
    return "\n".join(lines + text_table(rows))


def _density_plot(r: dict) -> Figure:
    live = [math.log10(d) for d in r["latent_density"] if d > 0]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    low = math.floor(math.log10(1 / r["tokens"]))
    ax.hist(live, bins=50, range=(low, 0), color="tab:blue")
    for level, label in ((-2, "dense: >1% / >10%"), (-1, None)):
        ax.axvline(level, color="tab:red", linestyle="--", linewidth=1, label=label)
    ax.legend(loc="upper right")
    ax.set_xlabel("log10(fraction of tokens a latent is active on)")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density over {r['tokens']:,} tokens\n"
                 f"{r['dead_latents']:,} dead latents (never active) not shown", fontsize=10)
    return fig


def _l0_plot(r: dict) -> Figure:
    counts = r["l0_histogram"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), counts, width=1.0, color="tab:green")
    ax.axvline(r["l0"], color="black", linestyle="--", linewidth=1, label=f"mean {r['l0']:.2f}")
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Per-token L0 over {r['tokens']:,} tokens", fontsize=10)
    ax.legend()
    return fig


PLOTS = (Plot(DENSITY_PNG, "latent density", _density_plot), Plot(L0_PNG, "per-token L0", _l0_plot))


def _markdown(r: dict) -> str:
    lines = [f"# SAE evaluation: {r['hook']}", "", f"{_title(r)}.", "",
             f"Dictionary: `{r['dictionary'] or '(in memory)'}`. Data: `{r['data']}` ({r['split']} split). "
             f"saelab {r['saelab_version']}, {r['seconds']} s.", ""]
    lines += [*md_table(("metric", "value", "meaning"), _rows(r)), "", *md_images(PLOTS)]
    if r.get("circuit"):
        lines += ["## Circuit faithfulness", "", *md_table(("metric", "value", "meaning"),
                                                         _circuit_rows(r["circuit"])), ""]
    return "\n".join(lines)


def _circuit_rows(c: dict) -> list[tuple[str, str, str]]:
    """`saelab eval --task`'s rows: faithfulness of circuits of this dictionary's nodes."""
    where = (f"{c['method']} scores; top nodes kept, the rest {c['ablation']}-patched, on "
             f"{c['prompts']} held-out {c['task']} prompts ({c['metric']})")
    return [("CPR", _fmt(c["cpr"]), f"area under faithfulness against fraction kept; {where}"),
            ("CMD", _fmt(c["cmd"]), "area under |1 - faithfulness| (lower is better)"),
            ("nodes to f >= 0.8", _fmt(c["nodes_to_08"]),
             f"of {c['nodes']:,} (latents and one error node)")] + _circuit_members(c)


def _circuit_members(c: dict, shown: int = 20) -> list[tuple[str, str, str]]:
    """The nodes of the smallest circuit with f >= 0.8, largest |score| first (the browser
    marks these latents and links here)."""
    nodes = c.get("circuit_nodes") or []
    if not nodes:
        return []
    names = ", ".join(f"{n.rsplit('/', 1)[-1]} ({s:+.3f})" for n, s in nodes[:shown])
    more = f", ... {len(nodes) - shown} more" if len(nodes) > shown else ""
    return [("its nodes", names + more, "latent ids (or error) with their scores, largest |score| first")]


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write eval.json, eval.md and the two histograms into `out_dir`; returns their paths.

    Each file is replaced atomically; other files in `out_dir` are left alone, so the report
    can sit beside the dictionary it describes.
    """
    return write_report_files(out_dir, NAME, report, _markdown(report), PLOTS, report)
