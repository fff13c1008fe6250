"""Where a run's metric records and results go: the local JSON log (always) and wandb (asked
for). Each sink sees every record, each dictionary's final summary, and the run's end."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from saelab.storage.files import write_json
from saelab.training.config import TrainConfig

METRICS_FILE = "metrics.json"


class Sink:
    """The interface; a sink overrides what it uses."""

    def log(self, record: dict, step: int) -> None:
        """One metric record (losses, lr, throughput) of training step `step`."""

    def result(self, path: Path, summary: dict, report: dict | None, prefix: str) -> None:
        """A finished dictionary at `path`: its summary, and its eval report if one was run;
        `prefix` tells the hooks of a multi-hook run apart ("" for one hook)."""

    def close(self) -> None:
        """The run is over."""


class JsonLog(Sink):
    """`metrics.json` in each dictionary directory: the config, the summary and every record.
    The records also travel in checkpoints, so a resumed run's log is whole."""

    def __init__(self, cfg: TrainConfig, records: list[dict]):
        self.config, self.records = cfg.flat(), records

    def log(self, record: dict, step: int) -> None:
        self.records.append(record)

    def result(self, path: Path, summary: dict, report: dict | None, prefix: str) -> None:
        write_json(path / METRICS_FILE, {"config": self.config, "summary": summary, "log": self.records})


class WandbSink(Sink):
    """A wandb run in `out/wandb`; offline (no account needed, `wandb sync` later) unless
    WANDB_MODE says otherwise or an API key is set."""

    def __init__(self, cfg: TrainConfig, out: Path):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=cfg.run.wandb_project, name=out.name, dir=str(out),
                              mode=mode,  # type: ignore[arg-type]  # WANDB_MODE as set; wandb checks it
                              config=cfg.flat())

    def log(self, record: dict, step: int) -> None:
        self.run.log(record, step=step)

    def result(self, path: Path, summary: dict, report: dict | None, prefix: str) -> None:
        import wandb

        if report is not None:
            density = torch.tensor(report["latent_density"], dtype=torch.float64)
            live = density[density > 0].log10()
            # wandb's stub says Sequence; Histogram takes numpy arrays (np.histogram's input)
            hist = wandb.Histogram(live.numpy())  # type: ignore[arg-type]
            self.run.log({f"{prefix}heldout/log10_latent_density": hist,
                          f"{prefix}heldout/dead_latents": int((density == 0).sum())})
        self.run.summary.update({prefix + k: v for k, v in summary.items()})

    def close(self) -> None:
        self.run.finish()
