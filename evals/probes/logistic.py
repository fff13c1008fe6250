"""Binary logistic regression in torch (no sklearn): standardised features, L2, full-batch L-BFGS.

The problems here are small (a few thousand rows, at most d_model columns), so full-batch
L-BFGS with a strong-Wolfe line search converges in tens of iterations on a CPU. The loss is
mean binary cross-entropy + (L2 / 2) * ||w||^2 on the standardised features (the bias is not
penalised), so the penalty means the same for every feature scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

L2 = 1e-3
MAX_ITER = 100


@dataclass(frozen=True)
class Probe:
    """A fitted probe: score(x) = x @ weight + bias, in the caller's (unstandardised) units."""

    weight: torch.Tensor  # (d,)
    bias: float

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight + self.bias


def fit(x: torch.Tensor, y: torch.Tensor, l2: float = L2, max_iter: int = MAX_ITER) -> Probe:
    """Fit a logistic probe on rows `x` (n, d) and boolean targets `y` (n,)."""
    x = x.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    t = y.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w.detach() / std)
    return Probe(weight, float(b.detach() - (mean * weight).sum()))


def accuracy_f1(scores: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and F1 of the positive class for predictions `scores > 0`."""
    pred = scores > 0
    tp = int((pred & y).sum())
    denom = int(pred.sum()) + int(y.sum())
    return float((pred == y).float().mean()), (2 * tp / denom if denom else 0.0)
