"""A training run: set up (data, SAEs, resume or init, sinks), fit (the step loop with logs and
checkpoints), finish (save each dictionary, hand it to an optional evaluation, tell the sinks).

`train(cfg)` drives one. Evaluation lives above training (`saelab.cli.pipeline` composes the
end-of-run eval); it comes in through `finish(evaluate=...)`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saelab import __version__
from saelab.distributed import World, init
from saelab.sae import SAE, SAEConfig
from saelab.sae_init import init_sae
from saelab.storage.files import check_output_dir
from saelab.storage.lock import hold
from saelab.training.checkpoint import CHECKPOINT_FILE, read_checkpoint, restore, save_checkpoint
from saelab.training.config import TrainConfig
from saelab.training.sinks import JsonLog, Sink, WandbSink
from saelab.training.sources import Sources, open_sources, unpack
from saelab.training.trainer import Trainer

CALIBRATION_BATCHES = 16


@dataclass
class TrainResult:
    """What a run produced for one hook: the SAE, where it lives, and its summary numbers."""

    sae: SAE
    out: Path
    summary: dict


Evaluate = Callable[[SAE, Path, Sources], tuple[dict, dict]]
"""(sae, its directory, the run's sources) -> (entries for the summary, the full report)."""


class Run:
    """One training run of one SAE per hook, all fed by one stream of activations."""

    def __init__(self, cfg: TrainConfig, resume: bool, world: World):
        self.cfg, self.world, self.out = cfg, world, Path(cfg.run.out)
        if not resume and world.is_main:
            check_output_dir(self.out, cfg.run.overwrite)
        saved = read_checkpoint(self.out) if resume else None
        torch.manual_seed(cfg.run.seed)
        self.src = open_sources(cfg, world)
        for d_in in self.src.dims.values():
            cfg.check_latents(d_in)
        self.hooks = list(self.src.dims)
        self.steps = max(1, cfg.optim.tokens // (cfg.optim.batch_size * world.size))
        self.trainers = {h: Trainer(self._new_sae(h, d_in), cfg.optim, self.steps, world, cfg.sae.k)
                         for h, d_in in self.src.dims.items()}
        self.seen = 0
        records: list[dict] = []
        if saved is None:
            self.batches = self._init_from_first_batch()
        else:
            self.seen, records = restore(saved, self.trainers, self.src.stream, world, self.out)
            self.batches = iter(self.src.stream)
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.json = JsonLog(cfg, records)
        self.sinks: list[Sink] = [self.json]
        if cfg.run.wandb and world.is_main:
            self.sinks.append(WandbSink(cfg, self.out))
        self.seconds, self.seen_at_start = 0.0, self.seen

    def _new_sae(self, hook: str, d_in: int) -> SAE:
        cfg, dic, src = self.cfg, self.cfg.sae, self.src
        sae_cfg = SAEConfig(
            d_in=d_in, n_latents=dic.latents(d_in), k=dic.k if dic.kind.budget else 0,
            allocator=dic.allocator, beta=dic.beta, grad_score=dic.grad_score, capacity=dic.capacity,
            zipf_alpha=dic.zipf_alpha, matryoshka=dic.widths, hook=hook, target_hook=src.target,
            d_out=src.d_out, skip=dic.skip, model=src.model.spec,
            processing=src.model.processing, data=src.heldout.spec,
            context_length=src.heldout.context_length,
            train_tokens=self.steps * cfg.optim.batch_size * self.world.size,
            eval_tokens=cfg.run.eval_tokens, saelab_version=__version__,
        )
        with torch.random.fork_rng(devices=[]):  # the random init is replaced by `init_sae`
            return SAE(sae_cfg, device=cfg.run.device)

    def _init_from_first_batch(self) -> Iterator:
        """Initialise every SAE from the first batch (rank 0's init, broadcast); the batch is
        then trained on like any other."""
        batches = iter(self.src.stream)
        first = next(batches)
        assert isinstance(first, dict), "streams over a list of hooks yield {hook: batch}"
        for h, trainer in self.trainers.items():
            x, _, y = self._batch(first, h)
            init_sae(trainer.sae, x, self.cfg.run.seed,
                     l0=None if self.cfg.sae.kind.budget else self.cfg.sae.k, target=y)
            for t in trainer.sae.state_dict().values():
                self.world.broadcast_(t)
        return itertools.chain([first], batches)

    def _batch(self, batch: dict, hook: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                      torch.Tensor | None]:
        """(x, grad, target) of one hook's dictionary on `device`: a transcoder's target is its
        target hook's rows of the same tokens, and its gradient (gradient_topk) the loss's
        gradient w.r.t. that target, the activation it replaces; an SAE's target is None (x)."""
        device, target = self.cfg.run.device, self.src.target
        x, grad = unpack(batch[hook], device)
        if target is None:
            return x, grad, None
        y, grad = unpack(batch[target], device)
        return x, grad, y

    def fit(self) -> None:
        """Train to `steps`, logging every `log_every` steps and checkpointing; then calibrate
        batch-level SAEs' inference thresholds."""
        cfg, world = self.cfg, self.world
        desc = f"train {self.hooks[0]}" if len(self.hooks) == 1 else f"train {len(self.hooks)} hooks"
        bar = tqdm(total=self.steps * cfg.optim.batch_size * world.size, initial=self.seen, unit="tok",
                   unit_scale=True, desc=desc, disable=not world.is_main)
        start, self.seen_at_start = time.perf_counter(), self.seen
        for step in range(next(iter(self.trainers.values())).step_count, self.steps):
            batch = next(self.batches)
            losses = {}
            for h, trainer in self.trainers.items():
                x, grad, y = self._batch(batch, h)
                losses[h] = trainer.step(x, grad, y)
            self.seen += x.shape[0] * world.size
            bar.update(x.shape[0] * world.size)
            if step % cfg.run.log_every == 0 or step == self.steps - 1:
                self._record(step, losses, start, bar)
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                self._checkpoint()
        bar.close()
        self.seconds = time.perf_counter() - start
        self._checkpoint()
        if next(iter(self.trainers.values())).sae.cfg.batch_level:
            calibration = [next(self.batches) for _ in range(CALIBRATION_BATCHES)]
            for h, trainer in self.trainers.items():
                trainer.calibrate_thresholds([unpack(b[h], cfg.run.device)[0] for b in calibration])

    def _prefix(self, hook: str) -> str:
        return "" if len(self.hooks) == 1 else f"{hook}/"

    def _record(self, step: int, losses: dict[str, dict[str, torch.Tensor]], start: float,
                bar: tqdm) -> None:
        rec = {"step": step, "tokens": self.seen,
               "lr": self.trainers[self.hooks[0]].opt.param_groups[0]["lr"],
               "tokens_per_s": (self.seen - self.seen_at_start) / (time.perf_counter() - start)}
        for h, vals in losses.items():
            rec.update({self._prefix(h) + k: v.item() for k, v in vals.items()})
        for sink in self.sinks:
            sink.log(rec, step)
        bar.set_postfix_str("  ".join(
            f"{'' if len(self.hooks) == 1 else h + ' '}fvu {v['fvu'].item():.3f} l0 {v['l0'].item():.1f} "
            f"dead {v['dead_frac'].item():.1%}" for h, v in losses.items()))

    def _checkpoint(self) -> None:
        save_checkpoint(self.out / CHECKPOINT_FILE, self.trainers, self.src.stream, self.cfg,
                        self.seen, self.json.records, self.world)

    def dirs(self) -> dict[str, Path]:
        """One dictionary directory per hook: `out` itself for one hook, `out/HOOK` for several."""
        if len(self.hooks) == 1:
            return {self.hooks[0]: self.out}
        return {h: self.out / h for h in self.hooks}

    def finish(self, evaluate: Evaluate | None = None) -> dict[str, TrainResult]:
        """Put every SAE in eval() mode; rank 0 saves each, evaluates it if asked, and hands
        the summary to the sinks. Every rank returns {hook: TrainResult} (the SAEs are equal
        across ranks; only rank 0's summaries carry an evaluation)."""
        results = {}
        for h, path in self.dirs().items():
            sae = self.trainers[h].sae.eval()  # inference from here on: thresholds, not the batch
            summary = self._summary(h, path)
            if self.world.is_main:
                sae.save(path)
                extra, report = evaluate(sae, path, self.src) if evaluate else ({}, None)
                summary.update(extra)
                for sink in self.sinks:
                    sink.result(path, summary, report, self._prefix(h))
            results[h] = TrainResult(sae, path, summary)
        if self.world.is_main:
            for sink in self.sinks:
                sink.close()
        self.world.barrier()
        self.world.close()
        return results

    def _summary(self, hook: str, path: Path) -> dict:
        sae = self.trainers[hook].sae
        return {
            "dictionary": str(path), "model": self.src.model.spec, "hook": hook,
            **({"target_hook": sae.cfg.target_hook, "skip": sae.cfg.skip} if sae.cfg.transcoder else {}),
            "d_in": sae.cfg.d_in,
            "n_latents": sae.cfg.n_latents, "k": sae.cfg.k, "allocator": sae.cfg.allocator,
            "train_tokens": self.seen, "train_seconds": round(self.seconds, 2),
            "tokens_per_s": round((self.seen - self.seen_at_start) / self.seconds, 1),
            "lr": self.trainers[hook].lr,
            **self._training_dead(self.trainers[hook]),
        }

    def _training_dead(self, trainer: Trainer) -> dict:
        """The share of latents not active in the last `dead_tokens` training tokens, with that
        window; None when the run was shorter than the window (nothing could count as dead)."""
        frac = trainer.dead().float().mean().item() if self.seen >= trainer.dead_tokens else None
        return {"train_dead_frac": frac, "train_dead_window": trainer.dead_tokens}


def train(cfg: TrainConfig, resume: bool = False,
          evaluate: Evaluate | None = None) -> dict[str, TrainResult]:
    """Train one SAE per hook of `cfg` from one stream of activations (one forward pass).

    Writes each dictionary directory (`sae.safetensors`, `cfg.json`, `metrics.json`):
    `cfg.run.out` for a single hook, `cfg.run.out/HOOK` for a list of hooks, and returns
    {hook: TrainResult}. A checkpoint (`cfg.run.out/checkpoint.safetensors`) is written every
    `cfg.run.checkpoint_every` steps and at the end; with `resume`, training continues from it
    exactly where it stopped (same batches, same optimiser state: the final weights equal an
    uninterrupted run's). `resume_config(run)` gives the run's own config. `evaluate` (see
    `saelab.cli.pipeline`) adds an evaluation of each dictionary to its summary.
    """
    world = init(cfg.run.device)
    if not resume and world.is_main:
        _check_out(cfg)
    with hold(cfg.run.out) if world.is_main else nullcontext():  # one writer per run directory
        run = Run(cfg, resume, world)
        run.fit()
        return run.finish(evaluate)


def _check_out(cfg: TrainConfig) -> None:
    """Refuse an output the run cannot take before the lock file exists (a refused run leaves
    no trace) and before any model loads: the run directory and, for several hooks, each
    hook's dictionary directory in it (`Run.dirs`)."""
    out = Path(cfg.run.out)
    check_output_dir(out, cfg.run.overwrite)
    hooks = cfg.source.hook if isinstance(cfg.source.hook, list) else []
    for hook in hooks if len(hooks) > 1 else []:
        check_output_dir(out / hook, overwrite=True)  # a file where a dictionary directory goes
