"""The one learning-rate schedule saelab trains with (SAEs and zoo models alike): linear warmup,
constant, then linear decay to 0 over the final fraction of steps (warmup-stable-decay). A
constant phase lets a run be extended or cut without retuning; the decay gives the final
improvement a cosine would, at the end only."""

from __future__ import annotations


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier of the peak learning rate at 0-based `step` of `steps`."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    decay_start = int(steps * (1 - decay_fraction))
    if step < decay_start or decay_fraction == 0:
        return warm
    return warm * max(0.0, (steps - step) / max(1, steps - decay_start))
