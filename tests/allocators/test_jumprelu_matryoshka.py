"""jumprelu training's pseudo-gradients and matryoshka's nested loss, against independent
references: finite differences of the kernel-smoothed L0 (float64), a dense float64 backward,
and a two-prefix case computed by hand."""

import pytest
import torch

from saelab import allocators
from saelab.allocators import Learned
from saelab.allocators.matryoshka import prefix_reconstructions
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig
from saelab.training import TrainConfig

EPS = 0.3


def _jumprelu(seed: int = 0) -> tuple[SAE, torch.Tensor, torch.Tensor]:
    """A float64 jumprelu SAE, a batch, and thresholds placed among its pre-activations so that
    many (token, latent) pairs fall inside the kernel's band."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=5, n_latents=7, k=0, allocator="jumprelu"), dtype=torch.float64).train()
    x = torch.randn(300, 5, dtype=torch.float64)
    theta = sae.pre_acts(x).quantile(0.7, dim=0).clamp_min(0.05)
    return sae, x, theta


def smoothed_l0(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """mean over tokens of sum_j H_eps(pre - theta), H_eps the Heaviside smoothed by the rectangle
    kernel: the integral of K(t/eps)/eps, i.e. clamp(u/eps + 1/2, 0, 1)."""
    return ((pre - theta) / EPS + 0.5).clamp(0, 1).sum() / pre.shape[0]


@pytest.mark.parametrize("to_input", [False, True])
def test_l0_pseudo_gradients_are_finite_differences_of_the_smoothed_l0(to_input):
    sae, x, theta0 = _jumprelu()
    kind = allocators.get("jumprelu")
    theta = theta0.clone().requires_grad_(True)
    learned = Learned(theta, EPS, to_input)
    pre = sae.pre_acts(x)
    sel, vals = kind.train_code(sae, x, pre, None, learned)
    penalty = kind.penalty(sae, x, pre, sel, vals, None, learned)
    assert penalty.item() == pytest.approx((pre > theta0).sum().item() / x.shape[0])  # the L0 itself
    penalty.backward()
    h = 1e-6
    for j in range(7):
        step = torch.zeros(7, dtype=torch.float64)
        step[j] = h
        fd = (smoothed_l0(pre, theta0 + step) - smoothed_l0(pre, theta0 - step)) / (2 * h)
        assert theta.grad[j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9), j
        # through the encoder: b_enc_j shifts pre_j, so d/db_enc = -d/dtheta, or 0 (DeepMind's form)
        grad_b = 0.0 if sae.b_enc.grad is None else sae.b_enc.grad[j].item()
        assert grad_b == pytest.approx(-fd.item() if to_input else 0.0, rel=1e-6, abs=1e-9), j
    assert (theta.grad != 0).sum() >= 5  # the band is populated: the check compares something


@pytest.mark.parametrize("to_input", [False, True])
def test_reconstruction_gradients_match_a_dense_float64_backward(to_input):
    """z = pre H(pre - theta): -(theta/eps) K((pre - theta)/eps) to theta (the paper's
    pseudo-derivative); to pre (so to W_enc, b_enc) H, plus (theta/eps) K straight through to the
    input in Anthropic's form; written densely here."""
    sae, x, theta0 = _jumprelu(1)
    kind = allocators.get("jumprelu")
    theta = theta0.clone().requires_grad_(True)
    pre = sae.pre_acts(x)
    sel, vals = kind.train_code(sae, x, pre, None, Learned(theta, EPS, to_input))
    target = torch.randn_like(x)
    ((sae.decode(sel.idx, vals) - target).pow(2).sum()).backward()

    W_enc = sae.W_enc.detach().clone().requires_grad_(True)
    b_enc = sae.b_enc.detach().clone().requires_grad_(True)
    dense_pre = (x - sae.b_dec.detach()) @ W_enc.T + b_enc
    active = (dense_pre > theta0).double()
    z = dense_pre * active
    g_z = 2 * ((z @ sae.W_dec.detach() + sae.b_dec.detach()) - target) @ sae.W_dec.detach().T
    kernel = (((dense_pre.detach() - theta0) / EPS).abs() < 0.5).double()
    torch.testing.assert_close(theta.grad, (g_z * -(theta0 / EPS) * kernel).sum(0))
    g_pre = g_z * (active + to_input * (theta0 / EPS) * kernel)
    (g_pre.detach() * dense_pre).sum().backward()  # that gradient to pre, through the encoder
    torch.testing.assert_close(sae.W_enc.grad, W_enc.grad)
    torch.testing.assert_close(sae.b_enc.grad, b_enc.grad)
    assert (kernel * (1 - active)).sum() > 0  # pairs just below their threshold count too


def test_matryoshka_loss_is_the_hand_computed_two_prefix_sum():
    """d = 2, n = 3, prefixes (1, 3). Token a: latents 0 (value 2) and 2 (value 1); token b:
    latent 1 (value 3). W_dec rows e1, e2, (1, 1); b_dec = 0.
      full:     x_hat_a = 2 e1 + (1, 1) = (3, 1);  x_hat_b = 3 e2 = (0, 3)
      prefix 1: x_hat_a = (2, 0);                  x_hat_b = (0, 0)
    x_a = (3, 0), x_b = (0, 2): mean (1.5, 1); sum||x - mean||^2 = 2 * (1.5^2 + 1^2) = 6.5.
      full:     ||(0, -1)||^2 + ||(0, -1)||^2 = 2      -> FVU 2 / 6.5
      prefix 1: ||(1, 0)||^2 + ||(0, 2)||^2 = 5        -> FVU 5 / 6.5
    loss = 7 / 6.5."""
    from saelab.training.losses import fvu

    sae = SAE(SAEConfig(d_in=2, n_latents=3, k=1, allocator="matryoshka", matryoshka=[1, 3]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.zero_()
    idx = torch.tensor([[0, 2], [1, 1]])
    vals = torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    (inner,) = allocators.get("matryoshka").inner_reconstructions(sae, allocators.Selection(idx), vals)
    torch.testing.assert_close(inner, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    total = fvu(x, sae.decode(idx, vals)) + fvu(x, inner)
    assert total.item() == pytest.approx(7 / 6.5)
    assert [t.tolist() for t in prefix_reconstructions(sae, idx, vals, [3])] == [[[3.0, 1.0], [0.0, 3.0]]]


def test_matryoshka_widths_get_the_full_dictionary_appended_and_a_default():
    given = SAEConfig(d_in=4, n_latents=64, k=2, allocator="matryoshka", matryoshka=[8, 32])
    assert given.matryoshka == [8, 32, 64]
    assert SAEConfig(d_in=4, n_latents=64, k=2, allocator="matryoshka").matryoshka == [4, 16, 64]
    assert SAEConfig(d_in=4, n_latents=64, k=2, allocator="mutual_choice").matryoshka is None


@pytest.mark.parametrize(("values", "message"), [
    ({"matryoshka": "512,128"}, "strictly increasing, got 512,128"),
    ({"matryoshka": "128,128"}, "strictly increasing"),
    ({"matryoshka": "0,128"}, "positive"),
    ({"matryoshka": "128,4096"}, r"prefix 4096 is larger than the dictionary \(n_latents=2048\)"),
    ({"matryoshka": "128,x"}, "comma-separated prefix widths such as 128,512,2048, got '128,x'"),
    ({"matryoshka": "128,512", "allocator": "mutual_choice"}, "applies to --allocator matryoshka"),
    ({"matryoshka": "128,512", "allocator": "topk"}, "not topk"),
])
def test_bad_prefixes_are_one_line_errors_before_work(values, message):
    with pytest.raises(SaelabError, match=message) as e:
        TrainConfig.of(**{"allocator": "matryoshka", "n_latents": 2048, **values})
    assert "\n" not in str(e.value)


def test_prefix_larger_than_an_expansion_sized_dictionary_is_refused_once_d_in_is_known():
    cfg = TrainConfig.of(allocator="matryoshka", expansion=4, matryoshka="128,1024")
    with pytest.raises(SaelabError, match=r"prefix 1024 is larger than the dictionary \(n_latents=512\)"):
        cfg.check_latents(128)
