"""Where a run's data comes from: training batches (a cache or the model on the fly), the model
and the held-out text the end-of-run evaluation reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.data.activations import ModelStream
from saelab.data.cache import CacheStream, Manifest
from saelab.data.tokens import TokenData
from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.models import DEFAULT_PROCESSING, HookedModel, load_model
from saelab.training.config import TrainConfig
from saelab.zoo import DEFAULT_MODEL


@dataclass
class Sources:
    """Training batches, the model, and held-out text. A transcoder run's stream also carries
    its target hook's activations (the same tokens, one forward pass), which `dims` leaves out:
    they are what the dictionary reconstructs, not a hook it reads."""

    stream: CacheStream | ModelStream  # {hook: x} or {hook: (x, grad)} for gradient_topk
    model: HookedModel
    dims: dict[str, int]  # hook -> d_in, in the order given
    heldout: TokenData
    target: str | None = None  # a transcoder's target hook
    d_out: int | None = None  # its width


def hook_list(hook: str | list[str] | None, default: str) -> list[str]:
    """The hooks a config names (one or several, distinct), else `default`."""
    hooks = [hook] if isinstance(hook, str) else list(hook or [default])
    if len(set(hooks)) != len(hooks):
        raise SaelabError(f"hooks must be distinct, got {hooks}")
    return hooks


def open_sources(cfg: TrainConfig, world: World) -> Sources:
    """This process's share of the training data, from `cfg.source.cache` or the model on the fly."""
    cache = cfg.source.cache
    src = _from_cache(cfg, cache, world) if cache is not None else _on_the_fly(cfg, world)
    src.heldout.require_rows(src.model.tokenizer)  # the end-of-run eval reads it: fail now
    return src


def _from_cache(cfg: TrainConfig, cache: str, world: World) -> Sources:
    manifest = Manifest.read(Path(cache))
    if cfg.source.model is not None and cfg.source.model != manifest.model:
        raise SaelabError(
            f"cache {cache} was built from model {manifest.model}, not {cfg.source.model}; "
            "drop --model or pass the matching cache"
        )
    if cfg.source.processing not in (None, manifest.processing):
        raise SaelabError(
            f"cache {cache} holds {manifest.processing} activations, not "
            f"{cfg.source.processing}; drop --processing or build a cache with --processing "
            f"{cfg.source.processing}"
        )
    if manifest.data.get("split", "train") != "train":
        raise SaelabError(
            f"cache {cache} holds the {manifest.data['split']!r} split, which the end-of-run "
            "eval also reads; train on a cache built with --split train"
        )
    hooks = hook_list(cfg.source.hook, next(iter(manifest.hooks)))
    dims = {h: manifest.check_hook(h, Path(cache)) for h in hooks}
    target = cfg.source.target_hook
    d_out = None if target is None else manifest.check_hook(target, Path(cache))
    if len(manifest.shards) < world.size:
        raise SaelabError(
            f"cache {cache} has {len(manifest.shards)} shard(s) for {world.size} processes; "
            "each process needs at least one (rebuild with a smaller --shard-rows)"
        )
    mine = list(range(world.rank, len(manifest.shards), world.size))
    stream = CacheStream(cache, streamed(hooks, target), cfg.optim.batch_size, seed=cfg.run.seed,
                         shards=mine, with_grads=cfg.sae.kind.needs_grad, drop_last=True)
    data = TokenData(manifest.data["spec"], "heldout", manifest.data["context_length"], cfg.run.seed)
    model = load_model(manifest.model, cfg.run.device, processing=manifest.processing)
    return Sources(stream, model, dims, data, target, d_out)


def _on_the_fly(cfg: TrainConfig, world: World) -> Sources:
    model = load_model(cfg.source.model or DEFAULT_MODEL, cfg.run.device,
                       processing=cfg.source.processing or DEFAULT_PROCESSING)
    hooks = hook_list(cfg.source.hook, model.default_hook)
    target = cfg.source.target_hook
    model.check_hooks(streamed(hooks, target))
    dims = model.hook_dims(hooks)
    d_out = None if target is None else model.hook_dims([target])[target]
    ctx = model.check_context(cfg.source.context_length)
    data = TokenData(cfg.source.data, "train", ctx, cfg.run.seed, world.rank, world.size)
    stream = ModelStream(model, data, streamed(hooks, target), cfg.optim.batch_size, cfg.source.buffer_tokens,
                         seed=cfg.run.seed, with_grads=cfg.sae.kind.needs_grad)
    heldout = dataclasses.replace(data, split="heldout", rank=0, world=1)
    return Sources(stream, model, dims, heldout, target, d_out)


def streamed(hooks: list[str], target: str | None) -> list[str]:
    """The hooks a stream must carry: the dictionaries' inputs, and a transcoder's target."""
    return hooks + [target] if target is not None and target not in hooks else hooks


def unpack(batch, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, grad or None) of one hook's batch entry, on `device`."""
    x, grad = batch if isinstance(batch, tuple) else (batch, None)
    return x.to(device), None if grad is None else grad.to(device)
