import dataclasses
import math

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.sae_init import geometric_median, init_sae
from saelab.training import TrainConfig
from saelab.training.config import OptimConfig
from saelab.training.losses import auxk_loss, fvu
from saelab.training.trainer import _remove_parallel_grad


def test_geometric_median_beats_nearby_points():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200, 5), 50 + torch.randn(20, 5)])  # 10% far outliers
    m = geometric_median(x)
    cost = lambda p: (x.double() - p).norm(dim=1).sum()  # noqa: E731
    for _ in range(50):
        assert cost(m) <= cost(m + 0.01 * torch.randn(5, dtype=torch.float64)) + 1e-9
    assert m.norm() < 3  # the mean would be pulled to ~4.5 * sqrt(5)


def test_init_ties_encoder_to_unit_decoder():
    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=3))
    init_sae(sae, torch.randn(100, 6), seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))
    assert torch.equal(sae.W_enc, sae.W_dec)


def test_fvu_is_about_the_batch_mean():
    x = torch.tensor([[10.0, 0.0], [12.0, 0.0]])  # large mean, variance 2 about it
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert fvu(x, x_hat).item() == pytest.approx(1 / 2)


def test_parallel_gradient_is_removed():
    sae = SAE(SAEConfig(d_in=6, n_latents=10, k=3))
    init_sae(sae, torch.randn(50, 6), seed=0)
    sae.W_dec.grad = torch.randn(10, 6)
    before = sae.W_dec.grad.clone()
    _remove_parallel_grad(sae)
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    torch.testing.assert_close(dots, torch.zeros(10), atol=1e-6, rtol=0)
    # what was removed is parallel to the row
    diff = before - sae.W_dec.grad
    torch.testing.assert_close(diff, (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)


def test_auxk_uses_only_dead_latents_and_their_top_k():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, n_latents=30, k=2))
    init_sae(sae, torch.randn(64, 8), seed=0)
    x = torch.randn(64, 8)
    x_hat = sae(x).detach()
    pre = sae.pre_acts(x)
    dead = torch.zeros(30, dtype=torch.bool)
    dead[[3, 7, 11, 19]] = True
    loss = auxk_loss(sae, x, x_hat, pre, dead, k_aux=3)
    loss.backward()
    live_grad = sae.W_dec.grad[~dead].abs().sum()
    assert live_grad == 0 and sae.W_dec.grad[dead].abs().sum() > 0
    # hand reference: dense top-3 over the dead columns, decoded without bias
    masked = pre.masked_fill(~dead, -math.inf)
    top = masked.topk(3, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
    e = x - x_hat
    ref = (e - z @ sae.W_dec.detach()).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss.detach(), ref)
    assert auxk_loss(sae, x, x_hat, pre, torch.zeros(30, dtype=torch.bool), 3).item() == 0


def test_lr_rule_and_config_validation(tmp_path):
    rule = OptimConfig().learning_rate
    assert rule(2**14, 768) == pytest.approx(2e-4) and rule(2**16, 4096) == pytest.approx(1e-4)
    # narrower inputs: (768 / 128)^1.5 = 14.7x, near the sweep's 8e-3 at n = 2048, d_in = 128
    assert rule(2048, 128) == pytest.approx(2e-4 * 8**0.5 * 6**1.5) and 8e-3 < rule(2048, 128) < 8.5e-3
    assert rule(2048, 32) == rule(2048, 128)  # not extrapolated below the measured width
    assert OptimConfig(lr=1e-3).learning_rate(2048, 128) == 1e-3
    with pytest.raises(SaelabError, match="k=64 is larger"):
        TrainConfig.of(n_latents=32, k=64)
    f = tmp_path / "c.yaml"
    f.write_text("k: 8\ntokens: 10000\n")
    cfg = TrainConfig.from_file_and_flags(str(f), {"k": 16, "hook": None})
    assert cfg.sae.k == 16 and cfg.optim.tokens == 10000
    f.write_text("lr: 2e-4\ntokens: 1e6\n")  # YAML 1.1 reads these as strings
    cfg = TrainConfig.from_file_and_flags(str(f), {})
    assert cfg.optim.lr == 2e-4 and cfg.optim.tokens == 1_000_000 and isinstance(cfg.optim.tokens, int)
    f.write_text("tokens: many\n")
    with pytest.raises(SaelabError, match="config field tokens must be a number"):
        TrainConfig.from_file_and_flags(str(f), {})
    f.write_text("kk: 8\n")
    with pytest.raises(SaelabError, match=r"unknown training config field\(s\) \['kk'\]"):
        TrainConfig.from_file_and_flags(str(f), {})


def test_l1_penalty_by_hand():
    from saelab.penalty import l1_penalty

    sae = SAE(SAEConfig(d_in=2, n_latents=3, k=0, allocator="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))  # norms 5, 1, 2
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # mean 0, mean squared norm 1
    idx = torch.tensor([[0, 2], [1, 1]])
    vals = torch.tensor([[1.0, 0.5], [2.0, 0.0]])
    # (1*5 + 0.5*2 + 2*1) / 2 tokens / sqrt(1)
    assert l1_penalty(sae, x, idx, vals).item() == pytest.approx(4.0)
    assert l1_penalty(sae, 10 * x, idx, 10 * vals).item() == pytest.approx(4.0)  # scale-free


def sparse_data(n_atoms: int = 24, d: int = 12, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Rows made of 3 random atoms each with positive weights: a relu SAE can find them."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    which = torch.rand(rows, n_atoms, generator=g).argsort(1)[:, :3]
    weights = torch.zeros(rows, n_atoms).scatter_(1, which, torch.rand(rows, 3, generator=g) + 0.5)
    return weights @ atoms


def test_relu_sae_trains_and_l1_controls_sparsity():
    from saelab.training.trainer import Trainer

    x = sparse_data()
    results = {}
    for c in (0.03, 0.3):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=12, n_latents=48, k=0, allocator="relu"))
        init_sae(sae, x, seed=0)
        cfg = TrainConfig.of(allocator="relu", l1_coefficient=c, lr=3e-3, warmup_steps=5, batch_size=256)
        trainer = Trainer(sae, cfg.optim, steps=300)
        for step in range(300):
            out = trainer.step(x[(step % 8) * 256:(step % 8 + 1) * 256])
        results[c] = (out["fvu"].item(), out["l0"].item())
    (fvu_lo, l0_lo), (fvu_hi, l0_hi) = results[0.03], results[0.3]
    assert l0_hi < l0_lo  # a larger penalty buys sparsity...
    assert fvu_hi >= fvu_lo - 1e-3  # ...with reconstruction
    assert fvu_lo < 0.1 and l0_lo < 24  # it learned something, and sparsely (init fires ~half)


def test_gradient_topk_training_refuses_a_batch_without_gradient():
    from saelab.training.trainer import Trainer

    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=2, allocator="gradient_topk"))
    trainer = Trainer(sae, OptimConfig(), steps=10)
    x = torch.randn(32, 6)
    trainer.step(x, torch.randn(32, 6))  # with a gradient: a step
    with pytest.raises(SaelabError, match="gradient_topk training got no loss gradient"):
        trainer.step(x)


def test_an_import_only_kind_is_refused_clearly(monkeypatch):
    from saelab.allocators import REGISTRY

    monkeypatch.setattr(type(REGISTRY["jumprelu"]), "trainable", False)
    with pytest.raises(SaelabError, match="does not train jumprelu"):
        TrainConfig.of(allocator="jumprelu")



def test_learned_thresholds_need_steps_past_the_topk_warmup():
    with pytest.raises(SaelabError, match="topk-warmup-steps=50, but this run has 50 steps"):
        TrainConfig.of(allocator="jumprelu", tokens=50 * 256, batch_size=256)
    TrainConfig.of(allocator="jumprelu", tokens=51 * 256, batch_size=256)
    TrainConfig.of(allocator="topk", tokens=50 * 256, batch_size=256)  # no thresholds to learn

def test_relu_init_starts_at_the_requested_l0():
    torch.manual_seed(0)
    x = torch.randn(2000, 16) @ torch.randn(16, 16)
    sae = SAE(SAEConfig(d_in=16, n_latents=200, k=0, allocator="relu"))
    init_sae(sae, x, seed=0)
    assert sae.encode(x).l0.float().mean() > 60  # tied init: about half the latents fire
    init_sae(sae, x, seed=0, l0=10)
    per_latent = (sae.encode_dense(x) > 0).float().mean(0)
    torch.testing.assert_close(per_latent, torch.full((200,), 10 / 200), atol=1e-3, rtol=0)



def test_relu_transcoder_init_starts_at_the_requested_l0_like_an_sae():
    torch.manual_seed(0)
    x = torch.randn(2000, 16) @ torch.randn(16, 16) + 3.0  # off-centre: its b_enc centring matters
    y = torch.tanh(x @ torch.randn(16, 8))
    sae = SAE(SAEConfig(d_in=16, n_latents=200, k=0, allocator="relu", hook="blocks.0.ln2.hook_normalized",
                        target_hook="blocks.0.hook_mlp_out", d_out=8))
    init_sae(sae, x, seed=0, l0=10, target=y)
    per_latent = (sae.encode_dense(x) > 0).float().mean(0)
    torch.testing.assert_close(per_latent, torch.full((200,), 10 / 200), atol=1e-3, rtol=0)

def test_lr_schedule_by_hand():
    from saelab.schedule import lr_factor
    assert [lr_factor(s, 10, 2, 0.2) for s in range(10)] == [0.5] + [1.0] * 8 + [0.5]
    assert [lr_factor(s, 10, 4, 0.5) for s in range(10)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert [lr_factor(s, 4, 0, 0.0) for s in range(4)] == [1.0] * 4


def test_dead_window_scales_with_the_run_unless_given():
    assert OptimConfig().dead_window() == 200_000  # the default 4M-token run: 1/20 of it
    assert OptimConfig(tokens=10**9).dead_window() == 10_000_000  # Gao et al.'s cap
    assert OptimConfig(tokens=8192, batch_size=4096).dead_window() == 4096  # at least a batch
    assert OptimConfig(dead_tokens=123).dead_window() == 123
    assert TrainConfig.of(tokens=2_000_000).optim.dead_window() == 100_000
    with pytest.raises(SaelabError, match="dead_tokens must be >= 1"):
        OptimConfig(dead_tokens=0)


def _train_recording(cfg: OptimConfig, x: torch.Tensor, steps: int, batch: int):
    """Train a small topk SAE on x; per step, the latents its batch fired (from `encode` before
    the step: the same top-k selection training makes) and the step's losses."""
    from saelab.training.trainer import Trainer

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=x.shape[1], n_latents=96, k=2))
    init_sae(sae, x, seed=0)
    trainer = Trainer(sae, cfg, steps=steps)
    fired, outs = [], []
    for step in range(steps):
        xb = x[(step % 8) * batch:(step % 8 + 1) * batch]
        with torch.no_grad():
            idx, vals = sae.encode(xb)
        fired.append(set(idx[vals > 0].tolist()))
        outs.append(trainer.step(xb))
    return trainer, fired, outs


def test_auxk_fires_in_a_short_run_after_its_dead_window():
    """An 8k-token run: the default window (409 tokens, two batches) lets AuxK start at step 2;
    the former 10M-token default kept it off for the whole run."""
    x = sparse_data()
    steps, batch = 32, 256
    cfg = OptimConfig(tokens=steps * batch, batch_size=batch, lr=1e-2, warmup_steps=2)
    assert cfg.dead_window() == steps * batch // 20 == 409
    _, _, outs = _train_recording(cfg, x, steps, batch)
    aux = [o["aux"].item() for o in outs]
    assert aux[:2] == [0.0] * 2  # one batch (256 tokens) cannot make a latent dead
    assert sum(a > 0 for a in aux[2:]) > steps // 2 and outs[-1]["dead_frac"] > 0
    _, _, before = _train_recording(dataclasses.replace(cfg, dead_tokens=10_000_000), x, steps, batch)
    assert all(o["aux"].item() == 0 for o in before)


def test_training_time_dead_count_by_hand():
    """since_fired and `dead()` against a count kept by hand from each batch's fired latents."""
    x = sparse_data()
    steps, batch = 24, 256
    cfg = OptimConfig(tokens=steps * batch, batch_size=batch, lr=1e-2, warmup_steps=2, dead_tokens=700)
    trainer, fired, _ = _train_recording(cfg, x, steps, batch)
    since = [0] * 96
    for latents in fired:
        since = [0 if j in latents else s + batch for j, s in enumerate(since)]
    assert trainer.since_fired.tolist() == since
    dead = [s >= 700 for s in since]  # 700 tokens: 3 batches without firing
    assert trainer.dead().tolist() == dead and any(dead) and not all(dead)


def test_run_summary_reports_the_training_time_dead_count(small_cache, tmp_path):
    """The summary's dead share is the checkpoint's since_fired over the run's dead window; a
    window longer than the run reports none rather than a 0 that could not be otherwise."""
    from saelab.training import train
    from saelab.training.checkpoint import read_checkpoint

    hook = "blocks.1.hook_resid_post"
    small = dict(cache=str(small_cache), hook=hook, n_latents=256, k=4, tokens=8192, batch_size=512)
    (r,) = train(TrainConfig.of(out=str(tmp_path / "a"), **small)).values()
    since = read_checkpoint(tmp_path / "a")[0][f"{hook}/since_fired"]
    assert r.summary["train_dead_window"] == 512  # max(batch, 8192 // 20 = 409)
    assert r.summary["train_dead_frac"] == (since >= 512).float().mean().item() > 0, since
    (r,) = train(TrainConfig.of(out=str(tmp_path / "b"), dead_tokens=10_000, **small)).values()
    assert r.summary["train_dead_frac"] is None and r.summary["train_dead_window"] == 10_000
