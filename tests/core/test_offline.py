"""An unreachable hub fails in one line, without huggingface_hub's retry loop (issue 22).

The hub is made unreachable deterministically: its endpoint is a closed local port (HF_ENDPOINT
in a subprocess, `saelab.formats.hub.endpoint` in this process), and the names are in no cache. Before
the fix, each hub spec logged "Retrying in Ns" warnings for about 30 s; now saelab's probe sees
the closed port and the loaders read only the cache, so stderr holds exactly the one error line
(checked without any timed assert). The subprocesses read the environment variables at import,
as a user's shell would set them, with an empty HF_HOME as the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.cli.app import main
from saelab.formats import hub
from saelab.zoo import model_dir

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens on it here
TEST_MODEL = "zoo:pystdlib-4l"
HANG_GUARD = 300  # seconds: only stops a test stuck in a retry loop for good
PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}


def hub_commands(tmp: Path) -> dict[str, list[str]]:
    """A command per kind of hub spec (model, dictionary, dataset), each of which writes
    nothing before the spec fails."""
    return {
        "model": ["info", "hf:saelab-test/no-such-model"],
        "dictionary": ["export", "hf:saelab-test/no-such-dictionary", str(tmp / "out")],
        "data": ["cache", str(tmp / "out"), "--model", TEST_MODEL, "--tokens", "64",
                 "--data", "hf:saelab-test/no-such-dataset"],
    }


def saelab_cli(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m saelab ARGS` with an empty hub cache and only `env`'s hub variables (and no
    proxy when `env` names the endpoint, which is then reached directly)."""
    drop = {"HF_HUB_OFFLINE", "HF_ENDPOINT"} | (PROXY_VARS if "HF_ENDPOINT" in env else set())
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True,
                          env={**base, "HF_HOME": str(tmp / "hf"), **env}, timeout=HANG_GUARD)


def assert_one_line(code: int, stderr: str, *needles: str) -> str:
    """The one `saelab: error:` line (exit code 2) holding each of `needles`."""
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr  # no retry warnings
    assert lines[0].startswith("saelab: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_hub(monkeypatch):
    """This process sees the hub at a closed port, HF_HUB_OFFLINE unset, and no proxy."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "endpoint", lambda: CLOSED)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("kind", ["model", "dictionary", "data"])
def test_unreachable_hub_fails_in_one_line(tmp_path, closed_hub, capfd, kind):
    """In this process (fast): stderr is read at the file descriptor, so a retry warning that
    huggingface_hub or datasets logged would show."""
    with pytest.raises(SystemExit) as e:
        main(hub_commands(tmp_path)[kind])
    err = capfd.readouterr().err
    assert_one_line(e.value.code, err, "saelab-test/no-such-", f"the hub {CLOSED} is unreachable")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_variable_fails_in_one_line(tmp_path):
    """The same with HF_ENDPOINT set in the environment, as a user would."""
    done = saelab_cli(hub_commands(tmp_path)["model"], tmp_path, HF_ENDPOINT=CLOSED)
    assert_one_line(done.returncode, done.stderr, f"the hub {CLOSED} is unreachable")


@pytest.mark.parametrize("kind", ["model", pytest.param("data", marks=pytest.mark.slow)])
def test_hub_offline_variable_fails_in_one_line(tmp_path, kind):
    """HF_HUB_OFFLINE=1: the model loaders and datasets read only the cache."""
    done = saelab_cli(hub_commands(tmp_path)[kind], tmp_path, HF_HUB_OFFLINE="1")
    line = assert_one_line(done.returncode, done.stderr, "saelab-test/no-such-")
    assert "HF_HUB_OFFLINE is set" in line or "OfflineModeIsEnabled" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a model load in a fresh process
def test_unreachable_hub_still_loads_a_cached_model(tmp_path):
    """No network and no HF_HUB_OFFLINE: a model in the local cache loads from it."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--saelab-test--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir(TEST_MODEL), repo / "snapshots" / commit)
    done = saelab_cli(["info", "hf:saelab-test/cached"], tmp_path, HF_ENDPOINT=CLOSED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hf:saelab-test/cached: 4 layers")


def test_real_environment_fails_in_one_line(tmp_path):
    """This machine's own network, whatever it is: offline, the probe fails; online, the hub
    answers that the repo does not exist. Either way one line."""
    done = saelab_cli(["info", "hf:saelab-test/no-such-model"], tmp_path)
    assert_one_line(done.returncode, done.stderr, "hf:saelab-test/no-such-model")


def test_probe_reports_a_closed_port_and_honours_offline_mode(closed_hub, monkeypatch):
    from huggingface_hub import constants

    assert hub.unreachable().startswith(f"the hub {CLOSED} is unreachable (")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.unreachable() == "HF_HUB_OFFLINE is set"


def test_probe_finds_a_listening_hub_and_goes_through_a_proxy(monkeypatch):
    """An open port is reachable; with a proxy set for the scheme, the proxy is what is probed."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in PROXY_VARS | {"no_proxy", "NO_PROXY"}:
        monkeypatch.delenv(var, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setattr(hub, "endpoint", lambda: f"http://127.0.0.1:{port}")
        assert hub.unreachable() is None
        monkeypatch.setattr(hub, "endpoint", lambda: "http://hub.invalid")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        assert hub.unreachable() is None  # the proxy listens, so the hub's name need not resolve
