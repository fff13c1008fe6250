"""jumprelu (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope): latent j is active iff
pre_j > theta_j, with per-latent thresholds stored in the dictionary; imported, and trained.

Training (`saelab.training.thresholds` holds log theta and steers lambda):

    z_j  = pre_j H(pre_j - theta_j)
    loss = FVU + lambda * mean over tokens of sum_j H(pre_j - theta_j)      (the L0)

H has no useful gradient, so the backward uses the paper's pseudo-derivatives with the
rectangle kernel K(u) = 1 for |u| < 1/2, bandwidth eps:

    dz_j/dpre_j = H(pre_j - theta_j)      dz_j/dtheta_j = -(theta_j / eps) K((pre_j - theta_j) / eps)
    dH/dpre_j   = 0                       dH/dtheta_j   = -(1 / eps) K((pre_j - theta_j) / eps)

That is DeepMind's form (the paper; SAELens's jumprelu_ste_to_input False): the kernel terms
reach the thresholds only. The default (`--jumprelu-ste-to-input`; Anthropic's form, SAELens's
True) also passes them to the pre-activations with the opposite sign (z and H depend on pre
through pre - theta: dz_j/dpre_j = H + (theta_j / eps) K, dH/dpre_j = (1 / eps) K), so the L0
penalty pushes the encoder too: in saelab's short runs DeepMind's form could not hold L0 at the
target (Adam moves log theta by about lr per step while the encoder drifts faster; L0 rose
16 -> 46 in 240 steps while lambda rose 500x: README, "JumpReLU and Matryoshka").

Only pairs with pre > theta - eps/2 have a value or a kernel term, so a step works on that band
(the active latents and those just below their thresholds), never on a dense (B, n) gradient.
"""

from __future__ import annotations

import torch

from saelab.allocators.base import Allocator, Learned, Selection, by_threshold, from_mask
from saelab.kernels import sparse_encode


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 for |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """pre * H(pre - theta), with the pseudo-derivative for theta (module docstring)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float,
                to_input: bool) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        jump = (theta / eps) * rectangle((pre - theta) / eps) * grad
        d_pre = grad * (pre > theta)
        return (d_pre + jump if ctx.to_input else d_pre), -jump, None, None


class StepFn(torch.autograd.Function):
    """H(pre - theta): no gradient to pre, the pseudo-derivative to theta (module docstring)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float,
                to_input: bool) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        d_pre = rectangle((pre - theta) / eps) / eps * grad
        return (d_pre if ctx.to_input else None), -d_pre, None, None


class JumpReLU(Allocator):
    name = "jumprelu"
    budget = False
    thresholds = True
    threshold_fill = 0.0  # a relu SAE until thresholds are trained or loaded
    learns_thresholds = True
    saelens_architecture = "jumprelu"

    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, batch: bool) -> Selection:
        return by_threshold(sae, pre)

    def train_code(self, sae, x, pre, grad, learned: Learned | None) -> tuple[Selection, torch.Tensor]:
        assert learned is not None, "the trainer passes the thresholds it learns"
        sel = from_mask(pre > learned.theta.detach() - learned.bandwidth / 2)
        pre_vals = sparse_encode(sae.encoder_input(x), sae.W_enc, sae.b_enc, sel.idx, pre)
        vals = JumpReLUFn.apply(pre_vals, learned.theta[sel.idx], learned.bandwidth, learned.ste_to_input)
        return sel, vals if sel.mask is None else vals * sel.mask

    def penalty(self, sae, x, pre, sel, vals, world, learned, y=None):
        """The L0, mean over tokens of the active count, with the Heaviside's pseudo-derivative."""
        assert learned is not None, "the trainer passes the thresholds it learns"
        pre_vals = (sparse_encode(sae.encoder_input(x), sae.W_enc, sae.b_enc, sel.idx, pre)
                    if learned.ste_to_input else pre.gather(1, sel.idx))
        step = StepFn.apply(pre_vals, learned.theta[sel.idx], learned.bandwidth, learned.ste_to_input)
        return (step if sel.mask is None else step * sel.mask).sum() / x.shape[0]
