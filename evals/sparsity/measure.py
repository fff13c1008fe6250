"""Lazy-neuron activation sparsity of a model's MLPs, measured on held-out text.

For every layer the MLP hidden activation `blocks.L.mlp.hook_post` (the input of the
down-projection) is captured at every non-BOS/pad position. A neuron is active on a token when
|h| > threshold: 0 for ReLU MLPs, i.e. exactly nonzero as "The Lazy Neuron Phenomenon" counts it;
for every other activation (GELU, SiLU, SoLU), whose output is almost never exactly zero, a
stated magnitude (`SMOOTH_THRESHOLD`).

SoLU MLPs (`solu_ln`) apply a LayerNorm after the activation, so `hook_post` is dense whatever
the threshold. Their h is `blocks.L.mlp.hook_mid`, SoLU's output before that LayerNorm: the
LayerNorm is one affine map per token (a scale and a shift), so a down-projection over hook_mid's
active units plus a rank-one correction is exact, and those units are what sparsity can skip.

Per layer: the share of active neurons per token (mean and percentiles over tokens), each
neuron's firing frequency (dead: never active in the window; always on: active on every token),
and the union of active neurons over groups of 1, 8, 64 and 512 tokens. Groups are drawn at
random (seeded) from the tokens of one forward batch, which spans `batch_rows` documents: that is
what a batched server sees, and batch 1 is where activation sparsity pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from saelab import __version__
from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import BUILTIN_STDLIB, TokenData
from saelab.errors import SaelabError
from saelab.models import HookedModel, load_model
from saelab.zoo import DEFAULT_MODEL

UNION_SIZES = (1, 8, 64, 512)
PERCENTILES = (1, 10, 50, 90, 99)
EXACT_ZERO = ("relu", "relu2")
"""Activations whose inactive units are exactly 0 (threshold 0 counts them right); relu2 is relu(x)^2."""
SMOOTH_THRESHOLD = 0.01
"""Default |h| above which a neuron of any other activation (GELU, SiLU, SoLU) counts as active
(stated in every report)."""
PRE_NORM_HIDDEN = ("solu_ln",)
"""Activations followed by a LayerNorm inside the MLP: h is read before it (`hook_mid`)."""


def mlp_hook(layer: int, act_fn: str = "relu") -> str:
    """Layer `layer`'s hidden-activation hook for an MLP with activation `act_fn`."""
    return f"blocks.{layer}.mlp.{'hook_mid' if act_fn in PRE_NORM_HIDDEN else 'hook_post'}"


def mlp_hooks(model: HookedModel) -> list[str]:
    """The MLP hidden-activation hook of every layer, or a one-line error naming what is missing."""
    act = activation_fn(model)
    hooks = [mlp_hook(layer, act) for layer in range(model.n_layers)]
    missing = [h for h in hooks if h not in model.model.hook_dict]
    if missing:
        raise SaelabError(
            f"model {model.spec} has no hookable MLP hidden activation ({missing[0]} is not a hook; "
            f"attention-only model?); activation sparsity needs {hooks[0].replace('.0.', '.L.')}, "
            "the hidden activation each MLP's down-projection reads"
        )
    return hooks


def activation_fn(model: HookedModel) -> str:
    return str(getattr(model.model.cfg, "act_fn", None) or "unknown")


def default_threshold(model: HookedModel) -> float:
    """0 (exact zeros) for ReLU and squared-ReLU MLPs, `SMOOTH_THRESHOLD` for anything else."""
    return 0.0 if activation_fn(model) in EXACT_ZERO else SMOOTH_THRESHOLD


def resolve(model: HookedModel | str, data: TokenData | str | None, split: str = "heldout",
            device: str = "cpu") -> tuple[HookedModel, TokenData]:
    """A loaded model with MLP hooks, and `data` as a TokenData on `split` (rows of min(context,
    128) tokens)."""
    if isinstance(model, str):
        model = load_model(model, device)
    mlp_hooks(model)
    if data is None or isinstance(data, str):
        data = TokenData(data or BUILTIN_STDLIB, split, model.check_context(None))
    model.check_context(data.context_length)
    return model, data


def check_args(tokens: int, batch_rows: int, threshold: float | None) -> None:
    if tokens < 1 or batch_rows < 1:
        raise SaelabError(f"tokens and batch_rows must be positive, got {tokens} and {batch_rows}")
    if threshold is not None and threshold < 0:
        raise SaelabError(f"threshold is a magnitude and must be >= 0, got {threshold}")


def _percentile(hist: torch.Tensor, q: float) -> int:
    """Smallest count c with at least q% of tokens at or below c, from a histogram of counts."""
    cum = hist.cumsum(0)
    return int(torch.searchsorted(cum, q / 100 * cum[-1]).item())


@dataclass
class LayerStats:
    """Running sums for one layer's hidden activations (bounded memory: O(d_ff) per layer)."""

    d_ff: int
    union_sizes: tuple[int, ...] = UNION_SIZES

    def __post_init__(self) -> None:
        self.tokens = 0
        self.count_hist = torch.zeros(self.d_ff + 1, dtype=torch.float64)  # tokens per active count
        self.fires = torch.zeros(self.d_ff, dtype=torch.float64)  # tokens each neuron fired on
        self.union_sum = dict.fromkeys(self.union_sizes, 0.0)
        self.union_groups = dict.fromkeys(self.union_sizes, 0)

    def update(self, active: torch.Tensor, generator: torch.Generator) -> None:
        """Add (N, d_ff) boolean activity of N tokens (one forward batch)."""
        active = active.cpu()
        counts = active.sum(1)
        self.tokens += active.shape[0]
        self.count_hist += torch.bincount(counts, minlength=self.d_ff + 1).double()
        self.fires += active.sum(0).double()
        shuffled = active[torch.randperm(active.shape[0], generator=generator)]
        for size in self.union_sizes:
            groups = shuffled.shape[0] // size
            if groups:
                union = shuffled[: groups * size].view(groups, size, self.d_ff).any(1).sum(1)
                self.union_sum[size] += union.double().sum().item()
                self.union_groups[size] += groups

    def result(self) -> dict:
        if not self.tokens:
            raise SaelabError("no tokens to measure sparsity on (all positions were BOS/pad)")
        mean_active = float((self.count_hist * torch.arange(self.d_ff + 1)).sum() / self.tokens)
        freq = self.fires / self.tokens
        return {
            "d_ff": self.d_ff,
            "tokens": self.tokens,
            "active_mean": mean_active,
            "density": mean_active / self.d_ff,
            "density_percentiles": {
                f"p{q}": _percentile(self.count_hist, q) / self.d_ff for q in PERCENTILES
            },
            "dead_neurons": int((self.fires == 0).sum()),
            "always_on_neurons": int((self.fires == self.tokens).sum()),
            "neurons_over_50pct": int((freq > 0.5).sum()),
            "union_density": {
                str(s): (self.union_sum[s] / self.union_groups[s] / self.d_ff
                         if self.union_groups[s] else None)
                for s in self.union_sizes
            },
            "union_groups": {str(s): self.union_groups[s] for s in self.union_sizes},
            "firing_frequency": [round(f, 6) for f in freq.tolist()],
        }


def flops_fractions(density: float) -> dict:
    """MLP FLOPs per token relative to dense (2 d d_ff each for up- and down-projection)."""
    return {
        "flops_fraction_sparse_down": (1 + density) / 2,
        "flops_fraction_active_set_known": density,
    }


@torch.no_grad()
def measure(
    model: HookedModel | str = DEFAULT_MODEL,
    data: TokenData | str | None = None,
    tokens: int = 65536,
    threshold: float | None = None,
    batch_rows: int = 32,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Per-layer activation sparsity of `model`'s MLPs on held-out tokens (module docstring).

    Args:
        model: a loaded `HookedModel` or a model spec.
        data: a data spec (its held-out split) or a `TokenData` used as given.
        tokens: window: whole rows until at least this many non-BOS/pad positions.
        threshold: a neuron is active when |h| > threshold; default 0 for ReLU MLPs (exact
            zeros), `SMOOTH_THRESHOLD` otherwise.
        batch_rows: rows per forward pass; union groups are drawn within one pass.
        seed: seeds the random grouping of tokens for the union.
    """
    check_args(tokens, batch_rows, threshold)
    start = time.perf_counter()
    model, data = resolve(model, data, device=device)
    hooks = mlp_hooks(model)
    if threshold is None:
        threshold = default_threshold(model)
    batches = heldout_rows(model.tokenizer, data, tokens).split(batch_rows)
    stats: list[LayerStats] = []
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=sum(b.numel() for b in batches), unit="tok", unit_scale=True, desc="sparsity")
    for batch in batches:
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, model.tokenizer)
        acts = model.activations(batch, hooks)
        for layer, hook in enumerate(hooks):
            h = acts[hook][keep]
            if len(stats) <= layer:
                stats.append(LayerStats(h.shape[-1]))
            stats[layer].update(h.abs() > threshold, gen)
        bar.update(batch.numel())
    bar.close()
    layers = [{"layer": i, "hook": h, **s.result()}
              for i, (h, s) in enumerate(zip(hooks, stats, strict=True))]
    d_ff_total = sum(r["d_ff"] for r in layers)
    density = sum(r["active_mean"] for r in layers) / d_ff_total
    return {
        "model": model.spec,
        "activation": activation_fn(model),
        "threshold": threshold,
        "active_means": "|h| > threshold" if threshold else "h != 0 (exact zeros)",
        "data": data.spec,
        "split": data.split,
        "context_length": data.context_length,
        "rows": sum(b.shape[0] for b in batches),
        "tokens": stats[0].tokens,
        "batch_rows": batch_rows,
        "density": density,
        **flops_fractions(density),
        "layers": layers,
        "seconds": round(time.perf_counter() - start, 2),
        "saelab_version": __version__,
    }
