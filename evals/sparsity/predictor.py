"""A low-rank predictor of each MLP's active neurons, so the up-projection can skip the rest too.

Deja Vu's idea (arXiv 2310.17157) at its simplest: per layer, scores = (x @ A) @ B + c from the
MLP's input x (`blocks.L.ln2.hook_normalized`, what the folded W_in reads), A (d, r), B (r, d_ff),
trained with binary cross-entropy against "h > threshold" on train tokens. A neuron is computed
when its score exceeds a per-layer cut, set on the train tokens so that a share `target_recall`
of the truly active (token, neuron) pairs is predicted. On held-out tokens we report recall,
precision, the share of neurons computed, and the next-token loss change when each MLP computes
only its predicted neurons (equal to zeroing the others' activations, which is how it is spliced:
`saelab.kernels.SparseMLP.active` computes exactly that, tested against it).

Cost per token: 2 r (d + d_ff) FLOPs for the predictor, against 4 d d_ff for the dense MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from saelab.data.activations import model_activations, positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.measure import default_threshold, mlp_hooks
from saelab.evals.spliced import SplicedLoss, prediction_mask
from saelab.kernels import SparseMLP
from saelab.models import HookedModel

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_new": partial(torch.nn.functional.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(torch.nn.functional.gelu, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}
"""transformer-lens `act_fn` names the sparse MLP forward can run (each maps 0 to 0)."""


KEPT_POSITIVES = 2**20
"""Active train scores a predictor keeps for `LayerPredictor.at_recall` (4 MB per layer at most)."""


def input_hook(layer: int) -> str:
    return f"blocks.{layer}.ln2.hook_normalized"


def mlp_weights(model: HookedModel, layer: int) -> SparseMLP:
    """Layer `layer`'s MLP as a `SparseMLP` (weights as the hooked model runs them; its sparse
    paths drop units at or under the model's default threshold, none for ReLU)."""
    mlp = model.model.blocks[layer].mlp
    if getattr(mlp, "W_gate", None) is not None:
        raise SaelabError(f"model {model.spec} has gated MLPs; the sparse MLP forward supports "
                          "act(x W_in + b_in) W_out + b_out only")
    act = ACTIVATIONS.get(model.model.cfg.act_fn)
    if act is None:
        raise SaelabError(f"the sparse MLP forward supports {', '.join(ACTIVATIONS)} MLPs, not "
                          f"{model.model.cfg.act_fn!r} (model {model.spec})")
    return SparseMLP.of(mlp.W_in.detach(), mlp.b_in.detach(), mlp.W_out.detach(), mlp.b_out.detach(), act,
                        default_threshold(model))


@dataclass(frozen=True)
class LayerPredictor:
    """One layer's low-rank active-set predictor.

    Fields:
        A: (d, r). B: (r, d_ff). c: (d_ff,).
        cut: a neuron is predicted active when its score exceeds this.
        positives: sorted scores of truly active (token, neuron) pairs on the train tokens (a
            subsample of at most `KEPT_POSITIVES`), so `at_recall` can move the cut later.
    """

    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    cut: float
    positives: torch.Tensor = field(default_factory=lambda: torch.empty(0), repr=False)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B + self.c

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x) > self.cut

    def at_recall(self, target_recall: float) -> LayerPredictor:
        """The same predictor with its cut moved to predict a share `target_recall` of the train
        tokens' active pairs (1.0: below the lowest active score seen): a margin that trades
        computed units for fewer missed ones, without retraining."""
        if not 0 < target_recall <= 1:
            raise ValueError(f"target recall {target_recall} is outside (0, 1]")
        return replace(self, cut=_cut(self.positives, target_recall))


def _fit(x: torch.Tensor, y: torch.Tensor, rank: int, target_recall: float, epochs: int,
         batch: int, lr: float, gen: torch.Generator) -> LayerPredictor:
    d, d_ff = x.shape[1], y.shape[1]
    A = (torch.randn(d, rank, generator=gen) / d**0.5).requires_grad_()
    B = (torch.randn(rank, d_ff, generator=gen) / rank**0.5).requires_grad_()
    c = torch.zeros(d_ff).requires_grad_()
    opt = torch.optim.Adam([A, B, c], lr=lr)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=gen).split(batch):
            logits = (x[rows] @ A) @ B + c
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[rows].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        positive = ((x @ A) @ B + c)[y]
        sample = positive[torch.randperm(positive.numel(), generator=gen)[:KEPT_POSITIVES]]
        if positive.numel() > KEPT_POSITIVES:  # the extremes decide a cut at recall ~1: keep them
            sample = torch.cat([sample, positive.min().view(1)])
        positives = sample.sort().values
    return LayerPredictor(A.detach(), B.detach(), c.detach(), _cut(positives, target_recall), positives)


def _cut(positives: torch.Tensor, target_recall: float) -> float:
    """The cut leaving a share `target_recall` of the sorted active scores above it (inf if none)."""
    if not positives.numel():
        return float("inf")
    return float(torch.quantile(positives, 1 - target_recall, interpolation="lower")) - 1e-6


def train_predictors(model: HookedModel, data: TokenData, tokens: int = 32768, rank: int | None = None,
                     target_recall: float = 0.95, threshold: float | None = None, epochs: int = 4,
                     batch: int = 256, lr: float = 1e-2, batch_rows: int = 32,
                     seed: int = 0) -> tuple[list[LayerPredictor], int]:
    """One predictor per layer, fit on MLP inputs and activity of `tokens` positions of `data`.

    Returns the predictors and the number of train tokens used. `rank` defaults to d_model // 4.
    """
    check_predictor_args(tokens, rank, target_recall)
    threshold = default_threshold(model) if threshold is None else threshold
    outs = mlp_hooks(model)
    ins = [input_hook(i) for i in range(len(outs))]
    model.check_hooks(ins)
    xs: list[list[torch.Tensor]] = [[] for _ in outs]
    ys: list[list[torch.Tensor]] = [[] for _ in outs]
    seen = 0
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="predictor data")
    for acts in model_activations(model, data, ins + outs, batch_rows, epochs=1):
        for i, (hin, hout) in enumerate(zip(ins, outs, strict=True)):
            xs[i].append(acts[hin].float().cpu())
            ys[i].append(acts[hout].abs().cpu() > threshold)
        seen += acts[outs[0]].shape[0]
        bar.update(acts[outs[0]].shape[0])
        if seen >= tokens:
            break
    bar.close()
    if not seen:
        raise SaelabError(f"data {data.spec!r} has no tokens in split {data.split!r} to train on")
    gen = torch.Generator().manual_seed(seed)
    preds = []
    for i in tqdm(range(len(outs)), desc="fit predictors", unit="layer"):
        x, y = torch.cat(xs[i]), torch.cat(ys[i])
        with torch.enable_grad():
            preds.append(_fit(x, y, rank or max(1, x.shape[1] // 4), target_recall, epochs, batch, lr, gen))
    return preds, seen


def check_predictor_args(tokens: int, rank: int | None, target_recall: float) -> None:
    if tokens < 1 or (rank is not None and rank < 1):
        raise SaelabError(f"predictor tokens and rank must be positive, got {tokens} and {rank}")
    if not 0 < target_recall <= 1:
        raise SaelabError(f"target recall {target_recall} is outside (0, 1]; give a fraction such as 0.95")


@torch.no_grad()
def evaluate_predictors(model: HookedModel, preds: list[LayerPredictor], heldout: TokenData,
                        tokens: int = 16384, threshold: float | None = None,
                        batch_rows: int = 32) -> dict:
    """Recall, precision and computed share per layer, and the loss with only predicted neurons."""
    threshold = default_threshold(model) if threshold is None else threshold
    n = len(preds)
    hits, predicted, actual, mass_hit, mass = ([0.0] * n for _ in range(5))
    positions = [0]
    batches = heldout_rows(model.tokenizer, heldout, tokens).split(batch_rows)
    loss = SplicedLoss()
    inputs: dict[int, torch.Tensor] = {}
    keep_now: list[torch.Tensor] = []

    def grab(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            inputs[layer] = x
            return x
        return fn

    def only_predicted(layer: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            chosen = preds[layer].predict(inputs.pop(layer).float()).to(h.dtype)
            keep = keep_now[0]
            true = h[keep].abs() > threshold
            mine = chosen[keep].bool()
            hits[layer] += float((true & mine).sum())
            predicted[layer] += float(mine.sum())
            actual[layer] += float(true.sum())
            mass_hit[layer] += float((h[keep].abs() * mine).sum())
            mass[layer] += float(h[keep].abs().sum())
            if layer == 0:
                positions[0] += int(keep.sum())
            return h * chosen
        return fn

    replace = {}
    for i, hidden in enumerate(mlp_hooks(model)[:n]):
        replace[input_hook(i)] = grab(i)
        replace[hidden] = only_predicted(i)
    bar = tqdm(total=2 * sum(b.numel() for b in batches), unit="tok", unit_scale=True,
               desc="predictor eval")
    for batch in batches:
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, model.tokenizer)
        keep_now[:] = [keep]
        mask = prediction_mask(keep)
        clean = loss.add("clean", model.logits(batch), batch, mask)
        loss.add("predicted", model.logits(batch, replace), batch, mask, clean)
        bar.update(2 * batch.numel())
    bar.close()
    d_ff = [p.B.shape[1] for p in preds]
    d = preds[0].A.shape[0]
    layers: list[dict[str, Any]] = [{
        "layer": i,
        "rank": p.rank,
        "cut": p.cut,
        "recall": hits[i] / actual[i] if actual[i] else None,
        "precision": hits[i] / predicted[i] if predicted[i] else None,
        "mass_recall": mass_hit[i] / mass[i] if mass[i] else None,
        "predicted_density": predicted[i] / positions[0] / d_ff[i],
        "true_density": actual[i] / positions[0] / d_ff[i],
    } for i, p in enumerate(preds)]
    computed = sum(x["predicted_density"] * f for x, f in zip(layers, d_ff, strict=True)) / sum(d_ff)
    predictor_flops = sum(2 * p.rank * (d + f) for p, f in zip(preds, d_ff, strict=True))
    mlp_flops = sum(4 * d * f for f in d_ff)
    ce_clean = loss.ce["clean"] / loss.count["clean"]
    return {
        "tokens": positions[0],
        "ce_clean": ce_clean,
        "delta_ce": loss.ce["predicted"] / loss.count["predicted"] - ce_clean,
        "kl": loss.kl["predicted"] / loss.count["predicted"],
        "density": computed,
        "flops_fraction": computed + predictor_flops / mlp_flops,
        "layers": layers,
    }
