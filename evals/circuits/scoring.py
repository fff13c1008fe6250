"""Scores from discrete codes, and how well scores recover a ground truth.

Codes: one integer per (prompt, head), the argmax latent of the shared SAE.
- Node score of a head: the number of distinct codes it takes on positive prompts and never on
  negative (counterfactual) ones; reported as a softmax over heads (O'Neill & Bui), which has
  the same ranking and so the same ROC AUC.
- Edge score of (sender, receiver), sender in an earlier layer: the number of distinct code
  pairs (sender's code, receiver's code) on the same prompt that occur on positives and never
  on negatives. Edges are scored and judged as edges, against edge ground truth.
- `change` (node): how far a head's code moves between each prompt and its counterfactual: the
  norm of the change of what its code writes (`codes.code_vectors`), summed over the positions
  kept, averaged over prompts. Gradient-free; it cannot tell a change that matters to the
  metric from one that does not.
- `relevance` (node): the same change dotted with the task metric's gradient with respect to
  the head's output on the prompt (`codes.head_gradients`), summed over positions, its
  absolute value averaged over prompts: the first-order change of the metric the code change
  would cause. One backward pass a prompt; the weighting is attribution patching's
  (REFERENCES.md), applied to the change of the SAE code rather than of the raw output.
- `routed` (edge, with relevance, the default): the sender's code vector change dotted with
  the receiver's input gradient (`codes.head_gradients`: the metric's gradient at the
  receiver's output taken back through the receiver's attention layer to its residual input),
  summed over positions, its absolute value averaged over prompts: the first-order change of
  the metric when the sender's change reaches the receiver alone, which is what path patching
  measures exactly (`patching`). A product of node scores cannot tell which of a circuit
  head's senders it reads; this can.
- `product` (edge, with change or relevance): sender's node score times receiver's.
- Predicted circuit (for precision / recall / F1): items whose count is above the mean count,
  i.e. more than an equal share, the same rule the patching ground truth uses for effects.
- ROC AUC: the Mann-Whitney statistic, P(score of a true item > score of a false item), ties
  counting one half; NaN when the truth has only one class.
"""

from __future__ import annotations

import math

import torch


def unique_counts(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(N,) for codes (P, N) / (Q, N): distinct values per column seen in pos, never in neg."""
    out = torch.zeros(pos.shape[1])
    for j in range(pos.shape[1]):
        seen = torch.unique(pos[:, j])
        out[j] = (~torch.isin(seen, neg[:, j])).sum()
    return out


def node_counts(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(N,) per-head count of codes unique to positives."""
    return unique_counts(pos, neg)


def edge_counts(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor,
                n_codes: int) -> torch.Tensor:
    """(N, N) per-edge count of code pairs unique to positives; NaN off `mask`."""
    s, r = mask.nonzero(as_tuple=True)
    pair_pos = pos[:, s].long() * n_codes + pos[:, r].long()  # (P, E) one integer per code pair
    pair_neg = neg[:, s].long() * n_codes + neg[:, r].long()
    out = torch.full(mask.shape, float("nan"))
    out[s, r] = unique_counts(pair_pos, pair_neg)
    return out


SCORES = ("unique", "change", "relevance")
EDGE_SCORES = ("routed", "product")


def _per_prompt(values: torch.Tensor) -> torch.Tensor:
    """(P, N) from (P, N) or (P, T, N): summed over positions."""
    return values.sum(1) if values.dim() == 3 else values


def code_change(vec_pos: torch.Tensor, vec_cf: torch.Tensor) -> torch.Tensor:
    """(N,) mean over prompts of |code vector change|, summed over positions; inputs (P, [T,] N, d)."""
    return _per_prompt((vec_pos - vec_cf).norm(dim=-1)).mean(0)


def relevance(vec_pos: torch.Tensor, vec_cf: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(N,) mean over prompts of |sum over positions of (code vector change . metric gradient)|."""
    return _per_prompt(((vec_pos - vec_cf) * grads).sum(-1)).abs().mean(0)


def edge_products(node: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, N) sender score times receiver score on `mask`, NaN elsewhere."""
    out = torch.full(mask.shape, float("nan"))
    out[mask] = (node[:, None] * node[None, :])[mask]
    return out


def edge_relevance(vec_pos: torch.Tensor, vec_cf: torch.Tensor, inputs: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """(N, N) on `mask` (NaN elsewhere): mean over prompts of |sum over positions of (sender's
    code vector change . receiver's input gradient)|; inputs (P, [T,] N, d)."""
    delta = vec_pos - vec_cf
    if delta.dim() == 3:
        delta, inputs = delta[:, None], inputs[:, None]
    per_prompt = torch.einsum("ptsd,ptrd->psr", delta, inputs)
    out = torch.full(mask.shape, float("nan"))
    out[mask] = per_prompt.abs().mean(0)[mask]
    return out


def softmax_scores(counts: torch.Tensor) -> torch.Tensor:
    """Softmax over the finite entries (NaN stays NaN)."""
    out = torch.full_like(counts, float("nan"))
    ok = torch.isfinite(counts)
    out[ok] = torch.softmax(counts[ok].double(), 0).to(out.dtype)
    return out


def predicted(counts: torch.Tensor) -> torch.Tensor:
    """Items counted above the mean count (more than an equal share)."""
    return counts > counts.mean()


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with average ranks for ties (scores and labels 1-D)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return math.nan
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for v in scores.unique():  # average ranks over ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0,0) to (1,1)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in scores.unique().flip(0):
        chosen = scores >= t
        tpr.append(float((chosen & labels).sum()) / n_pos)
        fpr.append(float((chosen & ~labels).sum()) / n_neg)
    return fpr, tpr


def precision_recall_f1(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """True precision, recall and F1 (not the harmonic mean of TPR and 1 - FPR)."""
    pred, truth = pred.bool().flatten(), truth.bool().flatten()
    tp = int((pred & truth).sum())
    precision = tp / int(pred.sum()) if pred.any() else 0.0
    recall = tp / int(truth.sum()) if truth.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
