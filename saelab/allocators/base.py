"""What every allocator shares: the `Selection` it returns, the `Allocator` interface the SAE,
the trainer and the formats ask, and the two selections several kinds reuse (per-token top-k,
per-latent thresholds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from saelab.errors import SaelabError
from saelab.kernels import topk_indices

if TYPE_CHECKING:
    from saelab.distributed import World
    from saelab.sae import SAE


@dataclass
class Selection:
    """Active latents per token.

    Fields:
        idx: (B, k_max) latent indices.
        mask: (B, k_max) bool, True on real slots; None when every slot is real.
        boundary: (n,) per-latent selection boundary of this batch (batch allocators only).
    """

    idx: torch.Tensor
    mask: torch.Tensor | None = None
    boundary: torch.Tensor | None = None


@dataclass
class Learned:
    """A training step's learned thresholds (jumprelu): theta (n,), differentiable (it carries
    the gradient to the trainer's log theta), the bandwidth of the pseudo-derivatives'
    rectangle kernel in activation units, and whether the L0's pseudo-derivative also reaches
    the pre-activations (the encoder)."""

    theta: torch.Tensor
    bandwidth: float
    ste_to_input: bool = True


def from_mask(chosen: torch.Tensor) -> Selection:
    """Pack a dense (B, n) 0/1 choice into per-token padded indices."""
    counts = chosen.sum(1)
    k_max = max(int(counts.max()), 1)
    idx = chosen.to(torch.uint8).topk(k_max, dim=1, sorted=False).indices
    return Selection(idx, chosen.gather(1, idx))


def topk(score: torch.Tensor, k: int) -> Selection:
    return Selection(topk_indices(score, k))  # exact; faster than torch.topk on CPU


def threshold(pre: torch.Tensor, theta: torch.Tensor) -> Selection:
    """Latent j is active iff pre_j > theta_j: jumprelu, and the batch allocators' inference form.
    theta = 0 everywhere is the relu allocator."""
    return from_mask(pre > theta)


class Allocator:
    """One sparsity allocator: how it selects in training and at inference, what its
    dictionaries carry, what training must give it and add to its loss, and how other tools
    save it. Subclasses set the class attributes and `select`; one instance of each is
    registered by name (`saelab.allocators.register`)."""

    name: ClassVar[str]
    budget: ClassVar[bool] = True
    """k latents active per token (on average); without one, dictionaries have k = 0."""
    batch_level: ClassVar[bool] = False
    """Selects over the batch in train() mode, by per-latent thresholds in eval() mode."""
    thresholds: ClassVar[bool] = False
    """Dictionaries carry a per-latent `threshold` buffer."""
    threshold_fill: ClassVar[float] = float("nan")
    """The threshold buffer's value before training or loading (NaN: not usable yet)."""
    needs_grad: ClassVar[bool] = False
    """Training reads the LM loss's gradient w.r.t. the activation (caches need --with-grads)."""
    trainable: ClassVar[bool] = True
    """`saelab train` trains it (else it is imported only)."""
    inference_topk: ClassVar[bool] = False
    """Encodes a token by its k largest pre-activations at inference (sparsify's TopK form)."""
    saelens_architecture: ClassVar[str]
    """The SAELens architecture it is exported as."""
    saelens_training_architecture: ClassVar[str | None] = None
    """What SAELens's metadata calls its training form, when that differs."""
    learns_thresholds: ClassVar[bool] = False
    """Training learns its per-latent thresholds (log theta, pseudo-derivatives, an L0 penalty
    whose coefficient is steered to the target L0 --k)."""
    nested: ClassVar[bool] = False
    """Takes nested prefixes of the dictionary (`--matryoshka`), each reconstructing alone."""
    step_matrices: ClassVar[float] = 2.5
    """Peak (batch, n_latents) float32 tensors of one training step beyond the weights and Adam
    state, measured (peak RSS, n = 16384, d_in = 128, batch 4096) and rounded down: the dense
    pre-activations, the AuxK pool's copy and selection temporaries."""

    def select(self, sae: SAE, pre: torch.Tensor, grad: torch.Tensor | None,
               batch: bool) -> Selection:
        """The active set of `pre` (B, n). `grad` (B, d_in): the LM-loss gradient, when
        training has one; `batch`: allocate over this batch rather than by thresholds."""
        raise NotImplementedError

    def train_code(self, sae: SAE, x: torch.Tensor, pre: torch.Tensor, grad: torch.Tensor | None,
                   learned: Learned | None) -> tuple[Selection, torch.Tensor]:
        """A training step's selection over the batch and its differentiable values (B, k_max).
        `learned`: the thresholds being trained, for the kinds that learn them."""
        sel = self.select(sae, pre, grad, batch=True)
        return sel, sae.encode_values(x, sel, pre)

    def penalty(self, sae: SAE, x: torch.Tensor, pre: torch.Tensor, sel: Selection,
                vals: torch.Tensor, world: World | None, learned: Learned | None,
                y: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sparsity penalty training adds (times its coefficient), if the kind has one; `y`
        is what is reconstructed (a transcoder's target; None: x itself)."""
        return None

    def inner_reconstructions(self, sae: SAE, sel: Selection, vals: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions by parts of the dictionary that training also fits, each's FVU added
        at weight 1 beside the full dictionary's (Matryoshka's inner prefixes)."""
        return []

    def saelens_details(self, sae: SAE) -> dict:
        """SAELens's `training_architecture_details` for an export (with a training form)."""
        return {"k": sae.cfg.k}


def by_threshold(sae: SAE, pre: torch.Tensor) -> Selection:
    """Selection by the dictionary's learned per-latent thresholds (one line if it has none yet)."""
    if torch.isnan(sae.threshold).any():
        raise SaelabError(
            f"this {sae.cfg.allocator} SAE has no inference thresholds yet; encode it in "
            "train() mode (or with batch=True), or train it first"
        )
    return threshold(pre, sae.threshold)


class BatchAllocator(Allocator):
    """An allocator over the whole batch: in eval() mode (or `batch=False`) its thresholds
    stand in, so single tokens can be encoded (module docstring of `saelab.allocators`)."""

    batch_level = True
    thresholds = True
    saelens_architecture = "jumprelu"

    def select(self, sae: SAE, pre: torch.Tensor, grad: torch.Tensor | None,
               batch: bool) -> Selection:
        return self.select_batch(sae, pre) if batch else by_threshold(sae, pre)

    def select_batch(self, sae: SAE, pre: torch.Tensor) -> Selection:
        raise NotImplementedError
