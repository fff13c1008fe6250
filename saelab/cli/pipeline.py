"""What `saelab train` runs: training, then the end-of-run evaluation of each dictionary on
held-out text and its report. Composed here, above both, so training never imports evals."""

from __future__ import annotations

from pathlib import Path

from saelab.evals import evaluate, write_report
from saelab.sae import SAE
from saelab.training import TrainConfig, TrainResult
from saelab.training import train as train_only
from saelab.training.sources import Sources

SUMMARY_KEYS = ("tokens", "fvu", "explained_variance", "l0", "dead_frac", "rare_frac", "ce_clean",
                "ce_sae", "delta_loss", "ce_loss_recovered", "kl_sae")


def train_and_evaluate(cfg: TrainConfig, resume: bool = False) -> dict[str, TrainResult]:
    """`saelab.training.train`, with each dictionary evaluated on `cfg.eval_tokens` held-out
    tokens (report files beside it; `heldout_*` entries in its summary and metrics.json)."""
    return train_only(cfg, resume, evaluate=heldout_eval)


def heldout_eval(sae: SAE, path: Path, src: Sources) -> tuple[dict, dict]:
    """Evaluate `sae` in the run's own model on its held-out text; write the report to `path`."""
    report = evaluate(sae, tokens=sae.cfg.eval_tokens, model=src.model, data=src.heldout)
    report["dictionary"] = str(path)
    write_report(report, path)
    return {f"heldout_{k}": report[k] for k in SUMMARY_KEYS}, report
