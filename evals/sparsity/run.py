"""`run`: everything `saelab sparsity` reports, in one call, with every input checked first.

Its settings are one SparsityConfig (each field documented once: `saelab sparsity --help` shows
the same text); `SparsityCommandConfig` adds what the command reads and writes."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from saelab.checks import check_device, check_field_types, check_number, doc_field
from saelab.data.tokens import BUILTIN_STDLIB, TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.emergence import checkpoint_dirs, over_training
from saelab.evals.sparsity.measure import measure, resolve
from saelab.evals.sparsity.modes import DEFAULT_DENSITIES, MODES, check_densities, check_modes, sweep
from saelab.evals.sparsity.predictor import evaluate_predictors, train_predictors
from saelab.models import HookedModel
from saelab.zoo import DEFAULT_MODEL


@dataclass(frozen=True)
class SparsityConfig:
    """What `run` measures and sweeps. `modes` empty skips the sparsification sweep; the sweep
    and the predictor are scored on `sweep_tokens` held-out tokens."""

    tokens: int = doc_field(65536, "Held-out tokens to measure on (whole rows until at least "
                            "this many).")
    threshold: float | None = doc_field(None, "A neuron is active when |h| > this.",
                                        "0 (exact zeros) for ReLU MLPs, 0.01 for GELU/SiLU")
    batch_rows: int = doc_field(32, "Rows per forward pass; union-of-active groups are drawn "
                                "within one pass.")
    modes: tuple[str, ...] = doc_field(MODES, "Sparsification mode to sweep; repeat for several: "
                                       f"{', '.join(MODES)}.", "all", flag="mode")
    densities: tuple[float, ...] = doc_field(DEFAULT_DENSITIES, "Target density in (0, 1] for the "
                                             "sweep; repeat for several.", flag="density")
    sweep_tokens: int = doc_field(16384, "Held-out tokens per sweep point.")
    calibration_tokens: int = doc_field(16384, "Train tokens the threshold and CATS quantiles "
                                        "are calibrated on.")
    predictor: bool = doc_field(True, "Train and score the low-rank active-set predictor "
                                "(--no-predictor skips it).")
    predictor_tokens: int = doc_field(16384, "Train tokens the active-set predictor is fit on.")
    predictor_rank: int | None = doc_field(None, "Rank of each layer's predictor.", "d_model // 4")
    target_recall: float = doc_field(0.95, "Share of truly active neurons the predictor's cut "
                                     "keeps, in (0, 1] (set on train tokens).")
    checkpoints: bool = doc_field(False, "Also measure the model's training checkpoints (kept by "
                                  "`saelab zoo build` in DIR/checkpoints) and plot density "
                                  "against step.")
    checkpoint_tokens: int = doc_field(8192, "Held-out tokens per checkpoint.")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("tokens", "batch_rows", "sweep_tokens", "calibration_tokens",
                     "predictor_tokens", "predictor_rank", "checkpoint_tokens"):
            check_number(name, getattr(self, name), 1)
        check_number("threshold", self.threshold, 0)
        check_number("target_recall", self.target_recall, 0, 1, strict_minimum=True)
        check_modes(self.modes)
        check_densities(self.densities)


@dataclass(frozen=True)
class SparsityCommandConfig:
    """`saelab sparsity`: the model and text it measures, where the report goes, and `run`'s
    settings (`sparsity`, a SparsityConfig: its flags are listed under Measurement)."""

    model: str = doc_field(DEFAULT_MODEL, "Model spec: zoo:NAME, a local HF directory, or a hub "
                           "name.")
    data: str = doc_field(BUILTIN_STDLIB, "Token data whose held-out split is measured: "
                          "builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME.")
    context_length: int | None = doc_field(None, "Tokens per row.", "min(model context, 128)")
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig,
                                                 metadata={"panel": "Measurement"})
    out: str = doc_field("runs/sparsity", "Where to write sparsity.json, sparsity.md and the "
                         "PNGs.", path=True)
    overwrite: bool = doc_field(False, "Allow writing into a non-empty --out directory.")
    device: str = doc_field("cpu", "Torch device.")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_number("context_length", self.context_length, 2)
        check_device(self.device)

    def token_data(self) -> TokenData | str:
        """The held-out text as `run` takes it: the spec, or rows of `context_length`."""
        if self.context_length is None:
            return self.data
        return TokenData(self.data, "heldout", self.context_length)


def run(model: HookedModel | str = DEFAULT_MODEL, data: TokenData | str | None = None,
        config: SparsityConfig | None = None, device: str = "cpu", **settings) -> dict:
    """`measure`, then the sparsification sweep (`modes.sweep`, unless `modes` is empty), then
    the active-set predictor (unless `predictor` is False).

    Settings come from `config` (a SparsityConfig), with keyword `settings` (its field names,
    e.g. `run(model, tokens=4096, modes=())`) replacing some; all are checked before the model
    loads. `data` names the held-out text; thresholds are calibrated and predictors trained on
    the same spec's train split. With `checkpoints`, `model` must be a spec (zoo name or
    directory) whose build kept training checkpoints: each is measured on `checkpoint_tokens`
    held-out tokens (`emergence`).
    """
    cfg = dataclasses.replace(config or SparsityConfig(), **settings)
    if cfg.checkpoints:
        if not isinstance(model, str):
            raise SaelabError("checkpoints need the model's spec (zoo:NAME or its directory)")
        checkpoint_dirs(model)
    start = time.perf_counter()
    model, heldout = resolve(model, data, device=device)
    report = measure(model, heldout, cfg.tokens, cfg.threshold, cfg.batch_rows)
    train = TokenData(heldout.spec, "train", heldout.context_length, heldout.seed)
    if cfg.modes:
        report["modes"] = sweep(model, heldout, train, cfg.modes, cfg.densities, cfg.sweep_tokens,
                                cfg.calibration_tokens, cfg.batch_rows)
    if cfg.predictor:
        preds, seen = train_predictors(model, train, cfg.predictor_tokens, cfg.predictor_rank,
                                       cfg.target_recall, cfg.threshold, batch_rows=cfg.batch_rows)
        report["predictor"] = {"train_tokens": seen, "target_recall": cfg.target_recall,
                               **evaluate_predictors(model, preds, heldout, cfg.sweep_tokens,
                                                     cfg.threshold, cfg.batch_rows)}
    if cfg.checkpoints:
        report["checkpoints"] = over_training(model.spec, heldout, cfg.checkpoint_tokens,
                                              cfg.threshold, cfg.batch_rows, device)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report
