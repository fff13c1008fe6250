"""Probing reports: probing.json, probing.md, one PNG (accuracy against k per label family;
absorption per letter) and a terminal summary, all drawn from the report dict alone."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from saelab.browse.card import PROBES_FILE
from saelab.evals.probes.absorption import MIN_PROBE_F1
from saelab.evals.render import Plot, md_images, md_table, text_table, write_report_files

NAME = PROBES_FILE.removesuffix(".json")  # probing.json, probing.md; the browser reads the json
PNG = "probing.png"


def _families(r: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in r["labels"].values():
        out.setdefault(row["family"], []).append(row)
    return out


def _mean(rows: list[dict], key: str, k: str | None = None) -> float:
    vals = [row[key]["accuracy"] if k is None else row[key][k]["accuracy"] for row in rows]
    return sum(vals) / len(vals)


def _family_rows(r: dict) -> list[list[str]]:
    """Mean held-out accuracy per family: ceiling, each k, floor at the largest k."""
    ks = [str(k) for k in r["ks"]]
    return [[fam, str(len(rows)), f"{_mean(rows, 'ceiling'):.3f}",
             *(f"{_mean(rows, 'sparse', k):.3f}" for k in ks), f"{_mean(rows, 'floor', ks[0]):.3f}",
             f"{_mean(rows, 'floor', ks[-1]):.3f}"]
            for fam, rows in _families(r).items()]


def _label_rows(r: dict) -> list[list[str]]:
    ks = [str(k) for k in r["ks"]]
    return [[name, row["family"], f"{row['positives']:,}", f"{row['ceiling']['accuracy']:.3f}",
             *(f"{row['sparse'][k]['accuracy']:.3f}" for k in ks),
             f"{row['floor'][ks[0]]['accuracy']:.3f}", str(row["top_latents"][0])]
            for name, row in r["labels"].items()]


def _letter_rows(r: dict) -> list[list[str]]:
    return [[c, f"{a['probe_f1']:.3f}", "yes" if a["included"] else "no",
             ", ".join(map(str, a["main_latents"])), str(a["probe_true_positives"]),
             str(a["absorbed"]), f"{a['rate']:.3f}"]
            for c, a in r["absorption"]["letters"].items()]


def _fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _plot(r: dict) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=(1, 1.4))
    ks = r["ks"]
    for i, (fam, rows) in enumerate(_families(r).items()):
        color = f"C{i}"
        ax.plot(ks, [_mean(rows, "sparse", str(k)) for k in ks], marker="o", color=color,
                label=f"{fam} ({len(rows)})")
        ax.axhline(_mean(rows, "ceiling"), color=color, linestyle="--", linewidth=1)
    floor = [sum(_floor(row, k) for row in r["labels"].values()) / max(len(r["labels"]), 1) for k in ks]
    ax.plot(ks, floor, color="gray", linestyle=":", marker="x", label="floor: k random live latents")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (latents in the probe)")
    ax.set_ylabel("held-out accuracy (balanced; chance 0.5)")
    ax.set_title("Sparse probing, mean per label family\n(dashed: probe on the full activation)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    letters = r["absorption"]["letters"]
    names = list(letters)
    bx.bar(names, [letters[c]["rate"] for c in names],
           color=["tab:red" if letters[c]["included"] else "lightgray" for c in names])
    mean = r["absorption"]["mean_rate"]
    if mean is not None:
        bx.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        bx.legend(fontsize=8)
    bx.set_ylabel("full-absorption rate")
    bx.set_title(f"Absorption per first letter (gray: probe F1 <= {MIN_PROBE_F1}, left out)", fontsize=10)
    return fig


def _floor(row: dict, k: int) -> float:
    return row["floor"][str(k)]["accuracy"]


PLOTS = (Plot(PNG, "sparse probing and absorption", _plot),)


def _source(r: dict) -> str:
    if r.get("label_source") == "tasks":
        return f"{r['positions']:,} positions of {r['files']:,} prompts of the {r['data']}"
    rare = (f", and {r['rare_positions']:,} more in rows drawn for rare labels (theirs alone)"
            if r.get("rare_positions") else "")
    return (f"{r['positions']:,} positions ({r['rows']:,} rows of up to {r['context_length']}) from "
            f"{r['files']} held-out files of `{r['data']}` ({r['files_skipped']} skipped: not Python)"
            + rare)


def _title(r: dict) -> str:
    return (f"{r['allocator']} SAE, {r['n_latents']:,} latents, k={r['k']}, on {r['model']} {r['hook']}")


def _markdown(r: dict) -> str:
    ks = [str(k) for k in r["ks"]]
    a = r["absorption"]
    lines = [f"# Feature quality: {r['hook']}", "", f"{_title(r)}.", "", f"{_source(r)}; "
             f"{r['test_fraction_files']:.0%} of them held out for testing. Logistic "
             f"probes: L-BFGS, L2 {r['l2']} on standardised features. saelab {r['saelab_version']}, "
             f"{r['seconds']} s.", "", "## Sparse probing, per family (mean held-out accuracy)", "",
             *md_table(["family", "labels", "ceiling", *(f"k={k}" for k in ks), f"floor k={ks[0]}",
                        f"floor k={ks[-1]}"], _family_rows(r)), "",
             "## Absorption (first letter of the identifier being spelled)", "",
             f"Mean full-absorption rate {_fmt_rate(a['mean_rate'])} over {a['letters_included']} "
             f"letters whose probe F1 > {MIN_PROBE_F1} ({a['letters_probed']} probed); "
             f"{a['split_letters']} of them split over several main latents. A letter's negatives: "
             f"{r.get('letter_negatives', 'every other position')}.", "",
             *md_table(["letter", "probe F1", "included", "main latents", "probe true positives",
                        "absorbed", "rate"], _letter_rows(r)), "",
             "## Per label", "",
             *md_table(["label", "family", "positives", "ceiling", *(f"k={k}" for k in ks),
                        f"floor k={ks[0]}", "top latent"], _label_rows(r)), ""]
    if r["labels_skipped"]:
        lines += ["Skipped (fewer than 20 positives on the train or test side): "
                  + ", ".join(f"{n} ({c})" for n, c in r["labels_skipped"].items()), ""]
    return "\n".join(lines + md_images(PLOTS))


def format_probes_summary(r: dict) -> str:
    """A one-screen terminal summary: per-family accuracy and the absorption mean."""
    ks = [str(k) for k in r["ks"]]
    head = ["family", "ceiling", *(f"k={k}" for k in ks), f"floor k={ks[0]}", f"floor k={ks[-1]}"]
    rows = [[row[0], *row[2:]] for row in _family_rows(r)]
    a = r["absorption"]
    return "\n".join([f"Probed {_title(r)}",
                      f"  {_source(r)}, {r['seconds']} s", *text_table([head, *rows], right=True),
                      f"  absorption: mean rate {_fmt_rate(a['mean_rate'])} over {a['letters_included']} "
                      f"letters, {a['split_letters']} split"])


def write_probes_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write probing.json, probing.md and probing.png into `out_dir`; returns their paths."""
    return write_report_files(out_dir, NAME, report, _markdown(report), PLOTS, report)
