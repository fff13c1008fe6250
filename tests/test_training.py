import math

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.training import TrainConfig
from saelab.training.init import geometric_median, init_sae
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
    assert TrainConfig().learning_rate(2**14) == pytest.approx(2e-4)
    assert TrainConfig().learning_rate(2**16) == pytest.approx(1e-4)
    with pytest.raises(SaelabError, match="k=64 is larger"):
        TrainConfig(n_latents=32, k=64)
    f = tmp_path / "c.yaml"
    f.write_text("k: 8\ntokens: 10000\n")
    cfg = TrainConfig.from_file_and_flags(str(f), {"k": 16, "hook": None})
    assert cfg.k == 16 and cfg.tokens == 10000
    f.write_text("lr: 2e-4\ntokens: 1e6\n")  # YAML 1.1 reads these as strings
    cfg = TrainConfig.from_file_and_flags(str(f), {})
    assert cfg.lr == 2e-4 and cfg.tokens == 1_000_000 and isinstance(cfg.tokens, int)
    f.write_text("tokens: many\n")
    with pytest.raises(SaelabError, match="config field tokens must be a number"):
        TrainConfig.from_file_and_flags(str(f), {})
    f.write_text("kk: 8\n")
    with pytest.raises(SaelabError, match=r"unknown training config field\(s\) \['kk'\]"):
        TrainConfig.from_file_and_flags(str(f), {})
