"""The training configuration: frozen dataclasses in four groups (source, dictionary, optimiser,
run), fillable from flags or a YAML/JSON file by flat field names."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from saelab import allocators
from saelab.checks import Cost, check_device, check_field_types, check_memory, check_number, doc_field
from saelab.data.tokens import BUILTIN_STDLIB
from saelab.errors import SaelabError
from saelab.models import check_hook_order, check_processing
from saelab.zoo import DEFAULT_MODEL

DEAD_TOKENS_CAP = 10_000_000  # Gao et al.'s dead window, the default's upper bound


@dataclass(frozen=True)
class SourceConfig:
    """Where activations come from: the model (or a cache), its hooks and the token data."""

    model: str | None = doc_field(
        None, "Model spec: zoo:NAME, a local HF directory, or hf:NAME on the Hugging Face hub. "
        "With --cache it may be left out (the manifest names the model).", DEFAULT_MODEL)
    hook: str | list[str] | None = doc_field(
        None, "Hook to train on; repeat it to train one SAE per hook from one forward pass "
        "(written to OUT/HOOK).", "blocks.{n_layers//2}.hook_resid_post")
    target_hook: str | None = doc_field(
        None, "Train a transcoder: reconstruct this later hook from --hook's activation (e.g. "
        "--hook blocks.1.ln2.hook_normalized --target-hook blocks.1.hook_mlp_out, an MLP's input "
        "to its output); one --hook. Both hooks come from one forward pass (or one cache that "
        "holds both).", "none: an SAE reconstructs --hook")
    data: str = doc_field(BUILTIN_STDLIB, "Token data for on-the-fly activations and held-out "
                          "evaluation: builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME.")
    cache: str | None = doc_field(None, "Train from this activation cache (from `saelab cache`) "
                                  "instead of running the model.", path=True)
    processing: str | None = doc_field(
        None, "The model's weight processing, recorded in cfg.json: folded (LayerNorm folded, "
        "writing weights centred, TransformerLens's default), centred (writing weights centred "
        "only) or raw (the Hugging Face model's own activations, as SAELens's trainer and "
        "sparsify use; needed to export to sparsify).", "folded; with --cache the cache's")
    context_length: int | None = doc_field(None, "Tokens per row for on-the-fly activations (BOS "
                                           "included).", "min(model context, 128)")
    buffer_tokens: int = doc_field(2**17, "On-the-fly activations are shuffled in a buffer of this "
                                   "many tokens.")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_number("buffer_tokens", self.buffer_tokens, 1)
        check_number("context_length", self.context_length, 2)
        if self.processing is not None:
            check_processing(self.processing)


@dataclass(frozen=True)
class DictionaryConfig:
    """The dictionary to train: its size, sparsity and allocator."""

    n_latents: int | None = doc_field(None, "Dictionary size.", "expansion * d_in")
    expansion: int = doc_field(16, "Latents per input dimension when --n-latents is not given.")
    k: int = doc_field(32, "Active latents per token; for relu, whose sparsity comes from "
                       "--l1-coefficient, the L0 it starts training from; for jumprelu, the target "
                       "L0 its penalty's coefficient is steered to (--l0-controller).")
    allocator: str = doc_field("topk", "Sparsity allocator: topk, gradient_topk, feature_choice, "
                               "mutual_choice, relu (L1-trained, see --l1-coefficient), jumprelu "
                               "(learned thresholds, L0 penalty) or matryoshka (BatchTopK over "
                               "nested prefixes, see --matryoshka).")
    beta: float = doc_field(1.0, "gradient_topk: weight of the gradient term in the score "
                            "pre + beta*pre*e, e = |W_dec g| (see --grad-score).")
    grad_score: str = doc_field("normalised", "gradient_topk: normalised (e over its per-token mean; "
                                "beta scale-free) or raw (the published score; tune beta per model).")
    capacity: str = doc_field("zipf", "feature_choice: tokens-per-latent curve, zipf (the paper's) "
                              "or uniform (an ablation).")
    zipf_alpha: float = doc_field(0.5, "feature_choice: exponent of the zipf capacity curve.")
    skip: bool = doc_field(False, "Transcoders (--target-hook): add a learned linear skip connection "
                           "W_skip x to the output (Paulo et al. 2025, sparsify's skip transcoders).")
    matryoshka: str | None = doc_field(
        None, "matryoshka: nested prefix widths, comma-separated and strictly increasing, e.g. "
        "128,512,2048; each prefix reconstructs alone and their FVUs are summed. The dictionary "
        "size is appended when the last is smaller.", "n_latents/16,n_latents/4,n_latents")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("expansion", "k", "n_latents"):
            check_number(name, getattr(self, name), 1)
        for name in ("beta", "zipf_alpha"):
            check_number(name, getattr(self, name), 0)
        allocators.check_settings(self.allocator, self.capacity, self.grad_score)
        if self.n_latents is not None and self.k > self.n_latents:
            raise SaelabError(
                f"k={self.k} is larger than the dictionary (n_latents={self.n_latents}); "
                "choose k <= n_latents"
            )
        allocators.check_widths(self.widths, self.n_latents, self.kind)
        if not self.kind.trainable:
            raise SaelabError(f"saelab does not train {self.allocator} SAEs (it imports them); "
                              f"train {', '.join(allocators.trainable())}")

    @property
    def kind(self) -> allocators.Allocator:
        """The registered allocator to train (`saelab.allocators`)."""
        return allocators.get(self.allocator)

    @property
    def widths(self) -> list[int] | None:
        """The --matryoshka prefix widths as numbers."""
        return allocators.parse_widths(self.matryoshka)

    def latents(self, d_in: int) -> int:
        return self.n_latents if self.n_latents is not None else self.expansion * d_in


@dataclass(frozen=True)
class OptimConfig:
    """How long and how it learns: tokens, batch, learning-rate schedule, Adam, penalties, the
    auxiliary loss."""

    tokens: int = doc_field(4_000_000, "Training tokens.")
    batch_size: int = doc_field(4096, "Tokens per optimiser step and process (data parallel: the "
                                "global batch is batch_size times the number of processes).")
    lr: float | None = doc_field(None, "Adam learning rate; the default is Gao et al.'s rule raised "
                                 "for narrow inputs, as measured by benchmarks/allocators.py.",
                                 "2e-4 / sqrt(n_latents / 2^14) * clamp(768 / d_in, 1, 6)^1.5")
    warmup_steps: int = doc_field(50, "Linear learning-rate warmup steps.")
    decay_fraction: float = doc_field(0.2, "Final fraction of steps over which the lr decays "
                                      "linearly to 0.")
    adam_eps: float = doc_field(6.25e-10, "Adam epsilon (Gao et al. use 6.25e-10).")
    topk_warmup_steps: int = doc_field(
        50, "feature_choice / mutual_choice / matryoshka: select per token (topk) for this many "
        "first steps. From the tied init batch selection piles latents onto the highest-norm "
        "tokens; a short topk start gives the encoder directions first. jumprelu likewise (k = the "
        "target L0), then its thresholds start where each latent fires on k/n of the batch.")
    l1_coefficient: float = doc_field(0.1, "relu: weight of the L1 penalty sum_j z_j ||W_dec[j]|| "
                                      "(divided by the batch's RMS distance to its mean, so scale-free).")
    l0_coefficient: float | None = doc_field(
        None, "jumprelu: starting weight lambda of the L0 penalty (loss = FVU + lambda * L0); "
        "--l0-controller then steers it.", "balanced against the reconstruction's pull on the "
        "thresholds at the first thresholded step (training.thresholds)")
    l0_controller: float = doc_field(
        0.05, "jumprelu: after each step lambda *= exp(rate * clip(L0 / k - 1, -1, 1)), steering "
        "the batch L0 to --k; 0 keeps lambda fixed at --l0-coefficient.")
    jumprelu_bandwidth: float = doc_field(
        0.05, "jumprelu: bandwidth eps of the rectangle kernel in the thresholds' pseudo-derivatives, "
        "in units of the first batch's RMS distance to its mean per dimension (SAELens's default "
        "on its normalised inputs).")
    jumprelu_ste_to_input: bool = doc_field(
        True, "jumprelu: the L0 penalty's pseudo-derivative also reaches the pre-activations (the "
        "encoder), Anthropic's form; --no-jumprelu-ste-to-input gives DeepMind's (thresholds only), "
        "which did not hold L0 at --k in short runs here (saelab.allocators.jumprelu).")
    aux: str = doc_field("auxk", "Auxiliary loss for unused latents: auxk (dead latents) or aux_zipf "
                         "(dead and under-used latents, see training.losses.underused; it raised FVU "
                         "for topk, gradient_topk and mutual_choice in the allocator study).")
    k_aux: int | None = doc_field(None, "Latents used by the auxiliary loss.", "d_in / 2")
    auxk_coef: float = doc_field(1 / 32, "Auxiliary loss weight.", "1/32")
    ema_decay: float = doc_field(0.99, "Decay of the moving average of latent firing frequency "
                                 "(aux_zipf).")
    dead_tokens: int | None = doc_field(
        None, "A latent not active for this many training tokens counts as dead for the auxiliary "
        "loss (and in the run's training-time dead count). The default scales with the run: Gao "
        "et al.'s 10M tokens belong to runs of billions, and a 4M-token run would never reach it.",
        "min(10M, tokens / 20), at least one batch")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("tokens", "batch_size", "dead_tokens", "k_aux"):
            check_number(name, getattr(self, name), 1)
        for name in ("warmup_steps", "topk_warmup_steps", "auxk_coef", "l1_coefficient", "l0_controller"):
            check_number(name, getattr(self, name), 0)
        for name in ("l0_coefficient", "jumprelu_bandwidth"):
            check_number(name, getattr(self, name), 0, strict_minimum=True)
        check_number("lr", self.lr, 0, strict_minimum=True)
        check_number("adam_eps", self.adam_eps, 0, strict_minimum=True)
        if self.tokens < self.batch_size:
            raise SaelabError(f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size}); "
                              "raise tokens or lower batch_size")
        if self.aux not in ("auxk", "aux_zipf"):
            raise SaelabError(f"unknown auxiliary loss {self.aux!r}; use auxk or aux_zipf")
        check_number("ema_decay", self.ema_decay)  # finite; the range below
        check_number("decay_fraction", self.decay_fraction)
        if not 0 <= self.ema_decay < 1:
            raise SaelabError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.decay_fraction <= 1:
            raise SaelabError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")

    def dead_window(self) -> int:
        """`dead_tokens`, or the default rule: 1/20 of the run (as the allocator study used),
        capped at Gao et al.'s 10M and at least one batch (latents are counted per batch)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(DEAD_TOKENS_CAP, self.tokens // 20))

    def learning_rate(self, n_latents: int, d_in: int) -> float:
        """`lr`, or the default rule. Gao et al.'s 2e-4 / sqrt(n / 2^14) was fit on inputs of
        width 768 and more; at d_in = 128 the allocator sweep's best lr is ~14x higher (8e-3 at
        n = 2048, 1.6e-2 to 3.2e-2 at n = 512). The factor (768 / d_in)^1.5 joins the two
        measured widths; between them it is interpolated, not measured, and below 128 it is
        held at 128's (~14.7x) rather than extrapolated."""
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(n_latents / 2**14) * min(6.0, max(1.0, 768 / d_in)) ** 1.5


@dataclass(frozen=True)
class RunConfig:
    """The run around training: output, seed, device, logging, checkpoints, the end-of-run eval window."""

    out: str = doc_field("runs/sae", "Output directory for the dictionary (sae.safetensors, cfg.json) "
                         "and metrics.", path=True)
    seed: int = doc_field(0, "Seed for init, data order and shuffling.")
    device: str = doc_field("cpu", "Torch device.")
    log_every: int = doc_field(20, "Steps between metric records.")
    checkpoint_every: int = doc_field(500, "Steps between checkpoints (0: only at the end); "
                                      "--resume continues from the latest one exactly.")
    eval_tokens: int = doc_field(2**15, "Held-out tokens for the end-of-run evaluation.")
    wandb: bool = doc_field(False, "Also log to Weights & Biases (offline into OUT/wandb without an "
                            "account; WANDB_MODE=online to sync live); local JSON logs are always "
                            "written.")
    wandb_project: str = doc_field("saelab", "The wandb project name.")
    overwrite: bool = doc_field(False, "Allow writing into a non-empty output directory.")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("eval_tokens", "log_every"):
            check_number(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "seed"):
            check_number(name, getattr(self, name), 0)
        check_device(self.device)


GROUPS = {"source": SourceConfig, "sae": DictionaryConfig, "optim": OptimConfig, "run": RunConfig}
PANELS = {"source": "Source", "sae": "Dictionary", "optim": "Optimisation", "run": "Run"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, in four groups. Defaults train a TopK SAE on the shipped
    zoo model.

    Field names are unique across groups, so the flat name is the interface outside Python:
    `saelab train --k 16`, config files (flat, or grouped as `sae: {k: 16}`), cfg.json and
    checkpoints. In Python, `TrainConfig.of(k=16, out="runs/x")` builds from flat names and
    `cfg.sae.k` reads one. Each field's documentation is its `doc` metadata (`doc_field`);
    the `saelab train` command, its flags, defaults and help are generated from the groups.
    """

    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    sae: DictionaryConfig = dataclasses.field(default_factory=DictionaryConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise SaelabError(f"TrainConfig.{name} must be a {cls.__name__}; build configs "
                                  "from flat field names with TrainConfig.of(...)")
        self.check_transcoder()
        self.check_threshold_warmup()
        self.check_memory()  # before the model opens: a lower bound

    def check_threshold_warmup(self) -> None:
        """Learned thresholds are set when the top-k warmup ends; a run no longer than it would
        save a plain ReLU."""
        steps, warmup = self.optim.tokens // self.optim.batch_size, self.optim.topk_warmup_steps
        if self.sae.kind.learns_thresholds and steps <= warmup:
            raise SaelabError(f"{self.sae.allocator} learns its thresholds after "
                              f"--topk-warmup-steps={warmup}, but this run has {steps} steps (tokens / "
                              "batch_size); lower --topk-warmup-steps or raise --tokens")

    def check_transcoder(self) -> None:
        """--skip needs --target-hook, which needs one --hook that comes before it."""
        target, hook = self.source.target_hook, self.source.hook
        if target is None:
            if self.sae.skip:
                raise SaelabError("--skip adds a skip connection to a transcoder; also pass "
                                  "--target-hook (the hook to reconstruct), or drop --skip")
            return
        hooks = [hook] if isinstance(hook, str) else list(hook or [])
        if len(hooks) != 1:
            raise SaelabError(f"--target-hook needs exactly one --hook (the transcoder's input), got "
                              f"{len(hooks)}")
        check_hook_order(hooks[0], target)

    @staticmethod
    def fields() -> dict[str, tuple[str, dataclasses.Field]]:
        """flat field name -> (its group, the field), in group order."""
        return {f.name: (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}

    @classmethod
    def panels(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """flat field name -> (its group's title, the field): how `saelab train --help` lists
        them."""
        return {name: (PANELS[group], f) for name, (group, f) in cls.fields().items()}

    @classmethod
    def of(cls, **values) -> TrainConfig:
        """A config from flat field names (as flags, config files and cfg.json spell them)."""
        fields = cls.fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SaelabError(f"unknown training config field(s) {unknown}; known: {sorted(fields)}")
        grouped: dict[str, dict] = {group: {} for group in GROUPS}
        for name, value in values.items():
            grouped[fields[name][0]][name] = value
        return cls(**{group: GROUPS[group](**kw) for group, kw in grouped.items()})

    def flat(self) -> dict:
        """Every field by its flat name: what cfg.json, checkpoints and loggers record."""
        return {name: getattr(getattr(self, group), name) for name, (group, _) in self.fields().items()}

    def replace(self, **values) -> TrainConfig:
        """A copy with some fields (flat names) changed."""
        return TrainConfig.of(**{**self.flat(), **values})

    def check_latents(self, d_in: int) -> None:
        """k and k_aux fit the dictionary this config gives a `d_in`-wide hook (known once the
        model or cache is open, before any training)."""
        n = self.sae.latents(d_in)
        for name, value in (("k", self.sae.k), ("k_aux", self.optim.k_aux)):
            if (value or 0) > n:
                raise SaelabError(f"{name}={value} is larger than the dictionary "
                                  f"({n} latents for d_in={d_in}); choose {name} <= {n}")
        allocators.check_widths(self.sae.widths, n, self.sae.kind)
        self.check_memory(d_in)

    def check_memory(self, d_in: int | None = None) -> None:
        """One SAE of this config on a `d_in`-wide hook fits the run's device, else one line
        with the estimate: float32 weights with their gradients and Adam's two moments, the
        step's (batch, n_latents) matrices (`Allocator.step_matrices`) and, on the fly, the activation
        buffer. Each hook of a multi-hook run is checked alone. Without `d_in` (before the
        model or cache opens) the estimate takes d_in = 1: a lower bound."""
        known, d_in = d_in is not None, d_in or 1
        dic, opt, src = self.sae, self.optim, self.source
        size = "n_latents" if dic.n_latents is not None else "expansion"
        n, batch = dic.latents(d_in), opt.batch_size
        grads = 2 if dic.kind.needs_grad else 1
        matrices = dic.kind.step_matrices
        costs = [
            Cost("weights, gradients and Adam state", 16 * (2 * n * d_in + n + d_in), (size,)),
            Cost("(batch_size, n_latents) step matrices", 4 * matrices * batch * n, (size, "batch_size")),
            Cost("batch activations", 8 * grads * batch * d_in, ("batch_size",)),
        ]
        values = {size: getattr(dic, size), "batch_size": batch}
        if src.cache is None:
            costs.append(Cost("activation buffer", 4 * grads * src.buffer_tokens * d_in, ("buffer_tokens",)))
            values["buffer_tokens"] = src.buffer_tokens
        check_memory(costs, values, f"d_in {d_in}" if known else "d_in not yet known, taken as 1",
                     device=self.run.device, lower_bound=not known)

    @classmethod
    def from_file_and_flags(cls, path: str | None, flags: dict) -> TrainConfig:
        """Fields from a YAML/JSON file (if any; flat or grouped), overridden by flags that were
        given (not None)."""
        values = _flatten(_read_config_file(Path(path))) if path is not None else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        fields = cls.fields()
        return cls.of(**{k: _coerce(k, v, str(fields[k][1].type)) if k in fields else v
                         for k, v in values.items()})


def _read_config_file(p: Path) -> dict:
    if not p.exists():
        raise SaelabError(f"config file {p} does not exist")
    try:
        text = p.read_text()
        values = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise SaelabError(f"config file {p} does not parse ({type(e).__name__})") from None
    if not isinstance(values, dict):
        raise SaelabError(f"config file {p} must hold a mapping of field names to values")
    return values


def _flatten(values: dict) -> dict:
    """A grouped mapping (`sae: {k: 16}`) as flat names; flat entries pass through."""
    flat = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


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
