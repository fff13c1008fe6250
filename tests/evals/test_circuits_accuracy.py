"""A task the model cannot do gets a one-line warning naming its accuracy (its ground truth
would be noise), from discover() and from `saelab circuits`; a task it does gets none."""

import json
import warnings

import pytest
import torch
from test_end_to_end import run_cli

from saelab import tasks
from saelab.errors import SaelabWarning
from saelab.evals.circuits.accuracy import ACCURACY_FLOOR, warn_if_inaccurate
from saelab.models import load_model
from saelab.zoo import model_dir

MODEL = "zoo:tasks-4l"


def _task_file(path, task: tasks.Task, swap: bool) -> str:
    """`task` as a task file; with `swap`, answers and wrong tokens trade places."""
    rows = [{"prompt": p, "counterfactual": c, "answer": list(w if swap else a),
             "wrong": list(a if swap else w)}
            for p, c, a, w in zip(task.prompts, task.counterfactuals, task.answers, task.wrongs,
                                  strict=True)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _hf_accuracy(task: tasks.Task) -> float:
    """Reference: the transformers model itself, one prompt at a time, best answer vs best wrong."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir(MODEL)
    tok, hf = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d).eval()
    right = 0
    with torch.no_grad():
        for p, a, w in zip(task.prompts, task.answers, task.wrongs, strict=True):
            last = hf(tok(p, return_tensors="pt")["input_ids"]).logits[0, -1]
            ids = lambda words: [tok(x, add_special_tokens=False)["input_ids"][0] for x in words]  # noqa: E731
            right += last[ids(a)].max() > last[ids(w)].max()
    return right / len(task)


def test_accuracy_against_the_model_and_the_floor(tmp_path):
    model = load_model(MODEL)
    task = tasks.generate("ioi", 24, seed=5)
    good = tasks.load_task_file(_task_file(tmp_path / "ioi.jsonl", task, swap=False))
    bad = tasks.load_task_file(_task_file(tmp_path / "swapped.jsonl", task, swap=True))
    tok = lambda t: tasks.tokenize(t, model.tokenizer, model.context_length)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a task the model does: no warning at all
        acc = warn_if_inaccurate(model, "ioi", tok(good))
    assert acc == pytest.approx(_hf_accuracy(task)) and acc >= ACCURACY_FLOOR
    with pytest.warns(SaelabWarning) as caught:
        low = warn_if_inaccurate(model, "swapped", tok(bad))
    assert low == pytest.approx(1 - acc)  # no ties between an IOI answer and its wrong name
    (w,) = caught
    msg = str(w.message)
    assert "\n" not in msg and f"{low:.0%} of 24" in msg and "swapped" in msg and "floor 80%" in msg


def test_circuits_cli_warns_in_one_line(tmp_path, monkeypatch, capsys):
    f = _task_file(tmp_path / "swapped.jsonl", tasks.generate("ioi", 12, seed=5), swap=True)
    out = tmp_path / "c"
    code, cap = run_cli(["circuits", "--model", MODEL, "--task-file", f, "--trials", "1",
                         "--train-prompts", "3", "--prompts", "6", "--epochs", "5", "--no-edges",
                         "--truth-sets", "1", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, cap.err
    (line,) = [x for x in cap.err.splitlines() if "floor" in x]
    assert line.startswith("saelab: warning: zoo:tasks-4l does task swapped right on only 0% of 12")
    assert "warnings.warn" not in cap.err  # Python's second line (the source) is not shown
    assert (out / "circuits.json").exists()
