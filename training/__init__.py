"""SAE training: `train(TrainConfig(...))` runs the loop and writes a dictionary directory."""

from saelab.training.config import TrainConfig
from saelab.training.trainer import Trainer, TrainResult, resume_config, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "resume_config", "train"]
