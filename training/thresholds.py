"""Learned thresholds (jumprelu): log theta as the trained parameter, the kernel's bandwidth, and
the controller that steers the L0 penalty's coefficient lambda to the target L0.

- warmup: the first `topk_warmup_steps` steps train as TopK with k = the target L0 (thresholds
  unused), so encoder and decoder leave their random start first. Started at once, the random
  init's reconstruction overshoots (FVU > 1), every active latent is pushed down, and most fell
  below their thresholds for good within 20 steps (measured: L0 16 -> 3, 65% dead).
- theta = exp(log theta) (Rajamanoharan et al. 2024's parameterisation; positive by
  construction). When the warmup ends it is set from that step's batch: each latent's threshold
  is the value it exceeds on a share k/n of the tokens, so L0 starts at the target (at least
  1e-3 x the batch's RMS). The paper starts at 0.001 on normalised inputs; Adam moves log theta
  by about lr per step, so from there a short run barely moves it (SAELens issue #494).
- bandwidth eps = `jumprelu_bandwidth` x that batch's RMS distance to its mean per dimension,
  the scale pre-activations of unit-norm encoder rows have; fixed for the run.
- lambda: starts at `l0_coefficient` or, by default, balanced on the first thresholded batch:
  the value whose L0 pull on the thresholds best cancels the reconstruction's (least squares over
  the latents of the two gradients w.r.t. theta: -<g_rec, g_L0> / ||g_L0||^2), since a fixed start
  was 20x off between dictionary sizes (measured: balance ~1e-3 at n = 1024, k = 16; ~2e-2 at
  n = 256, k = 8). Then after each step, with the global batch's L0,
  lambda <- lambda * exp(rate * clip(L0 / k - 1, -1, 1)) (an integral controller on log lambda),
  rate = `l0_controller` (0: lambda fixed).
"""

from __future__ import annotations

import math

import torch

from saelab.allocators import Learned
from saelab.distributed import World
from saelab.penalty import centred_energy
from saelab.sae import SAE
from saelab.training.config import OptimConfig


class LearnedThresholds(torch.nn.Module):
    """The trainer's log theta (a parameter beside the SAE's) and lambda; the SAE's `threshold`
    buffer mirrors exp(log theta) after every step, so saving and inference see it."""

    def __init__(self, sae: SAE, cfg: OptimConfig, target_l0: int):
        super().__init__()
        self.log_threshold = torch.nn.Parameter(sae.threshold.detach().clamp_min(1e-30).log().clone())
        self.relative_bandwidth, self.rate, self.target = cfg.jumprelu_bandwidth, cfg.l0_controller, target_l0
        self.ste_to_input = cfg.jumprelu_ste_to_input
        self.bandwidth = 0.0
        self.coefficient: float | None = cfg.l0_coefficient

    @torch.no_grad()
    def start(self, sae: SAE, x: torch.Tensor, pre: torch.Tensor, world: World) -> None:
        """When thresholds take over (after the topk warmup): theta_j = the value latent j
        exceeds on a share target/n of this batch, so L0 starts at the target; the bandwidth
        from this batch's spread. Rank 0's values, for every rank."""
        rows, n = pre.shape
        above = min(rows - 1, max(1, round(rows * self.target / n)))
        theta = pre.kthvalue(rows - above, dim=0).values
        floor = 1e-3 * sae.encoder_input(x).pow(2).mean().sqrt()
        self.log_threshold.copy_(torch.maximum(theta, floor).log())
        world.broadcast_(self.log_threshold.data)
        sae.threshold.copy_(self.log_threshold.exp())
        energy, count = centred_energy(x, world)
        self.bandwidth = self.relative_bandwidth * math.sqrt(energy.item() / (count.item() * x.shape[1]))

    def balance(self, main: torch.Tensor, penalty: torch.Tensor, theta: torch.Tensor,
                world: World) -> None:
        """Set lambda to cancel the reconstruction's pull on theta (module docstring); kept
        unset (tried again next step) when the two do not oppose."""
        g_rec, = torch.autograd.grad(main, theta, retain_graph=True)
        g_l0, = torch.autograd.grad(penalty, theta, retain_graph=True)
        lam = world.all_reduce_(-(g_rec * g_l0).sum() / g_l0.pow(2).sum().clamp_min(1e-30), mean=True)
        if lam.item() > 0:
            self.coefficient = lam.item()

    def learned(self) -> Learned:
        return Learned(self.log_threshold.exp(), self.bandwidth, self.ste_to_input)

    @torch.no_grad()
    def after_step(self, sae: SAE, l0: float) -> None:
        """Mirror theta into the SAE; move lambda towards the target L0."""
        sae.threshold.copy_(self.log_threshold.exp())
        if self.coefficient is not None:
            self.coefficient *= math.exp(self.rate * min(1.0, max(-1.0, l0 / self.target - 1)))

    def extra(self) -> dict:
        """The JSON-able state a checkpoint keeps (log theta goes with the tensors)."""
        return {"bandwidth": self.bandwidth, "l0_coefficient": self.coefficient}

    def load_extra(self, extra: dict) -> None:
        self.bandwidth, self.coefficient = extra["bandwidth"], extra["l0_coefficient"]
