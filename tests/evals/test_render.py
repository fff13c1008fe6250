"""The shared report rendering: markdown and text tables against hand-written strings, PNGs
written atomically (checked with an independent PNG reader), and a report directory's files."""
import json

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from saelab.evals.render import Plot, md_images, md_table, save_png, text_table, write_report_files


def _figure() -> Figure:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_md_table_escapes_pipes_and_newlines():
    lines = md_table(["name", "KL(p || q)"], [["a|b", "1\n2"], ["|x|", "3\r\n4"]])
    assert "\n".join(lines) == (
        "| name | KL(p \\|\\| q) |\n"
        "| --- | --- |\n"
        "| a\\|b | 1<br>2 |\n"
        "| \\|x\\| | 3<br>4 |"
    )


def test_text_table_alignments():
    rows = [("L0", "12.5", "mean active"), ("dead latents", "3", "never active")]
    assert text_table(rows) == ["  L0            12.5  mean active",
                                "  dead latents  3     never active"]
    assert text_table([("layer", "density"), ("0", "4.2%")], right=True) == ["  layer  density",
                                                                              "      0     4.2%"]


def test_md_images_one_paragraph_each():
    plots = [Plot("a.png", "first", _figure), Plot("b.png", "second", _figure)]
    assert md_images(plots) == ["![first](a.png)", "", "![second](b.png)", ""]


def test_save_png_writes_a_png_and_no_temp(tmp_path):
    path = tmp_path / "plot.png"
    save_png(_figure(), path, dpi=50)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert imread(path).shape[:2] == (50, 100)  # figsize (2, 1) inches at 50 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_save_png_failing_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    save_png(_figure(), path)
    old = path.read_bytes()
    fig = _figure()
    real = fig.savefig
    seen = []

    def half_then_fail(target, **kwargs):
        seen.append(target)
        assert path.read_bytes() == old  # the target is untouched while the new PNG is written
        real(target, **kwargs)
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        raise RuntimeError("renderer died")

    fig.savefig = half_then_fail
    with pytest.raises(RuntimeError, match="renderer died"):
        save_png(fig, path)
    assert seen and seen[0] != path
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_write_report_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    drawn = []

    def draw(subject):
        drawn.append(subject)
        return _figure()

    plots = [Plot("one.png", "one", draw), Plot("two.png", "two", draw)]
    paths = write_report_files(tmp_path, "rep", {"x": 1}, "# hi\n", plots, subject="S")
    assert [p.name for p in paths] == ["rep.json", "rep.md", "one.png", "two.png"]
    assert json.loads(paths[0].read_text()) == {"x": 1} and paths[1].read_text() == "# hi\n"
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[2:]) and drawn == ["S", "S"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "one.png", "rep.json",
                                                          "rep.md", "two.png"]
    assert (tmp_path / "keep.txt").read_text() == "mine"
