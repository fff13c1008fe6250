"""The training loop: activations in, a dictionary directory and a metrics log out."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saelab import __version__
from saelab.cache import CacheStream, Manifest, ModelStream
from saelab.data import TokenData
from saelab.distributed import World, init
from saelab.errors import SaelabError
from saelab.evals import evaluate, write_report
from saelab.io import check_output_dir, read_safetensors, write_json, write_safetensors
from saelab.models import HookedModel, load_model
from saelab.sae import SAE, SAEConfig
from saelab.training.config import TrainConfig
from saelab.training.init import init_sae
from saelab.training.losses import auxk_loss, fvu, l1_penalty, underused
from saelab.zoo import DEFAULT_MODEL

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CALIBRATION_BATCHES = 16
SUMMARY_KEYS = ("tokens", "fvu", "explained_variance", "l0", "dead_frac", "ce_clean", "ce_sae",
                "delta_loss", "ce_loss_recovered", "kl_sae")


@dataclass
class TrainResult:
    """What a run produced: the SAE, where it lives, and its summary numbers."""

    sae: SAE
    out: Path
    summary: dict


def _lr_factor(step: int, steps: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = int(steps * (1 - cfg.decay_fraction))
    if step < decay_start or cfg.decay_fraction == 0:
        return warm
    return warm * max(0.0, (steps - step) / max(1, steps - decay_start))


@torch.no_grad()
def _remove_parallel_grad(sae: SAE) -> None:
    """Drop the gradient component along each (unit-norm) decoder row: it only changes norms."""
    w, g = sae.W_dec, sae.W_dec.grad
    g.addcmul_(w, torch.einsum("ij,ij->i", g, w).unsqueeze(1), value=-1)  # no (n, d) temporaries


def _adam(params: list[torch.nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Fused Adam (one pass per tensor instead of a dozen; CPU since torch 2.4), else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except RuntimeError:  # torch < 2.4 on CPU
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


@dataclass
class _Sources:
    """Where a run's data comes from: training batches, the model, and held-out text."""

    stream: CacheStream | ModelStream  # {hook: x} or {hook: (x, grad)} for gradient_topk
    model: HookedModel
    dims: dict[str, int]  # hook -> d_in, in the order given
    heldout: TokenData


def _hook_list(hook: str | list[str] | None, default: str) -> list[str]:
    hooks = [hook] if isinstance(hook, str) else list(hook or [default])
    if len(set(hooks)) != len(hooks):
        raise SaelabError(f"hooks must be distinct, got {hooks}")
    return hooks


def _sources(cfg: TrainConfig, world: World) -> _Sources:
    with_grads = cfg.allocator == "gradient_topk"
    if cfg.cache is not None:
        manifest = Manifest.read(Path(cfg.cache))
        if cfg.model is not None and cfg.model != manifest.model:
            raise SaelabError(
                f"cache {cfg.cache} was built from model {manifest.model}, not {cfg.model}; "
                "drop --model or pass the matching cache"
            )
        if manifest.data.get("split", "train") != "train":
            raise SaelabError(
                f"cache {cfg.cache} holds the {manifest.data['split']!r} split, which the end-of-run "
                "eval also reads; train on a cache built with --split train"
            )
        hooks = _hook_list(cfg.hook, next(iter(manifest.hooks)))
        dims = {h: manifest.check_hook(h, Path(cfg.cache)) for h in hooks}
        if len(manifest.shards) < world.size:
            raise SaelabError(
                f"cache {cfg.cache} has {len(manifest.shards)} shard(s) for {world.size} processes; "
                "each process needs at least one (rebuild with a smaller --shard-rows)"
            )
        mine = list(range(world.rank, len(manifest.shards), world.size))
        stream = CacheStream(cfg.cache, hooks, cfg.batch_size, seed=cfg.seed, shards=mine,
                             with_grads=with_grads, drop_last=True)
        data = TokenData(manifest.data["spec"], "heldout", manifest.data["context_length"], cfg.seed)
        model = load_model(manifest.model, cfg.device)
    else:
        model = load_model(cfg.model or DEFAULT_MODEL, cfg.device)
        hooks = _hook_list(cfg.hook, model.default_hook)
        model.check_hooks(hooks)
        dims = model.hook_dims(hooks)
        ctx = model.check_context(cfg.context_length)
        data = TokenData(cfg.data, "train", ctx, cfg.seed, world.rank, world.size)
        stream = ModelStream(model, data, hooks, cfg.batch_size, cfg.buffer_tokens, seed=cfg.seed,
                             with_grads=with_grads)
        data = dataclasses.replace(data, split="heldout", rank=0, world=1)
    return _Sources(stream, model, dims, data)


class Trainer:
    """One SAE, its optimiser and dead-latent counters; `step(x)` is one full training step.

    Kept apart from the data plumbing so benchmarks (and resumable runs) drive the exact step
    that training uses.
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, steps: int, world: World | None = None):
        self.sae, self.cfg, self.steps, self.world = sae, cfg, steps, world or World()
        self.lr = cfg.learning_rate(sae.cfg.n_latents)
        self.opt = _adam(list(sae.parameters()), self.lr, cfg.adam_eps)
        self.k_aux = cfg.k_aux or sae.cfg.d_in // 2
        n, device = sae.cfg.n_latents, sae.W_dec.device
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.freq = torch.full((n,), sae.cfg.k / n, device=device)  # EMA of firing frequency
        self.step_count = 0
        self._pre: torch.Tensor | None = None

    def step(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward, backward, optimiser update, decoder renormalisation; returns loss tensors.

        `grad` (B, d_in) is the LM-loss gradient w.r.t. x, used by gradient_topk's selection;
        it must be given for gradient_topk (silently training plain topk would hide broken wiring).
        """
        sae, cfg = self.sae, self.cfg
        if grad is None and sae.cfg.allocator == "gradient_topk":
            raise SaelabError("gradient_topk training got no loss gradient for its batch; train "
                              "from a cache built with --with-grads, or on the fly")
        for group in self.opt.param_groups:
            group["lr"] = self.lr * _lr_factor(self.step_count, self.steps, cfg)
        if self._pre is None or self._pre.shape[0] != x.shape[0]:
            self._pre = x.new_empty(x.shape[0], sae.cfg.n_latents)
        pre = sae.pre_acts(x, out=self._pre)  # reused every step; nothing keeps it past the step
        sel = sae.select(pre, grad, batch=True)
        vals = sae.encode_values(x, sel, pre)
        x_hat = sae.decode(sel.idx, vals)
        main = fvu(x, x_hat, self.world)
        dead = self.since_fired >= cfg.dead_tokens
        pool = underused(self.freq, dead) if cfg.aux == "aux_zipf" else dead
        aux = auxk_loss(sae, x, x_hat, pre, pool, self.k_aux, self.world)
        loss = main + cfg.auxk_coef * aux
        if sae.cfg.allocator == "relu":
            loss = loss + cfg.l1_coefficient * l1_penalty(sae, x, sel.idx, vals, self.world)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in sae.parameters():  # data parallel: every rank takes the mean gradient's step
            self.world.all_reduce_(p.grad, mean=True)
        _remove_parallel_grad(sae)
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            counts = torch.bincount(sel.idx[vals > 0], minlength=sae.cfg.n_latents).float()
            tokens = self.world.all_reduce_(torch.tensor(float(x.shape[0]), device=x.device))
            self.world.all_reduce_(counts)  # latent statistics over every rank's tokens
            self.since_fired += int(tokens)
            self.since_fired[counts > 0] = 0
            self.freq.lerp_(counts / tokens, 1 - cfg.ema_decay)
        self.step_count += 1
        reduce = self.world.all_reduce_  # data parallel: report the global batch's losses
        return {"fvu": reduce(main.detach().clone(), mean=True),
                "aux": reduce(aux.detach().clone(), mean=True),
                "l0": (vals > 0).sum(1).float().mean(), "dead_frac": dead.float().mean(),
                "aux_pool_frac": pool.float().mean()}

    @torch.no_grad()
    def calibrate_thresholds(self, batches: list[torch.Tensor]) -> None:
        """Inference thresholds of a batch-level SAE: each latent's selection boundary averaged
        over `batches` with the final weights (a moving average over training would lag behind
        weights that are still moving). A latent never selected gets +inf: it stays off."""
        total = torch.zeros_like(self.sae.threshold)
        count = torch.zeros_like(self.sae.threshold)
        for x in batches:
            boundary = self.sae.select(self.sae.pre_acts(x), batch=True).boundary
            ok = boundary.isfinite()
            total += torch.where(ok, boundary, 0.0)
            count += ok
        self.world.all_reduce_(total)
        self.world.all_reduce_(count)
        self.sae.threshold.copy_(torch.where(count > 0, total / count.clamp_min(1), float("inf")))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able extras): everything `step` reads, for an exact resume."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors["since_fired"], tensors["freq"] = self.since_fired, self.freq
        opt = self.opt.state_dict()
        for i, slots in opt["state"].items():
            for name, value in slots.items():
                tensors[f"opt.{i}.{name}"] = value
        return tensors, {"step_count": self.step_count, "param_groups": opt["param_groups"]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.since_fired.copy_(tensors["since_fired"])
        self.freq.copy_(tensors["freq"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
        self.step_count = extra["step_count"]


def _unpack(batch, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, grad = batch if isinstance(batch, tuple) else (batch, None)
    return x.to(device), None if grad is None else grad.to(device)


def _save_checkpoint(path: Path, trainers: dict[str, Trainer], stream, cfg: TrainConfig, seen: int,
                     log: list[dict], world: World) -> None:
    """One safetensors file (tensors + JSON metadata), replaced atomically: never half-written.

    Every rank's data position is gathered into it; only rank 0 writes.
    """
    streams = world.gather_object(stream.state_dict())
    if not world.is_main:
        return
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    extras = {}
    for hook, trainer in trainers.items():
        state, extras[hook] = trainer.state_dict()
        tensors.update({f"{hook}/{k}": v for k, v in state.items()})
    meta = {"config": dataclasses.asdict(cfg), "trainers": extras, "streams": streams,
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


def _out_dirs(out: Path, hooks: list[str]) -> dict[str, Path]:
    """One dictionary directory per hook: `out` itself for one hook, `out/HOOK` for several."""
    return {hooks[0]: out} if len(hooks) == 1 else {h: out / h for h in hooks}


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult | dict[str, TrainResult]:
    """Train one SAE per hook of `cfg` from one stream of activations (one forward pass).

    Writes each dictionary directory (`sae.safetensors`, `cfg.json`, `metrics.json`, eval
    report): `cfg.out` for a single hook (returns its `TrainResult`), `cfg.out/HOOK` for a list
    of hooks (returns {hook: TrainResult}). A checkpoint (`cfg.out/checkpoint.safetensors`) is
    written every `cfg.checkpoint_every` steps and at the end; with `resume`, training continues
    from it exactly where it stopped (same batches, same optimiser state: the final weights
    equal an uninterrupted run's). `resume_config(run)` gives the run's own config.
    """
    world = init(cfg.device)
    out = Path(cfg.out)
    if not resume and world.is_main:
        check_output_dir(out, cfg.overwrite)
    saved = read_checkpoint(out) if resume else None
    torch.manual_seed(cfg.seed)
    src = _sources(cfg, world)
    hooks = list(src.dims)
    steps = max(1, cfg.tokens // (cfg.batch_size * world.size))
    trainers = {}
    for h, d_in in src.dims.items():
        sae_cfg = SAEConfig(
            d_in=d_in, n_latents=cfg.latents(d_in), k=0 if cfg.allocator == "relu" else cfg.k,
            allocator=cfg.allocator, beta=cfg.beta, capacity=cfg.capacity,
            zipf_alpha=cfg.zipf_alpha, hook=h, model=src.model.spec, data=src.heldout.spec,
            context_length=src.heldout.context_length, train_tokens=steps * cfg.batch_size * world.size,
            eval_tokens=cfg.eval_tokens, saelab_version=__version__,
        )
        with torch.random.fork_rng(devices=[]):  # the random init is replaced by `init_sae`
            sae = SAE(sae_cfg, device=cfg.device)
        trainers[h] = Trainer(sae, cfg, steps, world)
    stream = src.stream
    log: list[dict] = []
    seen = 0
    if saved is not None:
        tensors, meta = saved
        for h, trainer in trainers.items():
            prefix = f"{h}/"
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            trainer.load_state_dict(own, meta["trainers"][h])
        if len(meta["streams"]) != world.size:
            raise SaelabError(
                f"run {out} was checkpointed by {len(meta['streams'])} process(es); resume it with as many"
            )
        stream.load_state_dict(meta["streams"][world.rank])
        torch.set_rng_state(tensors["rng.torch"])
        seen, log = meta["seen"], meta["log"]
        batches = iter(stream)
    else:
        batches = iter(stream)
        first = next(batches)
        for h, trainer in trainers.items():
            init_sae(trainer.sae, _unpack(first[h], cfg.device)[0], cfg.seed)
            for t in trainer.sae.state_dict().values():  # every rank starts from rank 0's init
                world.broadcast_(t)
        batches = itertools.chain([first], batches)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_FILE
    wb = _wandb_run(cfg, out) if cfg.wandb and world.is_main else None
    desc = f"train {hooks[0]}" if len(hooks) == 1 else f"train {len(hooks)} hooks"
    bar = tqdm(total=steps * cfg.batch_size * world.size, initial=seen, unit="tok", unit_scale=True,
               desc=desc, disable=not world.is_main)
    start, seen_at_start = time.perf_counter(), seen
    first_step = next(iter(trainers.values())).step_count
    for step in range(first_step, steps):
        batch = next(batches)
        losses = {}
        for h, trainer in trainers.items():
            x, grad = _unpack(batch[h], cfg.device)
            losses[h] = trainer.step(x, grad)
        seen += x.shape[0] * world.size
        bar.update(x.shape[0] * world.size)
        if step % cfg.log_every == 0 or step == steps - 1:
            rec = {"step": step, "tokens": seen, "lr": trainers[hooks[0]].opt.param_groups[0]["lr"],
                   "tokens_per_s": (seen - seen_at_start) / (time.perf_counter() - start)}
            for h, vals in losses.items():
                prefix = "" if len(hooks) == 1 else f"{h}/"
                rec.update({prefix + k: v.item() for k, v in vals.items()})
            log.append(rec)
            if wb is not None:
                wb.log(rec, step=step)
            bar.set_postfix_str("  ".join(
                f"{'' if len(hooks) == 1 else h + ' '}fvu {v['fvu'].item():.3f} l0 {v['l0'].item():.1f} "
                f"dead {v['dead_frac'].item():.1%}" for h, v in losses.items()))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, trainers, stream, cfg, seen, log, world)
    bar.close()
    seconds = time.perf_counter() - start
    _save_checkpoint(ckpt, trainers, stream, cfg, seen, log, world)
    if next(iter(trainers.values())).sae.cfg.batch_level:
        calibration = [next(batches) for _ in range(CALIBRATION_BATCHES)]
        for h, trainer in trainers.items():
            trainer.calibrate_thresholds([_unpack(b[h], cfg.device)[0] for b in calibration])
    if not world.is_main:  # rank 0 evaluates and writes; the others are done
        world.barrier()
        world.close()
        return {}
    results = {}
    for h, path in _out_dirs(out, hooks).items():
        sae = trainers[h].sae.eval()  # inference from here on: thresholds, not the batch
        sae.save(path)
        report = evaluate(sae, tokens=cfg.eval_tokens, model=src.model, data=src.heldout)
        report["dictionary"] = str(path)
        write_report(report, path)
        summary = {
            "dictionary": str(path), "model": src.model.spec, "hook": h, "d_in": sae.cfg.d_in,
            "n_latents": sae.cfg.n_latents, "k": sae.cfg.k, "allocator": sae.cfg.allocator,
            "train_tokens": seen, "train_seconds": round(seconds, 2),
            "tokens_per_s": round((seen - seen_at_start) / seconds, 1), "lr": trainers[h].lr,
            **{f"heldout_{k}": report[k] for k in SUMMARY_KEYS},
        }
        write_json(path / METRICS_FILE, {"config": dataclasses.asdict(cfg), "summary": summary,
                                         "log": log})
        if wb is not None:
            _wandb_finish(wb, summary, report, prefix="" if len(hooks) == 1 else f"{h}/")
        results[h] = TrainResult(sae, path, summary)
    if wb is not None:
        wb.finish()
    world.barrier()
    world.close()
    return results[hooks[0]] if isinstance(cfg.hook, str) or cfg.hook is None else results


def _wandb_run(cfg: TrainConfig, out: Path):
    """A wandb run in `out/wandb`; offline (no account needed, `wandb sync` later) unless
    WANDB_MODE says otherwise or an API key is set."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=cfg.wandb_project, name=out.name, dir=str(out), mode=mode,
                      config=dataclasses.asdict(cfg))


def _wandb_finish(run, summary: dict, report: dict, prefix: str) -> None:
    import wandb

    density = torch.tensor(report["latent_density"], dtype=torch.float64)
    live = density[density > 0].log10()
    run.log({f"{prefix}heldout/log10_latent_density": wandb.Histogram(live.numpy()),
             f"{prefix}heldout/dead_latents": int((density == 0).sum())})
    run.summary.update({prefix + k: v for k, v in summary.items()})


def resume_config(run: str | Path) -> TrainConfig:
    """The config a run was started with (from its checkpoint), pointed at that run."""
    _, meta = read_checkpoint(run)
    return dataclasses.replace(TrainConfig(**meta["config"]), out=str(run))
