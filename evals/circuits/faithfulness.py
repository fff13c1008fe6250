"""Faithfulness of circuits made of a method's top nodes (MIB's CPR and CMD; Marks et al.).

A circuit of size k keeps the k nodes with the largest |score| (ties broken by node order); the
other nodes are patched from the counterfactual run (or set to their mean), the kept ones
compute from whatever reaches them. With m the mean task metric over the prompts,

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty)),

so f(full) = 1 and f(empty) = 0 by construction (full: nothing patched, the clean run; empty:
every node patched). Completeness runs the complement: C patched, the rest kept; f(M \\ C)
near 0 means C holds all the model uses. Sizes: the fractions `FRACTIONS` of the node count
(k = ceil(s N)) and the absolute counts `COUNTS` below N, plus 0 and N. CPR is the trapezoid
area under f against k / N on [0, 1] (higher is better), CMD the area under |1 - f| (lower is
better); `nodes_to_08` is the smallest evaluated k with f >= 0.8.

Error nodes of a dictionary basis are nodes like any other: ranked by their score, kept or
patched (Marks et al. let them be pruned the same way); reports count how many a circuit holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import TaskTokens

from .attribution import Sources, patch_mask
from .bases import Basis
from .patching import _Runner, check_tokens

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
COUNTS = (1, 2, 3, 5, 10, 20, 50)
TARGET = 0.8


def sizes(n: int) -> list[int]:
    """Circuit sizes evaluated for n nodes (see the module docstring)."""
    ks = {0, n, *(math.ceil(s * n) for s in FRACTIONS), *(c for c in COUNTS if c < n)}
    return sorted(ks)


def trapezoid(x: list[float], y: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def order(scores: torch.Tensor) -> torch.Tensor:
    """Node indices by decreasing |score|, ties in node order; NaN scores last."""
    mag = torch.nan_to_num(scores.double().abs(), nan=-1.0)
    return torch.sort(-mag, stable=True).indices


def faithfulness(model: HookedModel, tokens: TaskTokens, basis: Basis, scores: torch.Tensor,
                 ablation: str = "counterfactual", metric: str = "logit-diff",
                 completeness: bool = True, progress: bool = True) -> dict:
    """f, and with `completeness` f of the complement, at every size; CPR, CMD, nodes_to_08."""
    check_tokens(tokens, ablation)
    run = _Runner(model, tokens, metric)
    src = Sources(run, basis, ablation)
    n, ranked = len(basis), order(scores)
    full = src.m_clean.mean().item()
    everything = torch.ones(n, dtype=torch.bool)
    empty = run.run(tokens.pos, patch_mask(basis, src.source, everything)).mean().item()
    span = full - empty
    if abs(span) < 1e-6:
        raise SaelabError(f"patching every node of basis {basis.name} leaves the task metric at "
                          f"{full:.4f}; the basis does not carry the task, so faithfulness is undefined")

    def f_of(patched: torch.Tensor) -> float:
        """f of one circuit, from its own pass (the two ends too: they check the patching)."""
        return (run.run(tokens.pos, patch_mask(basis, src.source, patched)).mean().item() - empty) / span

    out = curve(n, ranked, f_of, completeness, "nodes", f"faithfulness {basis.name}", progress)
    return {"nodes": n, **out,
            "error_nodes_kept": [int(basis.errors[ranked[:k]].sum()) for k in out["sizes"]],
            "m_full": round(full, 5), "m_empty": round(empty, 5), "ablation": ablation,
            "metric": metric, "prompts": len(tokens), "forward_passes": run.passes}


def curve(n: int, ranked: torch.Tensor, f_of: Callable[[torch.Tensor], float], completeness: bool,
          unit: str, desc: str, progress: bool) -> dict:
    """f of the top-k circuit of `n` units ranked by `ranked` at every size (`f_of(patched)`: f
    with the units where the (n,) mask is True patched), with `completeness` f of its
    complement; CPR, CMD and the smallest k with f >= 0.8 (`{unit}_to_08`). Node and edge
    circuits share it."""
    ks, f, comp = sizes(n), [], []
    for k in tqdm(ks, desc=desc, disable=not progress):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[ranked[:k]] = True
        f.append(f_of(~keep))
        if completeness:
            comp.append(f_of(keep))
    x = [k / n for k in ks]
    reached = [k for k, v in zip(ks, f, strict=True) if v >= TARGET]
    return {
        "sizes": ks, "fractions": [round(v, 6) for v in x],
        "faithfulness": [round(v, 5) for v in f],
        "completeness": [round(v, 5) for v in comp] if completeness else None,
        "cpr": round(trapezoid(x, f), 5), "cmd": round(trapezoid(x, [abs(1 - v) for v in f]), 5),
        f"{unit}_to_08": reached[0] if reached else None,
        "fraction_to_08": round(reached[0] / n, 6) if reached else None,
    }
