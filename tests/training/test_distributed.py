"""Data parallel: 2 CPU processes under torchrun (gloo) match one process on the same batches."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from saelab.data.cache import CacheStream
from saelab.sae import SAE, SAEConfig
from saelab.sae_init import init_sae
from saelab.training import TrainConfig, Trainer

HOOK = "blocks.1.hook_resid_post"
STEPS, BATCH = 8, 256
# lr pinned: Adam turns float summation-order differences into steps of up to lr, so at the
# default rule's 2.3e-2 (n = 256, d = 128) the two runs differ by up to 3e-5 after 8 steps (at
# 1.6e-3: 2e-6); a lost all-reduce would differ by ~lr either way
LR = 1.6e-3


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batches(small_cache, tmp_path):
    out = tmp_path / "ddp"
    args = ["--cache", str(small_cache), "--hook", HOOK, "--out", str(out), "--n-latents", "256",
            "--k", "8", "--tokens", str(STEPS * BATCH * 2), "--batch-size", str(BATCH),
            "--eval-tokens", "512", "--warmup-steps", "2", "--lr", str(LR)]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533", "-m", "saelab", "train", *args],
                   check=True, capture_output=True, timeout=600)
    ddp = load_file(str(out / "sae.safetensors"))

    # the same global batches in one process: rank r reads every 2nd shard from the r-th
    cfg = TrainConfig.of(cache=str(small_cache), hook=HOOK, n_latents=256, k=8, batch_size=BATCH,
                      tokens=STEPS * BATCH * 2, warmup_steps=2, lr=LR)
    streams = [iter(CacheStream(small_cache, [HOOK], BATCH, seed=0, shards=[r, r + 2], drop_last=True))
               for r in (0, 1)]
    batches = [[next(s)[HOOK] for _ in range(STEPS)] for s in streams]
    sae = SAE(SAEConfig(d_in=128, n_latents=256, k=8, hook=HOOK))
    init_sae(sae, batches[0][0], seed=0)  # rank 0's init, broadcast to every rank
    trainer = Trainer(sae, cfg.optim, STEPS)
    for step in range(STEPS):
        trainer.step(torch.cat([batches[0][step], batches[1][step]]))
    ref = sae.state_dict()
    for name in ref:
        # same objective (the global batch's FVU); only float summation order differs (~1e-7)
        torch.testing.assert_close(ddp[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_processes_cache_their_own_shards(tmp_path):
    import json

    out = tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29534", "-m", "saelab", "cache", str(out), "--hook", HOOK,
                    "--tokens", "3001", "--shard-rows", "1000", "--context-length", "64"],
                   check=True, capture_output=True, timeout=600)
    manifest = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert manifest["rows"] == 3001 and sum(s["rows"] for s in manifest["shards"]) == 3001
    assert {f[:10] for f in files} == {"shard_r000", "shard_r001"}
    rows = [load_file(str(out / f))[HOOK] for f in files]
    first = {f[:10]: r[0] for f, r in zip(files, rows, strict=True)}
    assert not torch.equal(first["shard_r000"], first["shard_r001"])  # different documents
    served = next(iter(CacheStream(out, HOOK, 4000)))  # one epoch: every row once
    assert served.shape == (3001, 128)


@pytest.mark.slow
def test_two_processes_train_jumprelu_past_its_topk_warmup(small_cache, tmp_path):
    # the warmup's steps give log_threshold no gradient; DDP must allow unused parameters
    out = tmp_path / "jumprelu"
    args = ["--cache", str(small_cache), "--hook", HOOK, "--out", str(out), "--n-latents", "256",
            "--k", "8", "--tokens", str(STEPS * BATCH * 2), "--batch-size", str(BATCH),
            "--eval-tokens", "512", "--allocator", "jumprelu", "--topk-warmup-steps", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29535", "-m", "saelab", "train", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    state = load_file(str(out / "sae.safetensors"))
    thresholds = [v for name, v in state.items() if "threshold" in name]
    assert thresholds and all(torch.isfinite(t).all() and (t != 0).any() for t in thresholds)
