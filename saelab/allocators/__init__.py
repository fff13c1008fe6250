"""Sparsity allocators: which (token, latent) pairs of the B x n affinity matrix are active.

Every allocator chooses a 0/1 mask S over the pre-activations `pre` (B, n) under a budget;
the SAE keeps relu(pre) on S. The result is a `Selection`: per-token indices padded to the
largest count in the batch, a mask of the real slots, and (for the batch-level allocators) each
latent's selection boundary, from which inference thresholds are estimated.

Each allocator is one `Allocator` object, in a module of its own here (its selection in
training and at inference, its thresholds, what training must give it, its loss terms, how
SAELens saves it), registered by name in `_KINDS` below. Code elsewhere asks the object
(`get(cfg.allocator).needs_grad`) and never compares allocator names, so adding a kind is one
new module plus its line in `_KINDS`:

- topk, gradient_topk: per-token top-k (Gao et al. 2024; g-SAE).
- feature_choice, mutual_choice: over the batch (Ayonrinde 2024; mutual_choice = BatchTopK).
- relu: every positive pre-activation, trained with an L1 penalty (SAELens's "standard").
- jumprelu: per-latent thresholds (Gemma Scope), trained with an L0 penalty and
  pseudo-derivatives (Rajamanoharan et al. 2024).
- matryoshka: BatchTopK over nested prefixes of the dictionary (Bussmann et al. 2025).

Batch-level allocators depend on the batch, so a single token cannot be encoded with them. For
inference they become a per-latent threshold (JumpReLU form: active iff pre > theta_j). theta_j
is latent j's selection boundary, the rule the batch itself applied (each kind's module says
which), averaged by the trainer over 16 training batches after the last step, with the final
weights.
"""

from __future__ import annotations

from saelab.allocators.base import Allocator, BatchAllocator, Learned, Selection
from saelab.allocators.feature_choice import CAPACITIES, FeatureChoice
from saelab.allocators.gradient_topk import GRAD_SCORES, GradientTopK
from saelab.allocators.jumprelu import JumpReLU
from saelab.allocators.matryoshka import Matryoshka, check_widths, parse_widths
from saelab.allocators.mutual_choice import MutualChoice
from saelab.allocators.relu import ReLU
from saelab.allocators.topk import TopK
from saelab.errors import SaelabError

_KINDS: tuple[Allocator, ...] = (TopK(), GradientTopK(), FeatureChoice(), MutualChoice(), ReLU(),
                                 JumpReLU(), Matryoshka())
REGISTRY: dict[str, Allocator] = {kind.name: kind for kind in _KINDS}
ALLOCATORS = tuple(REGISTRY)


def get(name: str) -> Allocator:
    """The registered allocator called `name`, or a one-line error listing them."""
    kind = REGISTRY.get(name) if isinstance(name, str) else None
    if kind is None:
        raise SaelabError(f"unknown allocator {name!r}; available: {', '.join(REGISTRY)}")
    return kind


def check_settings(allocator: str, capacity: str, grad_score: str) -> None:
    """A config's allocator and its kinds' settings are known values (one line if not)."""
    get(allocator)
    if capacity not in CAPACITIES:
        raise SaelabError(f"unknown capacity {capacity!r}; use {' or '.join(CAPACITIES)}")
    if grad_score not in GRAD_SCORES:
        raise SaelabError(f"unknown grad_score {grad_score!r}; use {' or '.join(GRAD_SCORES)}")


def trainable() -> tuple[str, ...]:
    """Names of the allocators `saelab train` trains."""
    return tuple(name for name, kind in REGISTRY.items() if kind.trainable)


__all__ = ["ALLOCATORS", "CAPACITIES", "GRAD_SCORES", "REGISTRY", "Allocator", "BatchAllocator",
           "Learned", "Selection", "check_settings", "check_widths", "get", "parse_widths", "trainable"]
