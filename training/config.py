"""The training configuration: one frozen dataclass, fillable from flags or a YAML/JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from saelab.data import BUILTIN_STDLIB
from saelab.errors import SaelabError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Defaults train a TopK SAE on the shipped zoo model.

    Fields:
        model: model spec (`zoo:NAME`, local HF directory, `hf:NAME`); default the shipped zoo
            model. With `cache` it may be omitted (the manifest names the model).
        hook: hook to train on, or a list of hooks (one SAE each, all fed by one forward pass);
            default `blocks.{n_layers // 2}.hook_resid_post`.
        data: data spec for on-the-fly activations and held-out evaluation (`saelab.data`).
        cache: activation cache directory to train from instead of running the model.
        out: output directory for the dictionary (`sae.safetensors`, `cfg.json`) and logs.
        n_latents: dictionary size; default `expansion * d_in`.
        expansion: latents per input dimension when `n_latents` is not given.
        k: active latents per token (ignored by relu, whose sparsity comes from l1_coefficient).
        allocator: topk, gradient_topk, feature_choice, mutual_choice or relu
            (`saelab.allocators`); jumprelu dictionaries are imported, not trained here.
        beta: gradient_topk's weight on the gradient term of its selection score.
        capacity: feature_choice's tokens-per-latent curve, uniform or zipf.
        zipf_alpha: exponent of the zipf capacity curve.
        l1_coefficient: relu's sparsity penalty weight (`training.losses.l1_penalty`).
        tokens: training tokens.
        batch_size: tokens per optimiser step and process (data parallel: the global batch is
            batch_size times the number of processes).
        lr: Adam learning rate; default 2e-4 / sqrt(n_latents / 2^14) (Gao et al.).
        warmup_steps: linear learning-rate warmup.
        decay_fraction: final fraction of steps over which the lr decays linearly to 0.
        adam_eps: Adam epsilon (Gao et al. use 6.25e-10).
        dead_tokens: a latent not active for this many tokens counts as dead for AuxK.
        aux: auxiliary loss for unused latents: auxk (dead latents only) or aux_zipf (dead and
            under-used latents, see `training.losses.underused`).
        k_aux: latents used by the auxiliary loss; default d_in / 2.
        auxk_coef: auxiliary loss weight.
        ema_decay: decay of the moving average of latent firing frequency (aux_zipf).
        context_length: tokens per row for on-the-fly activations (BOS included);
            default the model's training context, capped at 128.
        buffer_tokens: on-the-fly activations are shuffled in a buffer of this many tokens.
        eval_tokens: held-out tokens for the end-of-run evaluation (`saelab.evals.evaluate`).
        seed: seeds initialisation, data order and shuffling.
        device: torch device.
        log_every: steps between metric records.
        checkpoint_every: steps between checkpoints (0: only at the end); `--resume` continues
            from the latest one exactly.
        wandb: also log to Weights & Biases (offline into `out/wandb` unless WANDB_MODE or
            WANDB_API_KEY says online); local JSON logs are always written.
        wandb_project: the wandb project name.
        overwrite: allow writing into a non-empty output directory.
    """

    model: str | None = None
    hook: str | list[str] | None = None
    data: str = BUILTIN_STDLIB
    cache: str | None = None
    out: str = "runs/sae"
    n_latents: int | None = None
    expansion: int = 16
    k: int = 32
    allocator: str = "topk"
    beta: float = 1.0
    capacity: str = "uniform"
    zipf_alpha: float = 0.5
    l1_coefficient: float = 1.0
    tokens: int = 4_000_000
    batch_size: int = 4096
    lr: float | None = None
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    adam_eps: float = 6.25e-10
    dead_tokens: int = 10_000_000
    aux: str = "auxk"
    k_aux: int | None = None
    auxk_coef: float = 1 / 32
    ema_decay: float = 0.99
    context_length: int | None = None
    buffer_tokens: int = 2**17
    eval_tokens: int = 2**15
    seed: int = 0
    device: str = "cpu"
    log_every: int = 20
    checkpoint_every: int = 500
    wandb: bool = False
    wandb_project: str = "saelab"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("expansion", "k", "tokens", "batch_size", "eval_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise SaelabError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise SaelabError(
                f"k={self.k} is larger than the dictionary (n_latents={self.n_latents}); "
                "choose k <= n_latents"
            )
        if self.allocator == "jumprelu":
            raise SaelabError(
                "saelab does not train jumprelu SAEs (it imports them); train relu, topk, "
                "gradient_topk, feature_choice or mutual_choice"
            )
        if self.l1_coefficient < 0:
            raise SaelabError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.aux not in ("auxk", "aux_zipf"):
            raise SaelabError(f"unknown auxiliary loss {self.aux!r}; use auxk or aux_zipf")
        if not 0 <= self.ema_decay < 1:
            raise SaelabError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.decay_fraction <= 1:
            raise SaelabError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")

    def latents(self, d_in: int) -> int:
        return self.n_latents if self.n_latents is not None else self.expansion * d_in

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    @classmethod
    def from_file_and_flags(cls, path: str | None, flags: dict) -> TrainConfig:
        """Fields from a YAML/JSON file (if any), overridden by flags that were given (not None)."""
        values: dict = {}
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise SaelabError(f"config file {p} does not exist")
            try:
                text = p.read_text()
                values = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                raise SaelabError(f"config file {p} does not parse ({type(e).__name__})") from None
            if not isinstance(values, dict):
                raise SaelabError(f"config file {p} must hold a mapping of field names to values")
        values.update({k: v for k, v in flags.items() if v is not None})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SaelabError(f"unknown training config field(s) {unknown}; known: {sorted(fields)}")
        return cls(**{k: _coerce(k, v, str(fields[k].type)) for k, v in values.items()})


def _coerce(name: str, value, kind: str):
    """YAML reads `2e-4` as a string (YAML 1.1): turn numeric text into the field's number type."""
    if not isinstance(value, str) or not ("int" in kind or "float" in kind):
        return value
    try:
        number = float(value)
    except ValueError:
        raise SaelabError(f"config field {name} must be a number, got {value!r}") from None
    if "float" in kind or not number.is_integer():
        return number
    return int(number)
