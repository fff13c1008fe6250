"""matryoshka (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK (mutual_choice's selection
and inference thresholds) over nested prefixes of the dictionary, m_1 < m_2 < ... < m_L = n.
Each prefix's latents alone reconstruct x (the selected codes of latents j < m_i, decoded with
b_dec); training minimises the sum of the prefixes' FVUs, equal weights, the full dictionary's
included (as SAELens's MatryoshkaBatchTopK sums its levels' MSEs). Early latents are pushed to
carry general features, which is what reduces feature absorption.

The widths come from `--matryoshka 128,512,2048` (`SAEConfig.matryoshka`); when the last is below
n_latents, n_latents is appended (as SAELens does). Without them: n/16, n/4, n.
"""

from __future__ import annotations

import itertools

import torch

from saelab.allocators.base import Allocator
from saelab.allocators.mutual_choice import MutualChoice
from saelab.errors import SaelabError
from saelab.kernels import sparse_decode


def parse_widths(text: str | None) -> list[int] | None:
    """`128,512,2048` as [128, 512, 2048] (one line if it is not a list of whole numbers)."""
    if text is None:
        return None
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise SaelabError(f"--matryoshka takes comma-separated prefix widths such as 128,512,2048, "
                          f"got {text!r}") from None


def check_widths(widths: list[int] | None, n_latents: int | None, kind: Allocator) -> list[int] | None:
    """The prefix widths, n_latents appended if missing (none given: n/16, n/4, n for a nested
    kind); one line when they do not fit the kind or the dictionary (`n_latents` None: not
    known yet, checked later)."""
    if widths is None:
        if not kind.nested or n_latents is None:
            return None
        return sorted({w for w in (n_latents // 16, n_latents // 4, n_latents) if w >= 1})
    if not kind.nested:
        raise SaelabError(f"--matryoshka applies to --allocator matryoshka (BatchTopK over nested "
                          f"prefixes), not {kind.name}")
    if not isinstance(widths, list) or not widths or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise SaelabError(f"matryoshka must be a list of whole prefix widths, got {widths!r}")
    if widths[0] < 1 or any(a >= b for a, b in itertools.pairwise(widths)):
        raise SaelabError(f"matryoshka prefix widths must be positive and strictly increasing, got "
                          f"{','.join(map(str, widths))}")
    if n_latents is None:
        return widths
    if widths[-1] > n_latents:
        raise SaelabError(f"matryoshka prefix {widths[-1]} is larger than the dictionary "
                          f"(n_latents={n_latents}); use widths up to {n_latents}")
    return widths if widths[-1] == n_latents else [*widths, n_latents]


def prefix_reconstructions(sae, idx: torch.Tensor, vals: torch.Tensor,
                           widths: list[int]) -> list[torch.Tensor]:
    """x_hat of each prefix m in `widths`: the selected codes of latents j < m, with b_dec."""
    return [sparse_decode(idx, vals * (idx < m), sae.W_dec, sae.b_dec) for m in widths]


class Matryoshka(MutualChoice):
    name = "matryoshka"
    nested = True
    saelens_training_architecture = "matryoshka_batchtopk"

    def inner_reconstructions(self, sae, sel, vals):
        """The inner prefixes' reconstructions (the full dictionary's is the trainer's own)."""
        return prefix_reconstructions(sae, sel.idx, vals, sae.cfg.matryoshka[:-1])

    def saelens_details(self, sae) -> dict:
        return {"k": sae.cfg.k, "matryoshka_widths": list(sae.cfg.matryoshka)}
