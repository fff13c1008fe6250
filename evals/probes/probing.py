"""Sparse probing as SAEBench defines it, per binary label, on held-out positions.

For each label: balanced train and test position sets (test positions come from other files
than train ones, so a probe cannot pass by memorising a file); the top-k latents by |mean
activation difference| between the classes on the train set; a logistic probe (`logistic.fit`)
on those k latents; held-out accuracy and F1 for each k. Beside it, the ceiling (a probe on the
model's full activation at the hook) and the floor (a probe on k latents drawn at random from
those active on the train set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.evals.probes.logistic import Probe, accuracy_f1, fit

KS = (1, 2, 5, 20)


@dataclass(frozen=True)
class Features:
    """What the probes see at N positions.

    Fields:
        x: (N, d) the model's activation at the hook (the ceiling's input).
        idx, vals: (N, k) the SAE's sparse code (latent ids and values).
        n_latents: dictionary width.
        test: (N,) bool, True on held-out positions (whole files held out).
    """

    x: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor
    n_latents: int
    test: torch.Tensor

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), n_latents) latent activations of `rows`."""
        out = torch.zeros(len(rows), self.n_latents)
        return out.scatter_add_(1, self.idx[rows], self.vals[rows].float())


@dataclass(frozen=True)
class Split:
    """A label's balanced position sets: train rows and targets, test rows and targets."""

    train: torch.Tensor
    y_train: torch.Tensor
    test: torch.Tensor
    y_test: torch.Tensor


def balanced(y: torch.Tensor, scope: torch.Tensor, test: torch.Tensor, max_train: int, max_test: int,
             min_per_class: int, gen: torch.Generator) -> Split | None:
    """Equal positives and negatives from the label's scope, at most `max_*` per class; None
    when a class has fewer than `min_per_class` positions on either side."""
    parts = []
    for side, cap in ((~test & scope, max_train), (test & scope, max_test)):
        pos, neg = (torch.nonzero(side & y).flatten(), torch.nonzero(side & ~y).flatten())
        n = min(len(pos), len(neg), cap)
        if n < min_per_class:
            return None
        pick = [c[torch.randperm(len(c), generator=gen)[:n]] for c in (pos, neg)]
        rows = torch.cat(pick)
        parts += [rows, y[rows]]
    return Split(*parts)


def top_latents(z: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The k latents with the largest |mean(z | y) - mean(z | not y)|."""
    diff = z[y].mean(0) - z[~y].mean(0)
    return diff.abs().topk(k).indices


def score(x_train: torch.Tensor, split: Split, x_test: torch.Tensor) -> tuple[Probe, dict]:
    """Fit on the train rows, report held-out accuracy and F1."""
    probe = fit(x_train, split.y_train)
    acc, f1 = accuracy_f1(probe.scores(x_test), split.y_test)
    return probe, {"accuracy": acc, "f1": f1}


@dataclass(frozen=True)
class LabelProbes:
    """One label's probing result: the ceiling probe (reused by absorption), the latents ranked
    by mean difference, and the report row."""

    ceiling: Probe
    ranked: torch.Tensor
    row: dict


def probe_label(feats: Features, split: Split, ks: tuple[int, ...], alive: torch.Tensor,
                gen: torch.Generator) -> LabelProbes:
    """Ceiling, k-sparse and floor probes for one label's split."""
    ceiling, ceil_row = score(feats.x[split.train], split, feats.x[split.test])
    z_train, z_test = feats.dense(split.train), feats.dense(split.test)
    ranked = top_latents(z_train, split.y_train, min(max(ks), feats.n_latents))
    sparse, floor = {}, {}  # keyed by str(k), as they read back from JSON
    for k in ks:
        k = min(k, feats.n_latents)
        top = ranked[:k]
        sparse[str(k)] = score(z_train[:, top], split, z_test[:, top])[1]
        rand = alive[torch.randperm(len(alive), generator=gen)[:k]]
        floor[str(k)] = score(z_train[:, rand], split, z_test[:, rand])[1]
    row = {"train": len(split.train), "test": len(split.test), "ceiling": ceil_row,
           "sparse": sparse, "floor": floor, "top_latents": ranked[: max(ks)].tolist()}
    return LabelProbes(ceiling, ranked, row)


def alive_latents(feats: Features) -> torch.Tensor:
    """Latents active (value > 0) on at least one train position: the floor draws from these,
    so it measures random live latents, not the dead ones."""
    rows = ~feats.test
    hit = torch.zeros(feats.n_latents, dtype=torch.bool)
    hit[feats.idx[rows][feats.vals[rows] > 0]] = True
    return torch.nonzero(hit).flatten()


def latent_label_f1(feats: Features, y: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """(n_latents, labels) F1 of "latent active" as a predictor of each label over the
    positions `where` (default: all): 2 TP / (active count + label count)."""
    where = torch.ones(len(y), dtype=torch.bool) if where is None else where
    yf = (y & where[:, None]).float()
    tp = torch.zeros(feats.n_latents, y.shape[1])
    active = torch.zeros(feats.n_latents)
    for s in range(feats.idx.shape[1]):
        on = ((feats.vals[:, s] > 0) & where).float()
        tp.index_add_(0, feats.idx[:, s], yf * on[:, None])
        active.index_add_(0, feats.idx[:, s], on)
    denom = active[:, None] + yf.sum(0)[None, :]
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros(()))
