"""Checkpoints: one safetensors file per run (tensors + JSON metadata) from which a run resumes
exactly where it stopped (same batches, same optimiser state, same random state)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.storage.files import read_safetensors, write_safetensors
from saelab.training.config import TrainConfig
from saelab.training.trainer import Trainer

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(path: Path, trainers: dict[str, Trainer], stream, cfg: TrainConfig, seen: int,
                    log: list[dict], world: World) -> None:
    """Write `path` atomically (never half-written): every trainer's state, every rank's data
    position (gathered; only rank 0 writes), the torch RNG, tokens seen and the metric log."""
    streams = world.gather_object(stream.state_dict())
    if not world.is_main:
        return
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    extras = {}
    for hook, trainer in trainers.items():
        state, extras[hook] = trainer.state_dict()
        tensors.update({f"{hook}/{k}": v for k, v in state.items()})
    meta = {"config": cfg.flat(), "trainers": extras, "streams": streams,
            "seen": seen, "log": log}
    write_safetensors(path, tensors, metadata={"saelab_checkpoint": json.dumps(meta)})


def read_checkpoint(run: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a run's checkpoint, or a clear error."""
    path = Path(run) / CHECKPOINT_FILE
    if not path.exists():
        raise SaelabError(f"no checkpoint to resume at {path}; was the run started with saelab train?")
    tensors, metadata = read_safetensors(path, what="checkpoint")
    try:
        meta = json.loads(metadata["saelab_checkpoint"])
    except (KeyError, json.JSONDecodeError) as e:
        raise SaelabError(f"checkpoint {path} has no valid saelab metadata ({e})") from None
    return tensors, meta


def restore(saved: tuple[dict[str, torch.Tensor], dict], trainers: dict[str, Trainer], stream,
            world: World, run: Path) -> tuple[int, list[dict]]:
    """Load a checkpoint into `trainers`, this rank's `stream` and the torch RNG; returns
    (tokens seen, metric log so far)."""
    tensors, meta = saved
    for hook, trainer in trainers.items():
        prefix = f"{hook}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        trainer.load_state_dict(own, meta["trainers"][hook])
    if len(meta["streams"]) != world.size:
        raise SaelabError(
            f"run {run} was checkpointed by {len(meta['streams'])} process(es); resume it with as many"
        )
    stream.load_state_dict(meta["streams"][world.rank])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["seen"], meta["log"]


def resume_config(run: str | Path) -> TrainConfig:
    """The config a run was started with (from its checkpoint), pointed at that run."""
    _, meta = read_checkpoint(run)
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not set(config) <= set(TrainConfig.fields()):
        raise SaelabError(f"checkpoint {Path(run) / CHECKPOINT_FILE} holds no valid training config; "
                          "it cannot be resumed (start a new run)")
    return TrainConfig.of(**{**config, "out": str(run)})
