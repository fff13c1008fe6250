"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends bit-identical."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saelab.cli.pipeline import train_and_evaluate
from saelab.errors import SaelabError
from saelab.training import TrainConfig, resume_config
from saelab.training.checkpoint import CHECKPOINT_FILE

HOOK = "blocks.1.hook_resid_post"
RUN = dict(hook=HOOK, n_latents=256, k=8, tokens=150 * 512, batch_size=512, eval_tokens=1024,
           checkpoint_every=10)


def _steps_done(path):
    import json

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["saelab_checkpoint"])["trainers"][HOOK]["step_count"]


@pytest.mark.slow
@pytest.mark.parametrize("allocator", ["topk", "mutual_choice", "jumprelu"])
def test_sigkill_then_resume_is_bitwise_identical(allocator, small_cache, tmp_path):
    (ref,) = train_and_evaluate(TrainConfig.of(cache=str(small_cache), out=str(tmp_path / "ref"),
                                               allocator=allocator, **RUN)).values()
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "saelab", "train", "--cache", str(small_cache), "--out", str(killed),
            "--allocator", allocator]
    for key, value in RUN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / CHECKPOINT_FILE
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _steps_done(ckpt)
    assert 0 < done < 150, done  # killed mid-run, after a checkpoint
    assert not (killed / "sae.safetensors").exists()

    (resumed,) = train_and_evaluate(resume_config(killed), resume=True).values()
    a, b = load_file(str(ref.out / "sae.safetensors")), load_file(str(resumed.out / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.summary["train_tokens"] == ref.summary["train_tokens"]


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(SaelabError, match="no checkpoint to resume"):
        resume_config(tmp_path)
