"""`saelab circuits --method patching|eap|eap-ig --basis heads|neurons|DICT` and `saelab eval
DICT --task T`: small real runs on tiny models, and bad input as one line with exit code 2
before anything is written."""

import json

import pytest
from test_attribution import letters, partial_dictionary, tiny_model
from test_end_to_end import run_cli

from saelab.sae import SAE, SAEConfig

SMALL = ["--attr-prompts", "5", "--faith-prompts", "5"]


@pytest.fixture(scope="module")
def model_and_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model(root / "m", live={(1, 0)})
    task = root / "copy.jsonl"
    rows = letters()
    task.write_text("".join(json.dumps({"prompt": p, "counterfactual": c, "answer": a[0],
                                        "wrong": w[0]}) + "\n"
                            for p, c, a, w in zip(rows.prompts, rows.counterfactuals, rows.answers,
                                                  rows.wrongs, strict=True)))
    return model, task


@pytest.mark.parametrize("method", ["patching", "eap", "eap-ig"])
def test_circuits_cli_attribution_on_heads(model_and_task, tmp_path, monkeypatch, capsys, method):
    model, task = model_and_task
    out = tmp_path / "c"
    code, cap = run_cli(["circuits", "--model", model.spec, "--task-file", str(task), "--method",
                         method, *SMALL, "--out", str(out)], monkeypatch, capsys)
    assert code == 0, cap.err
    data = json.loads((out / "circuits.json").read_text())
    assert data["method"] == method and data["basis"] == "heads" and data["nodes"] == 4
    assert data["metric"] == "logit-diff"
    assert data["node_roc_auc"] == 1.0 and data["nodes_to_08"] == 1
    assert 0.8 < data["cpr"] <= 1 and 0 <= data["cmd"] < 0.2
    f = data["faithfulness"]
    assert f["sizes"] == [0, 1, 2, 3, 4] and len(f["faithfulness"]) == 5
    assert data["cost"]["forward_passes"] > 0
    assert (out / "circuit_faithfulness.png").stat().st_size > 1000
    assert ((out / "circuit_agreement.png").exists()) == (method != "patching")
    assert "CPR" in cap.out and "Pearson" in (out / "circuits.md").read_text()
    if method == "patching":
        assert "edges" not in data
    else:  # on by default; layer 0's heads write nothing here, so no edge curve, said why
        e = data["edges"]
        assert e["edges"] == 4 and e["truth"]["cost"]["forward_passes"] > 0
        assert e["faithfulness"] is None and "does not flow between heads" in e["faithfulness_note"]
        assert "edge ROC AUC" in cap.out and not (out / "circuit_edge_faithfulness.png").exists()


def test_circuits_cli_dictionary_basis(model_and_task, tmp_path, monkeypatch, capsys):
    model, task = model_and_task
    sae_dir = partial_dictionary(model).save(tmp_path / "sae")
    out = tmp_path / "c"
    code, cap = run_cli(["circuits", "--model", model.spec, "--task-file", str(task), "--method",
                         "eap", "--basis", str(sae_dir), "--metric", "prob-diff", *SMALL, "--out",
                         str(out)], monkeypatch, capsys)
    assert code == 0, cap.err
    data = json.loads((out / "circuits.json").read_text())
    assert data["nodes"] == 5 and data["error_nodes"] == 1 and data["metric"] == "prob-diff"
    assert data["sites"] == ["ln_final.hook_normalized"]
    assert data["pearson"] > 0.99  # the logits are linear after this site; prob-diff is not


def test_circuits_cli_bad_input(model_and_task, tmp_path, monkeypatch, capsys):
    model, task = model_and_task
    out = tmp_path / "c"
    base = ["circuits", "--model", model.spec, "--task-file", str(task), *SMALL, "--out", str(out)]
    missing = SAE(SAEConfig(d_in=16, n_latents=4, k=1, hook="blocks.5.hook_resid_post"))
    narrow = SAE(SAEConfig(d_in=8, n_latents=4, k=1, hook="blocks.0.hook_resid_post"))
    cases = [
        (["--method", "acdc"], "unknown circuit method 'acdc'"),
        (["--method", "codes", "--basis", "neurons"], "codes method scores heads only"),
        (["--method", "eap", "--basis", str(missing.save(tmp_path / "d1"))], "not a hook of model"),
        (["--method", "eap", "--basis", str(narrow.save(tmp_path / "d2"))], "has d_in=8"),
        (["--method", "eap", "--basis", "everything"], "unknown basis 'everything'"),
        (["--method", "eap", "--node-ablation", "zero"], "unknown node ablation"),
        (["--method", "eap", "--attr-prompts", "8"], "must not exceed it"),
        (["--method", "eap", "--basis", "neurons", "--attr-edges"], "basis 'neurons' has no edges"),
        (["--method", "patching", "--attr-edges"], "scored by eap or eap-ig, not patching"),
    ]
    for flags, message in cases:
        code, cap = run_cli([*base, *flags], monkeypatch, capsys)
        assert code == 2 and cap.err.strip().count("\n") == 0 and message in cap.err, (flags, cap.err)
        assert not out.exists()


def eval_with_task(tmp_path, out, monkeypatch, capsys, **hooks):
    """`saelab eval --task ioi` on a fresh dictionary of zoo:tasks-4l-v2 (an SAE at blocks.2's
    residual unless `hooks` say otherwise): its directory, exit code and captured output."""
    fields = {"hook": "blocks.2.hook_resid_post"} | hooks
    sae_dir = SAE(SAEConfig(d_in=128, n_latents=32, k=4, model="zoo:tasks-4l-v2", **fields)).save(
        tmp_path / "dictionary")
    code, cap = run_cli(["eval", str(sae_dir), "--task", "ioi", "--tokens", "256", "--out", str(out)],
                        monkeypatch, capsys)
    return sae_dir, code, cap


def test_eval_with_task_adds_circuit_faithfulness(tmp_path, monkeypatch, capsys):
    out = tmp_path / "e"
    sae_dir, code, cap = eval_with_task(tmp_path, out, monkeypatch, capsys)
    assert code == 0, cap.err
    c = json.loads((out / "eval.json").read_text())["circuit"]
    assert c["task"] == "ioi" and c["nodes"] == 33 and c["method"] == "eap-ig"
    assert c["faithfulness"][0] == pytest.approx(0, abs=1e-5)
    assert c["faithfulness"][-1] == pytest.approx(1, abs=1e-5)
    assert 0 <= c["cmd"] and c["cpr"] is not None
    assert "Circuit faithfulness" in (out / "eval.md").read_text() and "CPR" in cap.out
    code, cap = run_cli(["eval", str(sae_dir), "--task", "iou", "--out", str(tmp_path / "x")],
                        monkeypatch, capsys)
    assert code == 2 and "unknown task 'iou'" in cap.err and not (tmp_path / "x").exists()


def test_eval_task_refuses_a_transcoder_before_the_eval(tmp_path, monkeypatch, capsys):
    out = tmp_path / "e"
    _, code, cap = eval_with_task(tmp_path, out, monkeypatch, capsys, hook="blocks.2.hook_resid_mid",
                                  target_hook="blocks.2.hook_resid_post")
    assert code == 2 and cap.err.strip().count("\n") == 0 and "is a transcoder" in cap.err
    assert not out.exists()


def test_eval_keeps_its_report_when_the_circuit_part_fails(tmp_path, monkeypatch, capsys):
    import importlib

    from saelab.errors import SaelabError

    recovery = importlib.import_module("saelab.evals.circuits.recovery")

    def fail(*args, **kw):
        raise SaelabError("the circuit part failed")

    monkeypatch.setattr(recovery, "dictionary_circuit", fail)
    out = tmp_path / "e"
    _, code, cap = eval_with_task(tmp_path, out, monkeypatch, capsys)
    assert code == 2 and "the circuit part failed" in cap.err
    report = json.loads((out / "eval.json").read_text())
    assert "circuit" not in report and report["model"] == "zoo:tasks-4l-v2"
