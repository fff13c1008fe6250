"""`run`: everything `saelab sparsity` reports, in one call, with every input checked first."""

from __future__ import annotations

import time

from saelab.data import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.measure import check_args, measure, mlp_hooks, resolve
from saelab.evals.sparsity.modes import DEFAULT_DENSITIES, MODES, check_densities, check_modes, sweep
from saelab.models import HookedModel


def run(
    model: HookedModel | str = "zoo:pystdlib-4l",
    data: TokenData | str | None = None,
    tokens: int = 65536,
    threshold: float | None = None,
    batch_rows: int = 32,
    modes: tuple[str, ...] = MODES,
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    sweep_tokens: int = 16384,
    calibration_tokens: int = 16384,
    device: str = "cpu",
) -> dict:
    """`measure`, then (unless `modes` is empty) the sparsification sweep (`modes.sweep`).

    `data` names the held-out text; the sweep calibrates its thresholds on the same spec's train
    split.
    """
    check_args(tokens, batch_rows, threshold)
    if modes:
        check_modes(modes)
        check_densities(densities)
    if sweep_tokens < 1 or calibration_tokens < 1:
        raise SaelabError("sweep and calibration token counts must be positive")
    start = time.perf_counter()
    model, heldout = resolve(model, data, device=device)
    mlp_hooks(model)
    report = measure(model, heldout, tokens, threshold, batch_rows)
    if modes:
        train = TokenData(heldout.spec, "train", heldout.context_length, heldout.seed)
        report["modes"] = sweep(model, heldout, train, modes, densities, sweep_tokens,
                                calibration_tokens, batch_rows)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report
