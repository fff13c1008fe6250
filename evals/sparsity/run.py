"""`run`: everything `saelab sparsity` reports, in one call, with every input checked first."""

from __future__ import annotations

import time

from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.emergence import checkpoint_dirs, over_training
from saelab.evals.sparsity.measure import check_args, measure, resolve
from saelab.evals.sparsity.modes import DEFAULT_DENSITIES, MODES, check_densities, check_modes, sweep
from saelab.evals.sparsity.predictor import check_predictor_args, evaluate_predictors, train_predictors
from saelab.models import HookedModel
from saelab.zoo import DEFAULT_MODEL


def run(
    model: HookedModel | str = DEFAULT_MODEL,
    data: TokenData | str | None = None,
    tokens: int = 65536,
    threshold: float | None = None,
    batch_rows: int = 32,
    modes: tuple[str, ...] = MODES,
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    sweep_tokens: int = 16384,
    calibration_tokens: int = 16384,
    predictor: bool = True,
    predictor_tokens: int = 16384,
    predictor_rank: int | None = None,
    target_recall: float = 0.95,
    checkpoints: bool = False,
    checkpoint_tokens: int = 8192,
    device: str = "cpu",
) -> dict:
    """`measure`, then the sparsification sweep (`modes.sweep`, unless `modes` is empty), then
    the active-set predictor (`predictor`, unless `predictor` is False).

    `data` names the held-out text; thresholds are calibrated and predictors trained on the same
    spec's train split. The sweep and the predictor are scored on `sweep_tokens` held-out tokens.
    With `checkpoints`, `model` must be a spec (zoo name or directory) whose build kept training
    checkpoints: each is measured on `checkpoint_tokens` held-out tokens (`emergence`).
    """
    check_args(tokens, batch_rows, threshold)
    if modes:
        check_modes(modes)
        check_densities(densities)
    if sweep_tokens < 1 or calibration_tokens < 1:
        raise SaelabError("sweep and calibration token counts must be positive")
    if predictor:
        check_predictor_args(predictor_tokens, predictor_rank, target_recall)
    if checkpoints:
        if not isinstance(model, str):
            raise SaelabError("checkpoints need the model's spec (zoo:NAME or its directory)")
        if checkpoint_tokens < 1:
            raise SaelabError(f"checkpoint tokens must be positive, got {checkpoint_tokens}")
        checkpoint_dirs(model)
    start = time.perf_counter()
    model, heldout = resolve(model, data, device=device)
    report = measure(model, heldout, tokens, threshold, batch_rows)
    train = TokenData(heldout.spec, "train", heldout.context_length, heldout.seed)
    if modes:
        report["modes"] = sweep(model, heldout, train, modes, densities, sweep_tokens,
                                calibration_tokens, batch_rows)
    if predictor:
        preds, seen = train_predictors(model, train, predictor_tokens, predictor_rank, target_recall,
                                       threshold, batch_rows=batch_rows)
        report["predictor"] = {"train_tokens": seen, "target_recall": target_recall,
                               **evaluate_predictors(model, preds, heldout, sweep_tokens, threshold,
                                                     batch_rows)}
    if checkpoints:
        report["checkpoints"] = over_training(model.spec, heldout, checkpoint_tokens, threshold,
                                              batch_rows, device)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report
