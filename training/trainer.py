"""One SAE's training step: forward, losses, backward, optimiser update, latent statistics."""

from __future__ import annotations

import torch

from saelab.allocators.base import topk
from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.sae import SAE
from saelab.schedule import lr_factor
from saelab.training.config import OptimConfig
from saelab.training.losses import auxk_loss, fvu, underused
from saelab.training.thresholds import LearnedThresholds


@torch.no_grad()
def _remove_parallel_grad(sae: SAE) -> None:
    """Drop the gradient component along each (unit-norm) decoder row: it only changes norms."""
    w, g = sae.W_dec, sae.W_dec.grad
    assert g is not None, "called after backward(), which gives W_dec a gradient"
    g.addcmul_(w, torch.einsum("ij,ij->i", g, w).unsqueeze(1), value=-1)  # no (n, d) temporaries


def _adam(params: list[torch.nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Fused Adam (one pass per tensor instead of a dozen; CPU since torch 2.4), else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except RuntimeError:  # torch < 2.4 on CPU
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


class _Loss(torch.nn.Module):
    """`Trainer.losses` as a module over the SAE's parameters, which is what
    DistributedDataParallel wraps (its forward arms the gradient all-reduce of the backward)."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.sae = trainer.sae
        self.thresholds = trainer.thresholds  # jumprelu's log theta: DDP reduces its gradient too
        self.trainer = trainer  # a plain attribute: not a module, no parameters of its own

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None,
                y: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return self.trainer.losses(x, grad, y)


class Trainer:
    """One SAE, its optimiser and dead-latent counters; `step(x)` is one full training step.

    Kept apart from the data plumbing so benchmarks (and resumable runs) drive the exact step
    that training uses.
    """

    def __init__(self, sae: SAE, cfg: OptimConfig, steps: int, world: World | None = None,
                 target_l0: int | None = None):
        """`target_l0`: the L0 a kind that learns its thresholds is steered to (its --k)."""
        self.sae, self.cfg, self.steps, self.world = sae, cfg, steps, world or World()
        self.lr = cfg.learning_rate(sae.cfg.n_latents, sae.cfg.d_in)
        self.thresholds = None
        if sae.cfg.kind.learns_thresholds:
            if not target_l0:
                raise SaelabError(f"{sae.cfg.allocator} training needs a target L0 (k >= 1)")
            self.thresholds = LearnedThresholds(sae, cfg, target_l0)
        extra = [] if self.thresholds is None else list(self.thresholds.parameters())
        self.opt = _adam([*sae.parameters(), *extra], self.lr, cfg.adam_eps)
        self.k_aux = cfg.k_aux or sae.cfg.out_dim // 2  # half the reconstructed width
        self.dead_tokens = cfg.dead_window()
        n, device = sae.cfg.n_latents, sae.W_dec.device
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.freq = torch.full((n,), sae.cfg.k / n, device=device)  # EMA of firing frequency
        self.step_count = 0
        self._pre: torch.Tensor | None = None
        self._loss = _Loss(self)
        self._ddp: torch.nn.Module | None = None

    def step(self, x: torch.Tensor, grad: torch.Tensor | None = None,
             y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward, backward, optimiser update, decoder renormalisation; returns loss tensors.

        `grad` (B, d_out) is the LM-loss gradient w.r.t. what is reconstructed, used by
        gradient_topk's selection; it must be given for gradient_topk (silently training plain
        topk would hide broken wiring). `y` (B, d_out): a transcoder's target, the target hook's
        activations of the same tokens (an SAE reconstructs x itself).
        """
        sae, cfg = self.sae, self.cfg
        if (y is None) == sae.cfg.transcoder:
            raise SaelabError(f"a {'transcoder' if sae.cfg.transcoder else 'sparse autoencoder'} "
                              f"training step {'needs' if sae.cfg.transcoder else 'takes no'} a target y")
        if grad is None and sae.cfg.kind.needs_grad:
            raise SaelabError(f"{sae.cfg.allocator} training got no loss gradient for its batch; train "
                              "from a cache built with --with-grads, or on the fly")
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_factor(self.step_count, self.steps, cfg.warmup_steps,
                                             cfg.decay_fraction)
        loss, parts = self._objective()(x, grad, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # data parallel: DDP averages the gradients over the ranks meanwhile
        _remove_parallel_grad(sae)
        self.opt.step()
        sae.normalize_decoder()
        l0 = (parts["vals"] > 0).sum(1).float().mean()
        if self.thresholds is not None:
            self.thresholds.after_step(sae, self.world.all_reduce_(l0.clone(), mean=True).item())
        sel, vals, main, aux, dead, pool = (parts[k] for k in ("sel", "vals", "main", "aux", "dead",
                                                               "pool"))
        with torch.no_grad():
            counts = torch.bincount(sel.idx[vals > 0], minlength=sae.cfg.n_latents).float()
            tokens = self.world.all_reduce_(torch.tensor(float(x.shape[0]), device=x.device))
            self.world.all_reduce_(counts)  # latent statistics over every rank's tokens
            self.since_fired += int(tokens)
            self.since_fired[counts > 0] = 0
            self.freq.lerp_(counts / tokens, 1 - cfg.ema_decay)
        self.step_count += 1
        reduce = self.world.all_reduce_  # data parallel: report the global batch's losses
        out = {"fvu": reduce(main.detach().clone(), mean=True),
               "aux": reduce(aux.detach().clone(), mean=True),
               "l0": l0, "dead_frac": dead.float().mean(), "aux_pool_frac": pool.float().mean()}
        if sae.cfg.k:  # feature_choice may leave budget unused (latents short of positive tokens)
            out["budget_used"] = l0 / sae.cfg.k
        if self.thresholds is not None:
            out["l0_coefficient"] = torch.tensor(self.thresholds.coefficient or float("nan"))
        return out

    def _objective(self) -> torch.nn.Module:
        """The loss module: as is in one process; wrapped in DistributedDataParallel (made at
        the first step, once every rank holds rank 0's init) across several."""
        if self.world.size == 1:
            return self._loss
        if self._ddp is None:
            self._ddp = torch.nn.parallel.DistributedDataParallel(  # top-k warmup: no grad to thresholds
                self._loss, broadcast_buffers=False, find_unused_parameters=self.thresholds is not None)
        return self._ddp

    def losses(self, x: torch.Tensor, grad: torch.Tensor | None,
               y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The step's loss (FVU + AuxK [+ penalty] [+ inner prefixes' FVUs]) and the parts `step`
        reads afterwards; every reconstruction term measures the target `y` (a transcoder's), or
        x itself."""
        sae, cfg = self.sae, self.cfg
        y = x if y is None else y
        if self._pre is None or self._pre.shape[0] != x.shape[0]:
            self._pre = x.new_empty(x.shape[0], sae.cfg.n_latents)
        pre = sae.pre_acts(x, out=self._pre)  # reused every step; nothing keeps it past the step
        kind, thresholds = sae.cfg.kind, self.thresholds
        warm = (sae.cfg.batch_level or thresholds is not None) and self.step_count < cfg.topk_warmup_steps
        learned = None
        if warm:  # see OptimConfig.topk_warmup_steps
            sel = topk(pre, thresholds.target if thresholds is not None else sae.cfg.k)
            vals = sae.encode_values(x, sel, pre)
        else:
            if thresholds is not None:
                if self.step_count == cfg.topk_warmup_steps:
                    thresholds.start(sae, x, pre, self.world)
                learned = thresholds.learned()
            sel, vals = kind.train_code(sae, x, pre, grad, learned)
        x_hat = sae.decode(sel.idx, vals, x)
        main = fvu(y, x_hat, self.world)
        dead = self.dead()
        pool = underused(self.freq, dead) if cfg.aux == "aux_zipf" else dead
        aux = auxk_loss(sae, x, x_hat, pre, pool, self.k_aux, self.world, target=y)
        loss = main + cfg.auxk_coef * aux
        penalty = None if warm else kind.penalty(sae, x, pre, sel, vals, self.world, learned, y)
        coefficient = cfg.l1_coefficient  # relu's L1; jumprelu's L0 has its controlled lambda
        if thresholds is not None and learned is not None and penalty is not None:
            if thresholds.coefficient is None:
                thresholds.balance(main, penalty, learned.theta, self.world)
            coefficient = thresholds.coefficient or 0.0
        if penalty is not None:
            loss = loss + coefficient * penalty
        for inner in kind.inner_reconstructions(sae, sel, vals):  # matryoshka's prefixes
            loss = loss + fvu(y, inner, self.world)
        return loss, {"sel": sel, "vals": vals, "main": main, "aux": aux, "dead": dead, "pool": pool}

    def dead(self) -> torch.Tensor:
        """(n_latents,) bool: latents not active on any of the last `dead_tokens` training
        tokens (those AuxK trains). At the end of a run, a dead count over a window far longer
        than the end-of-run eval's, for free."""
        return self.since_fired >= self.dead_tokens

    @torch.no_grad()
    def calibrate_thresholds(self, batches: list[torch.Tensor]) -> None:
        """Inference thresholds of a batch-level SAE: each latent's selection boundary averaged
        over `batches` with the final weights (a moving average over training would lag behind
        weights that are still moving). A latent never selected gets +inf: it stays off."""
        total = torch.zeros_like(self.sae.threshold)
        count = torch.zeros_like(self.sae.threshold)
        for x in batches:
            boundary = self.sae.select(self.sae.pre_acts(x), batch=True).boundary
            assert boundary is not None, "a batch allocator's selection reports its boundary"
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
        extra = {"step_count": self.step_count, "param_groups": opt["param_groups"]}
        if self.thresholds is not None:
            tensors["log_threshold"] = self.thresholds.log_threshold.detach()
            extra["thresholds"] = self.thresholds.extra()
        return tensors, extra

    def load_state_dict(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.since_fired.copy_(tensors["since_fired"])
        self.freq.copy_(tensors["freq"])
        if self.thresholds is not None:
            with torch.no_grad():
                self.thresholds.log_threshold.copy_(tensors["log_threshold"])
            self.thresholds.load_extra(extra["thresholds"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
        self.step_count = extra["step_count"]
