"""Training transcoders (--target-hook, --skip): the step's loss is the target's, every allocator
trains from a cache holding both hooks and on the fly, and bad combinations fail before any work."""

import json

import pytest
import torch

import saelab
from saelab.cli.pipeline import train_and_evaluate
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.training import TrainConfig
from saelab.training.config import OptimConfig
from saelab.training.trainer import Trainer

# the conftest cache holds both: an MLP's neurons and the residual stream after that block
IN, OUT = "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"
SMALL = dict(hook=IN, target_hook=OUT, n_latents=256, k=8, tokens=16384, batch_size=256,
             eval_tokens=1024, warmup_steps=5)


def test_step_loss_is_the_fvu_of_the_target():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=3, hook="blocks.0.hook_resid_pre",
                        target_hook="blocks.0.hook_mlp_out", d_out=4, skip=True)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    with torch.no_grad():
        pre = x @ sae.W_enc.T + sae.b_enc
        top = pre.topk(3, dim=1).indices
        z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
        y_hat = z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T
        want = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    trainer = Trainer(sae, OptimConfig(tokens=64, batch_size=32), steps=2)
    out = trainer.step(x, None, y)
    assert out["fvu"].item() == pytest.approx(want.item(), rel=1e-9)
    with pytest.raises(SaelabError, match="needs a target"):
        trainer.step(x)


def _mlp_data(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm'd anisotropic input and a small ReLU MLP's output of it (off-centre)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g) * torch.logspace(0, -1, 16)
    w1, w2 = torch.randn(16, 64, generator=g) / 4, torch.randn(64, 16, generator=g) / 8
    x = torch.randn(m, 16, generator=torch.Generator().manual_seed(seed)) @ a
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return x, torch.relu(x @ w1 - 0.5) @ w2 + 0.3


@pytest.mark.parametrize("allocator", ["topk", "relu"])
def test_transcoder_init_explains_variance_on_fresh_tokens(allocator):
    """The init writes what its latents' tokens need. Random decoder rows (the former init)
    start at FVU ~3.5 here (2.5 on zoo:pystdlib-4l-v2's blocks.1 MLP, whose transcoder then
    trained to ~3x the held-out FVU and KL of one from this init, with 69% of latents dead)."""
    from saelab.evals import reconstruction_stats
    from saelab.sae_init import init_sae

    budget = allocator == "topk"
    sae = SAE(SAEConfig(d_in=16, n_latents=256, k=8 if budget else 0, allocator=allocator,
                        hook="blocks.0.ln2.hook_normalized", target_hook="blocks.0.hook_mlp_out"))
    x, y = _mlp_data(512, seed=1)
    init_sae(sae, x, seed=0, l0=None if budget else 8, target=y)
    fresh_x, fresh_y = _mlp_data(4096, seed=2)
    stats = reconstruction_stats(sae, fresh_x, target=fresh_y)
    assert stats["fvu"] < 0.6, stats
    if budget:
        assert stats["l0"] == 8.0  # every top-k slot positive


@pytest.mark.parametrize(("allocator", "skip"), [
    ("topk", False), ("topk", True), ("feature_choice", False), ("mutual_choice", True), ("relu", False),
    ("jumprelu", True), ("matryoshka", False),
])
def test_every_allocator_trains_a_transcoder_from_a_cache(small_cache, tmp_path, allocator, skip):
    out = tmp_path / "t"
    (r,) = train_and_evaluate(TrainConfig.of(cache=str(small_cache), out=str(out), allocator=allocator,
                                             skip=skip, **SMALL)).values()
    sae = saelab.load(str(out))
    assert (sae.cfg.hook, sae.cfg.target_hook, sae.cfg.skip) == (IN, OUT, skip)
    assert (sae.cfg.d_in, sae.cfg.out_dim) == (512, 128)
    report = json.loads((out / "eval.json").read_text())
    assert (report["hook"], report["target_hook"], report["skip"]) == (IN, OUT, skip)
    # the target's variance is explained (FVU of the input, 512 wide, could not even be computed)
    assert r.summary["heldout_fvu"] < 0.9, r.summary
    assert 0 < report["ce_loss_recovered"] <= 1.05 and report["ce_sae"] < report["ce_zero"]


def test_gradient_topk_transcoder_trains_on_the_fly(tmp_path):
    """On the fly (no cache), with the loss gradient w.r.t. the target steering selection."""
    cfg = TrainConfig.of(model="zoo:pystdlib-4l", out=str(tmp_path / "g"), allocator="gradient_topk",
                         buffer_tokens=2048, context_length=64, **{**SMALL, "tokens": 4096})
    (r,) = train_and_evaluate(cfg).values()
    assert saelab.load(str(tmp_path / "g")).cfg.target_hook == OUT
    assert r.summary["heldout_fvu"] < 1.0


@pytest.mark.parametrize(("fields", "message"), [
    ({"hook": OUT, "target_hook": IN}, "does not come after input hook"),
    ({"hook": IN, "skip": True}, "--skip adds a skip connection to a transcoder; also pass --target-hook"),
    ({"hook": [IN, "blocks.2.hook_resid_post"], "target_hook": "blocks.3.hook_mlp_out"},
     "needs exactly one --hook"),
])
def test_bad_combinations_fail_in_one_line_before_any_work(tmp_path, fields, message):
    with pytest.raises(SaelabError, match=message) as e:
        TrainConfig.of(out=str(tmp_path / "never"), **fields)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_skip_transcoder_resumes_bitwise(small_cache, tmp_path):
    """Killed after a checkpoint and resumed, a skip transcoder ends equal to an uninterrupted
    run (W_skip and its Adam state in the checkpoint; the target stream's position too)."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from saelab.training import resume_config
    from saelab.training.checkpoint import CHECKPOINT_FILE

    run = {**SMALL, "skip": True, "tokens": 150 * 256, "checkpoint_every": 10}
    cache = str(small_cache)
    (ref,) = train_and_evaluate(TrainConfig.of(cache=cache, out=str(tmp_path / "ref"), **run)).values()
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "saelab", "train", "--cache", cache, "--out", str(killed), "--skip"]
    for key, value in run.items():
        if key != "skip":
            args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / CHECKPOINT_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "sae.safetensors").exists()  # killed mid-run
    (resumed,) = train_and_evaluate(resume_config(killed), resume=True).values()
    a, b = load_file(str(ref.out / "sae.safetensors")), load_file(str(resumed.out / "sae.safetensors"))
    assert a.keys() == b.keys() and "W_skip" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
