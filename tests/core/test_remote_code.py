"""No code shipped with a model, hub repo or dataset ever runs (issue 22): a directory whose
configs point to its own Python (`auto_map`) is a one-line error, whether stdin is a pipe or a
terminal answering "y" to transformers' "run the custom code?" prompt, and the loaders'
trust_remote_code=False holds even with saelab's up-front check taken away. Every Python file
the directory ships would write a marker file when imported; the marker never appears."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import saelab.models
from saelab.cli.app import main
from saelab.errors import SaelabError
from saelab.zoo import model_dir

ZOO = "zoo:pystdlib-4l"
HANG_GUARD = 300  # seconds: only stops a test that waits on a prompt forever
YES = "y\n" * 4  # an answer for every prompt transformers might ask


def _marker_code(marker: Path) -> str:
    """A module that leaves `marker` behind when imported, and defines the classes it names."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast\n"
            "class CustomConfig(GPT2Config):\n    model_type = 'custom-gpt'\n"
            "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
            "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def custom_code_dir(tmp_path: Path, carrier: str) -> tuple[Path, Path]:
    """(a copy of a zoo model whose `carrier` config names code it ships, the marker path)."""
    model, marker = tmp_path / "custom-model", tmp_path / "MARKER"
    shutil.copytree(model_dir(ZOO), model)
    cfg = json.loads((model / carrier).read_text())
    if carrier == "config.json":
        cfg["model_type"] = "custom-gpt"  # unknown to transformers: it would ask to run the code
        cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    else:
        cfg["tokenizer_class"] = "CustomTokenizer"
        cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (model / carrier).write_text(json.dumps(cfg))
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (model / f"{module}.py").write_text(_marker_code(marker))
    return model, marker


def _run_in_pty(args: list[str]) -> tuple[int, str]:
    """(exit code, output) of a command whose stdin, stdout and stderr are a pseudo-terminal,
    with "y" typed ahead for any prompt (not echoed, so the output is the command's own)."""
    primary, secondary = os.openpty()
    attrs = termios.tcgetattr(secondary)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(secondary, termios.TCSANOW, attrs)
    proc = subprocess.Popen(args, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    os.write(primary, YES.encode())
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    return proc.wait(timeout=HANG_GUARD), out.decode(errors="replace")


def _assert_refused(code: int, err: str, marker: Path) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("saelab: error: ") and "ships custom code" in lines[0]
    assert "auto_map in config.json" in lines[0] and "modeling_custom.CustomModel" in lines[0]
    assert not marker.exists()


def test_info_refuses_a_model_that_ships_code(tmp_path, monkeypatch, capsys):
    model, marker = custom_code_dir(tmp_path, "config.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))  # not a terminal, and answering "y"
    with pytest.raises(SystemExit) as e:
        main(["info", str(model)])
    _assert_refused(e.value.code, capsys.readouterr().err, marker)


def test_info_refuses_a_model_that_ships_code_in_a_terminal(tmp_path):
    model, marker = custom_code_dir(tmp_path, "config.json")
    _assert_refused(*_run_in_pty([sys.executable, "-m", "saelab", "info", str(model)]), marker)


@pytest.mark.parametrize("carrier", ["config.json", "tokenizer_config.json"])
def test_load_model_refuses_code_up_front(tmp_path, monkeypatch, carrier):
    model, marker = custom_code_dir(tmp_path, carrier)
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))  # not a terminal, and answering "y"
    with pytest.raises(SaelabError, match=f"ships custom code \\(auto_map in {carrier}"):
        saelab.models.load_model(str(model))
    assert not marker.exists()


def test_loaders_refuse_code_without_the_up_front_check(tmp_path, monkeypatch):
    """trust_remote_code=False alone keeps the code from running: transformers' own refusal,
    as one line."""
    model, marker = custom_code_dir(tmp_path, "config.json")
    monkeypatch.setattr(saelab.models, "check_no_custom_code", lambda *a: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    with pytest.raises(SaelabError, match="could not load model directory .* custom code") as e:
        saelab.models.load_model(str(model))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_tokenizer_code_never_runs_without_the_up_front_check(tmp_path, monkeypatch):
    """A custom tokenizer class beside a model type transformers knows: with
    trust_remote_code=False transformers loads its built-in tokenizer, never the shipped one."""
    model, marker = custom_code_dir(tmp_path, "tokenizer_config.json")
    monkeypatch.setattr(saelab.models, "check_no_custom_code", lambda *a: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    _, _, tokenizer = saelab.models._load_hf(str(model), "cpu", torch.float32)
    assert type(tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_loaders_refuse_code_in_a_terminal_without_the_up_front_check(tmp_path):
    """The same with a terminal answering "y", where transformers would otherwise run it."""
    model, marker = custom_code_dir(tmp_path, "config.json")
    script = ("import saelab.models as m; m.check_no_custom_code = lambda *a: None; "
              f"m.load_model({str(model)!r})")
    code, out = _run_in_pty([sys.executable, "-c", script])
    assert code == 1 and "SaelabError: could not load model directory" in out, out
    assert not marker.exists()


def _cached_hub_model(hf_home: Path, repo: str, files: Path) -> Path:
    """Put `files` in a Hugging Face cache under HF_HOME as hub repo `repo`; its snapshot dir."""
    commit = "0" * 40
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit)
    return root / "snapshots" / commit


def test_hub_model_that_ships_code_is_refused(tmp_path):
    """A hub repo with an auto_map beside a model_type transformers knows: transformers would
    load its built-in class and ignore the code, transformer-lens 3.x would run it. saelab
    refuses it, read from the local cache (HF_HUB_OFFLINE) since this test has no hub."""
    model, marker = custom_code_dir(tmp_path, "config.json")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    _cached_hub_model(tmp_path / "hf", "saelab-test/custom-code", model)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "saelab", "info", "hf:saelab-test/custom-code"],
                          input=YES, capture_output=True, text=True, env=env, timeout=HANG_GUARD)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "model 'hf:saelab-test/custom-code' ships custom code" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("script", [False, True], ids=["directory", "script"])
def test_dataset_script_never_runs(tmp_path, monkeypatch, script):
    """A dataset loading script (a directory holding NAME/NAME.py, or the .py itself) is refused:
    datasets >= 4 has no script support and saelab passes trust_remote_code=False."""
    from saelab.data.tokens import load_texts
    from saelab.formats import hub

    data, marker = tmp_path / "custom_data", tmp_path / "MARKER"
    data.mkdir()
    (data / "custom_data.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.setattr(hub, "offline_mode", lambda: True)  # a local path: no hub probe
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    target = data / "custom_data.py" if script else data
    with pytest.raises(SaelabError, match="could not load Hugging Face dataset") as e:
        load_texts(f"hf:{target}")
    assert "\n" not in str(e.value)
    assert not marker.exists()
