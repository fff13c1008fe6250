"""`saelab circuits` and the task model in `saelab zoo list`: a small real run, and bad input
as one line with exit code 2 before anything is written."""

import json

import pytest
from test_end_to_end import run_cli

from saelab import zoo


@pytest.mark.slow  # path-patches every head pair for its ground truth: minutes on 2 cores
def test_circuits_cli_small_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    code, cap = run_cli(["circuits", "--task", "induction", "--trials", "2", "--train-prompts", "5",
                         "--prompts", "20", "--truth-prompts", "16", "--epochs", "100",
                         "--out", str(out)], monkeypatch, capsys)
    assert code == 0, cap.err
    data = json.loads((out / "circuits.json").read_text())
    assert data["task"] == "induction" and data["trials"] == 2
    for key in ("node_roc_auc", "edge_roc_auc"):
        assert 0 <= data[key]["mean"] <= 1
    assert data["method_forward_passes_per_trial"] == 2 * 25
    assert data["patching_edge_forward_passes"] > data["patching_node_forward_passes"] == 16 * 34
    assert (out / "circuit_heads.png").stat().st_size > 1000
    assert (out / "circuit_roc.png").stat().st_size > 1000
    assert "node ROC AUC" in cap.out and "ground-truth heads" in cap.out
    assert "forward passes" in (out / "circuits.md").read_text()


def test_circuits_cli_bad_input(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    code, cap = run_cli(["circuits", "--task", "iou", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and cap.err.strip().count("\n") == 0
    assert "unknown task 'iou'" in cap.err and not out.exists()
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "a", "counterfactual": "b", "answer": "c", "wrong": "d"}\n{"prompt": 3}\n')
    code, cap = run_cli(["circuits", "--task-file", str(bad), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and f"task file {bad} line 2" in cap.err and not out.exists()
    code, cap = run_cli(["circuits", "--sae", "gated", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "unknown circuit SAE 'gated'" in cap.err and not out.exists()
    code, cap = run_cli(["circuits", "--position", "first", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "unknown position 'first'" in cap.err and not out.exists()
    code, cap = run_cli(["circuits", "--score", "unique", "--position", "all", "--out", str(out)],
                        monkeypatch, capsys)
    assert code == 2 and "position all does not go with score unique" in cap.err and not out.exists()
    code, cap = run_cli(["circuits", "--metric", "kl", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "unknown task metric 'kl'" in cap.err and not out.exists()
    code, cap = run_cli(["circuits", "--task", "greater-than", "--train-prompts", "20", "--out",
                         str(out)], monkeypatch, capsys)
    assert code == 2 and cap.err.strip().count("\n") == 0 and not out.exists()
    assert "can make only 112 rows" in cap.err and "20 + 100 = 120" in cap.err


def test_zoo_list_shows_task_accuracy(monkeypatch, capsys):
    code, cap = run_cli(["zoo", "list"], monkeypatch, capsys)
    assert code == 0
    card = zoo.card("tasks-4l")
    assert set(card["tasks"]) == {"ioi", "greater-than", "docstring", "induction"}
    for task, t in card["tasks"].items():
        assert f"task {task}: accuracy {t['accuracy']:.1%}" in cap.out
