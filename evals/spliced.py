"""Spliced next-token loss: how much of the model's behaviour survives the SAE's reconstruction.

Logits at position t predict token t+1. A prediction is counted when neither token t nor token
t+1 is BOS or pad (`saelab.data.activations.positions_to_keep`): the input position is one where the SAE
is spliced in, and the target is a real token. Every variant (clean, SAE, zero and mean
ablation) is averaged over exactly the same predictions:

    delta_loss        = CE_sae - CE_clean
    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)    1 = perfect, 0 = as bad as zero
    kl_X              = mean over predictions of KL(p_clean || p_X), nats
    kl_div_score      = (kl_zero - kl_sae) / kl_zero                 (SAEBench's normalisation)
"""

from __future__ import annotations

from collections import defaultdict

import torch

VARIANTS = ("clean", "sae", "zero", "mean")


def prediction_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, T-1) mask of counted predictions, from the (B, T) mask of non-BOS/pad positions."""
    return keep[:, :-1] & keep[:, 1:]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den != 0 else None


class SplicedLoss:
    """Float64 sums of next-token CE and KL(clean || variant) per variant (see module doc)."""

    def __init__(self) -> None:
        self.ce: dict[str, float] = defaultdict(float)
        self.kl: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def add(
        self,
        variant: str,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add one batch of `variant`'s logits (B, T, V); returns its counted log-probs (P, V).

        `clean`: the clean run's log-probs for this batch, to also accumulate KL(clean || variant).
        """
        logp = logits[:, :-1][mask].float().log_softmax(-1)
        targets = tokens[:, 1:][mask]
        self.ce[variant] -= logp.gather(1, targets[:, None]).double().sum().item()
        self.count[variant] += targets.numel()
        if clean is not None:
            self.kl[variant] += (clean.exp() * (clean - logp)).sum(-1).double().sum().item()
        return logp

    def result(self) -> dict:
        ce = {v: self.ce[v] / self.count[v] for v in VARIANTS}
        kl = {v: self.kl[v] / self.count[v] for v in ("sae", "zero")}
        return {
            "predicted_positions": self.count["clean"],
            **{f"ce_{v}": ce[v] for v in VARIANTS},
            "delta_loss": ce["sae"] - ce["clean"],
            "ce_loss_recovered": _ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
            "kl_sae": kl["sae"],
            "kl_zero": kl["zero"],
            "kl_div_score": _ratio(kl["zero"] - kl["sae"], kl["zero"]),
        }
