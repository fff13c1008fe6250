"""Report rendering shared by the eval, sparsity and circuit reports: PNGs, tables, report files.

A report is a directory of NAME.json (the numbers), NAME.md (a table per section and the plots
as images) and PNGs, plus a terminal summary. Figures are drawn on matplotlib's Agg canvas,
never through pyplot, so a notebook's backend is left alone; every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saelab.storage.files import write_atomic, write_json, write_text


class Plot(NamedTuple):
    """One PNG of a report: its file name, its caption in the markdown, and what draws it
    from the report's subject (the report dict, or the result the dict summarises)."""

    file: str
    caption: str
    draw: Callable[[Any], Figure]


def save_png(fig: Figure, path: Path, dpi: int = 100) -> None:
    """Render `fig` to `path` atomically: a failed render leaves any previous file as it was."""
    FigureCanvasAgg(fig)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def md_cell(text: str) -> str:
    """Escape what would break a table cell: pipes (norms, KL(p || q)) and line breaks."""
    return "<br>".join(text.replace("|", "\\|").splitlines())


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines, every cell (the header's too) escaped."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"

    return [line(head), "|" + " --- |" * len(head), *(line(row) for row in rows)]


def md_images(plots: Iterable[Plot]) -> list[str]:
    """The markdown lines that show `plots`, one paragraph each."""
    return [line for p in plots for line in (f"![{p.caption}]({p.file})", "")]


def text_table(rows: Sequence[Sequence[str]], right: bool = False) -> list[str]:
    """Indented columns two spaces apart, padded to their widest cell.

    Right-aligned for columns of numbers; left-aligned (labels, then values) with the last
    column unpadded, so no line ends in spaces."""
    widths = [max(len(c) for c in col) for col in zip(*rows, strict=True)]
    if not right:
        widths[-1] = 0
    align = ">" if right else "<"
    return ["  " + "  ".join(f"{c:{align}{w}}" for c, w in zip(row, widths, strict=True))
            for row in rows]


def write_report_files(out_dir: str | Path, name: str, data: object, markdown: str,
                       plots: Iterable[Plot], subject: object) -> list[Path]:
    """Write NAME.json (`data`), NAME.md and each plot drawn from `subject` into `out_dir`;
    returns their paths in that order.

    Each file is replaced atomically and each figure drawn only when it is saved; other files
    in `out_dir` are left alone, so a report can sit beside what it describes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_json(paths[0], data)
    write_text(paths[1], markdown)
    for plot in plots:
        paths.append(out / plot.file)
        save_png(plot.draw(subject), paths[-1])
    return paths
