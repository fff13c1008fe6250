"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), as SAEBench computes it, on
the first-letter labels.

Per letter: the ceiling probe on the model's activation is the reference direction p. The
letter's main latents come from k-sparse probing: k grows from 1 while one more latent raises
held-out F1 by more than `SPLIT_F1_JUMP` (more than one main latent is a feature split). On the
held-out positions of the letter where the probe is right (score > 0), a position is fully
absorbed when every main latent is silent, the latent with the largest projection on p
(activation * cos(W_dec row, p)) has cos >= `MIN_COS`, the activation's own projection x . p is
positive, and that latent's projection is at least `MIN_SHARE` of it. The rate is absorbed
positions / probe true positives; letters whose probe F1 is at most `MIN_PROBE_F1` are left out.
"""

from __future__ import annotations

import torch

from saelab.evals.probes.probing import Features, LabelProbes, Split, score

SPLIT_F1_JUMP = 0.03
MAX_SPLIT = 10
MIN_COS = 0.025
MIN_SHARE = 0.4
MIN_PROBE_F1 = 0.6
EPS = 1e-8


def main_latents(feats: Features, split: Split, ranked: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The letter's main latents (a prefix of `ranked`) and the held-out F1 at each k tried."""
    z_train, z_test = feats.dense(split.train), feats.dense(split.test)
    f1s: list[float] = []
    for k in range(1, min(MAX_SPLIT, len(ranked)) + 1):
        top = ranked[:k]
        f1s.append(score(z_train[:, top], split, z_test[:, top])[1]["f1"])
        if k > 1 and f1s[-1] - f1s[-2] <= SPLIT_F1_JUMP:
            return ranked[: k - 1], f1s
    return ranked[: len(f1s)], f1s


def absorbed(feats: Features, rows: torch.Tensor, direction: torch.Tensor, main: torch.Tensor,
             w_dec: torch.Tensor) -> torch.Tensor:
    """(len(rows),) bool: full absorption at each row (module docstring)."""
    p = direction / direction.norm()
    cos = torch.nn.functional.cosine_similarity(w_dec.float(), p[None, :], dim=1)
    z = feats.dense(rows)
    proj = z * cos[None, :]
    top_proj, top = proj.max(1)
    total = feats.x[rows].float() @ p
    silent = (z[:, main] < EPS).all(1)
    return silent & (cos[top] >= MIN_COS) & (total > 0) & (top_proj >= MIN_SHARE * total)


def letter_absorption(feats: Features, y: torch.Tensor, split: Split, probes: LabelProbes,
                      w_dec: torch.Tensor) -> dict:
    """One letter's report row: probe F1, main latents, split or not, absorption rate."""
    main, f1s = main_latents(feats, split, probes.ranked)
    rows = torch.nonzero(feats.test & y).flatten()
    hits = rows[probes.ceiling.scores(feats.x[rows]) > 0]
    absorbed_n = int(absorbed(feats, hits, probes.ceiling.weight, main, w_dec).sum()) if len(hits) else 0
    probe_f1 = probes.row["ceiling"]["f1"]
    return {"probe_f1": probe_f1, "included": probe_f1 > MIN_PROBE_F1, "main_latents": main.tolist(),
            "split": len(main) > 1, "f1_by_k": f1s, "probe_true_positives": len(hits),
            "absorbed": absorbed_n, "rate": absorbed_n / len(hits) if len(hits) else 0.0}


def summary(letters: dict[str, dict]) -> dict:
    """Mean rate over included letters, and how many letters split."""
    used = {c: r for c, r in letters.items() if r["included"]}
    rates = [r["rate"] for r in used.values()]
    return {"letters_probed": len(letters), "letters_included": len(used),
            "mean_rate": sum(rates) / len(rates) if rates else None,
            "split_letters": sum(r["split"] for r in used.values())}
