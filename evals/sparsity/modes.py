"""Sparsification modes spliced into every MLP, and their loss-against-density sweep.

Each mode zeroes part of the hidden activation h = act(pre) (`blocks.L.mlp.hook_post`, the
down-projection's input; `hook_mid` for SoLU, see `measure`) at every position, in every layer
at once (model-wide sparsity):

- `relu`: h as it is; exact zeros only (ReLU MLPs are already sparse). No target.
- `threshold`: |h| > t with one magnitude t for all layers, the (1 - target) quantile of |h| over
  all layers on train tokens.
- `cats`: |h| > t_L with a threshold per layer, the (1 - target) quantile of that layer's |h| on
  train tokens (CATS, arXiv 2404.08763).
- `topk`: each token keeps its k = round(target * d_ff) largest |h| (an exact sort).
- `stat_topk`: each token keeps the neurons whose pre-activation exceeds
  theta = mean(pre) + std(pre) * PhiInv(1 - k / d_ff), mean and std over that token's d_ff
  pre-activations ("Spark Transformer", arXiv 2506.06644): linear time, no sort, and exact when
  pre is Gaussian. The density reached is reported, not assumed.

Targets are densities in (0, 1]. For a ReLU MLP the thresholding modes cannot go above its
natural density (they only zero more), so the density reached is what the sweep reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from saelab.data.activations import model_activations, positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.measure import mlp_hooks
from saelab.evals.spliced import SplicedLoss, prediction_mask
from saelab.kernels import topk_indices
from saelab.models import HookedModel, Splice

MODES = ("relu", "threshold", "cats", "topk", "stat_topk")
DEFAULT_DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.02)
CALIBRATION_VALUES = 2**21
"""At most this many |h| values per layer are kept (a seeded sample) to set the quantiles."""


def check_modes(modes: tuple[str, ...] | list[str]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise SaelabError(f"unknown sparsification mode {mode!r}; use one of {', '.join(MODES)}")


def check_densities(densities: Sequence[float | None]) -> None:
    for d in densities:
        if not (isinstance(d, (int, float)) and 0 < d <= 1):
            raise SaelabError(f"target density {d} is outside (0, 1]; give a fraction such as 0.1")


@dataclass(frozen=True)
class Calibration:
    """Sorted samples of |h| per layer from train tokens; the quantile thresholds come from them.

    Fields:
        per_layer: one ascending 1-D tensor of |h| values per layer.
        tokens: train tokens they were drawn from.
    """

    per_layer: list[torch.Tensor]
    tokens: int

    @staticmethod
    def _quantile(values: torch.Tensor, target: float) -> float:
        """t such that a share `target` of `values` lies above it (-1 keeps everything)."""
        keep = round(target * values.numel())
        return -1.0 if keep >= values.numel() else float(values[values.numel() - keep - 1])

    def layer_threshold(self, layer: int, target: float) -> float:
        return self._quantile(self.per_layer[layer], target)

    def global_threshold(self, target: float) -> float:
        pooled = torch.cat(self.per_layer).sort().values
        return self._quantile(pooled, target)


@torch.no_grad()
def calibrate(model: HookedModel, data: TokenData, tokens: int = 16384, batch_rows: int = 32,
              seed: int = 0) -> Calibration:
    """|h| samples of every layer on `tokens` positions of `data` (use its train split)."""
    hooks = mlp_hooks(model)
    chunks: list[list[torch.Tensor]] = [[] for _ in hooks]
    seen = 0
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="calibrate thresholds")
    for acts in model_activations(model, data, hooks, batch_rows, epochs=1):
        for layer, h in enumerate(hooks):
            chunks[layer].append(acts[h].abs().float().flatten().cpu())
        seen += acts[hooks[0]].shape[0]
        bar.update(acts[hooks[0]].shape[0])
        if seen >= tokens:
            break
    bar.close()
    if not seen:
        raise SaelabError(f"data {data.spec!r} has no tokens in split {data.split!r} to calibrate on")
    gen = torch.Generator().manual_seed(seed)
    per_layer = []
    for parts in chunks:
        values = torch.cat(parts)
        if values.numel() > CALIBRATION_VALUES:
            values = values[torch.randperm(values.numel(), generator=gen)[:CALIBRATION_VALUES]]
        per_layer.append(values.sort().values)
    return Calibration(per_layer, seen)


def _keep_topk(h: torch.Tensor, k: int) -> torch.Tensor:
    flat = h.reshape(-1, h.shape[-1])
    idx = topk_indices(flat.abs(), k)
    return torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx)).view_as(h)


def stat_topk_threshold(pre: torch.Tensor, target: float) -> torch.Tensor:
    """Spark Transformer's per-token threshold mean + std * PhiInv(1 - target), shape (..., 1)."""
    if target >= 1:  # keep everything
        return torch.full_like(pre[..., :1], -math.inf)
    z = torch.special.ndtri(torch.tensor(1 - target, dtype=torch.float64)).item()
    mean = pre.mean(-1, keepdim=True)
    std = pre.std(-1, keepdim=True, correction=0)
    return mean + std * z


@dataclass(frozen=True)
class Sparsifier:
    """One mode at one target: the functions to splice at each layer's MLP hooks.

    Fields:
        mode: one of `MODES`.
        target: target density in (0, 1], None for `relu`.
        thresholds: per-layer |h| thresholds (`threshold`, `cats`), else None.
    """

    mode: str
    target: float | None
    thresholds: tuple[float, ...] | None = None

    @classmethod
    def build(cls, mode: str, target: float | None, calibration: Calibration | None,
              n_layers: int) -> Sparsifier:
        check_modes([mode])
        if mode == "relu":
            return cls(mode, None)
        check_densities([target])
        assert target is not None  # check_densities refused None
        if mode in ("threshold", "cats"):
            if calibration is None:
                raise SaelabError(f"mode {mode} needs calibration thresholds (run calibrate first)")
            if mode == "threshold":
                t = calibration.global_threshold(target)
                return cls(mode, target, (t,) * n_layers)
            return cls(mode, target, tuple(calibration.layer_threshold(i, target)
                                           for i in range(n_layers)))
        return cls(mode, target)

    def apply(self, layer: int, h: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """The sparsified hidden activation of one layer, (..., d_ff) -> (..., d_ff)."""
        if self.mode == "relu":
            return h
        if self.thresholds is not None:
            return h * (h.abs() > self.thresholds[layer])
        assert self.target is not None, "every mode but relu has a target (Sparsifier.build)"
        if self.mode == "topk":
            return _keep_topk(h, max(1, round(self.target * h.shape[-1])))
        assert pre is not None, "stat_topk reads the layer's hook_pre (Sparsifier.hooks)"
        return h * (pre > stat_topk_threshold(pre, self.target))  # stat_topk

    def hooks(self, hidden: list[str], on_output: Callable[[int, torch.Tensor], None]) -> dict[str, Splice]:
        """`HookedModel.logits` replacements at every layer's hidden-activation hook (`hidden`,
        from `mlp_hooks`); `on_output(layer, h)` sees each result."""
        pre: dict[int, torch.Tensor] = {}
        fns: dict[str, Splice] = {}
        for layer, hook in enumerate(hidden):
            def post_fn(h: torch.Tensor, layer: int = layer) -> torch.Tensor:
                out = self.apply(layer, h, pre.pop(layer, None))
                on_output(layer, out)
                return out

            if self.mode == "stat_topk":
                def pre_fn(x: torch.Tensor, layer: int = layer) -> torch.Tensor:
                    pre[layer] = x
                    return x

                fns[f"blocks.{layer}.mlp.hook_pre"] = pre_fn
            fns[hook] = post_fn
        return fns

    @property
    def name(self) -> str:
        return self.mode if self.target is None else f"{self.mode}@{self.target:g}"


@torch.no_grad()
def sweep(
    model: HookedModel,
    heldout: TokenData,
    train: TokenData,
    modes: tuple[str, ...] = MODES,
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    tokens: int = 16384,
    calibration_tokens: int = 16384,
    batch_rows: int = 32,
) -> dict:
    """Density reached and held-out next-token loss change of every (mode, target density).

    Losses count the same predictions as `saelab.evals.spliced` (neither token BOS/pad);
    densities count the sparsified h at non-BOS/pad positions, over all layers.
    """
    check_modes(modes)
    check_densities(densities)
    if tokens < 1 or calibration_tokens < 1:
        raise SaelabError(f"sweep tokens must be positive, got {tokens} and {calibration_tokens}")
    hooks = mlp_hooks(model)
    n_layers = len(hooks)
    calib = (calibrate(model, train, calibration_tokens, batch_rows)
             if {"threshold", "cats"} & set(modes) else None)
    runs = [Sparsifier.build(m, None if m == "relu" else t, calib, n_layers)
            for m in modes for t in ([None] if m == "relu" else densities)]
    batches = heldout_rows(model.tokenizer, heldout, tokens).split(batch_rows)
    loss = SplicedLoss()
    active = dict.fromkeys((s.name for s in runs), 0)
    total = dict.fromkeys((s.name for s in runs), 0)
    bar = tqdm(total=sum(b.numel() for b in batches) * (len(runs) + 1), unit="tok", unit_scale=True,
               desc="sparsity modes")
    for batch in batches:
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, model.tokenizer)
        mask = prediction_mask(keep)
        clean = loss.add("clean", model.logits(batch), batch, mask)
        bar.update(batch.numel())
        for s in runs:
            def count(layer: int, h: torch.Tensor, name: str = s.name, keep=keep) -> None:
                kept = h.reshape(keep.shape + h.shape[-1:])[keep]
                active[name] += int((kept != 0).sum())
                total[name] += kept.numel()

            loss.add(s.name, model.logits(batch, s.hooks(hooks, count)), batch, mask, clean)
            bar.update(batch.numel())
    bar.close()
    ce_clean = loss.ce["clean"] / loss.count["clean"]
    return {
        "tokens": int(sum(positions_to_keep(b, model.tokenizer).sum() for b in batches)),
        "predicted_positions": loss.count["clean"],
        "calibration_tokens": calib.tokens if calib else 0,
        "ce_clean": ce_clean,
        "runs": [{
            "mode": s.mode,
            "target": s.target,
            "density": active[s.name] / total[s.name],
            "ce": loss.ce[s.name] / loss.count[s.name],
            "delta_ce": loss.ce[s.name] / loss.count[s.name] - ce_clean,
            "kl": loss.kl[s.name] / loss.count[s.name],
            "thresholds": list(s.thresholds) if s.thresholds else None,
        } for s in runs],
    }
