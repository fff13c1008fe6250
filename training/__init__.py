"""SAE training: `train(TrainConfig.of(...))` runs the loop and writes a dictionary directory per
hook; `saelab.cli.pipeline.train_and_evaluate` adds the end-of-run evaluation."""

from saelab.training.checkpoint import resume_config
from saelab.training.config import DictionaryConfig, OptimConfig, RunConfig, SourceConfig, TrainConfig
from saelab.training.run import Run, TrainResult, train
from saelab.training.trainer import Trainer

__all__ = ["DictionaryConfig", "OptimConfig", "Run", "RunConfig", "SourceConfig", "TrainConfig",
           "TrainResult", "Trainer", "resume_config", "train"]
