"""Per-head outputs and their discrete SAE codes.

Each head's output (`hook_result`, in d_model space) is averaged over the prompt's real
positions (O'Neill & Bui) or taken at the last one, giving one vector per (prompt, head). One
small SAE, shared by all heads, is trained on these vectors from a few prompts (positive and
counterfactual), and every (prompt, head) is then reduced to one integer: the SAE's argmax
latent. Two SAEs are offered:
- topk: saelab's TopK SAE with k = 1, trained on reconstruction (MSE); its single active latent
  is exactly the argmax code;
- relu: the L1 ReLU SAE of O'Neill & Bui (saelab's relu allocator: every positive latent
  active, loss = MSE + l1 * `saelab.penalty.l1_penalty`); its code is the argmax of
  relu(pre), which is the argmax of pre.
Both are trained full-batch with Adam, decoder rows renormalised after each step, on inputs
divided by their root mean squared norm over the training rows (kept as `sae.input_scale` and
applied again by `codes`), so one l1 coefficient means the same for every model.

Besides the argmax code, `code_vectors` gives what a head's whole code writes (its active
latents times their decoder rows, in the head output's units): the change of that vector
between a prompt and its counterfactual is what the `change` and `relevance` scores measure
(`scoring`). `position="all"` keeps every real position (the SAE then trains on every
position's rows), since a head can matter through a position other than the last (on
greater-than, an early head reading the year); `metric_gradients` gives the task metric's
gradient with respect to every head's output, the relevance weight.
"""

from __future__ import annotations

import torch

from saelab import allocators
from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.penalty import l1_penalty
from saelab.sae import SAE, SAEConfig
from saelab.sae_init import init_sae
from saelab.tasks import TaskTokens, last_logits
from saelab.tasks import metric as task_metric

from .patching import result_hook

SAE_KINDS = ("relu", "topk")
POSITIONS = ("last", "mean", "all")


def real_mask(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(P, T) float: 1 at each row's real (unpadded) positions."""
    return (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).to(torch.float32)


def _reduce(a: torch.Tensor, lens: torch.Tensor, position: str) -> torch.Tensor:
    """(B, T, N, d) per-position head outputs -> the `position` view (padding zeroed)."""
    if position == "last":
        return a[torch.arange(a.shape[0]), lens - 1]
    real = real_mask(a[..., 0, 0], lens)[:, :, None, None]
    if position == "mean":
        return (a * real).sum(1) / lens[:, None, None]
    return a * real


def head_outputs(model: HookedModel, tokens: torch.Tensor, lengths: torch.Tensor,
                 n_layers: int, n_heads: int, position: str = "last", batch: int = 64) -> torch.Tensor:
    """(P, L*H, d_model): each head's output at each prompt's last real position, where the task
    metric is read, or (`position="mean"`, O'Neill & Bui) averaged over its real positions;
    `position="all"`: (P, T, L*H, d_model), every position, zero at padding."""
    if position not in POSITIONS:
        raise SaelabError(f"unknown head-output position {position!r}; use {' or '.join(POSITIONS)}")
    hooks = [result_hook(layer) for layer in range(n_layers)]
    out = []
    for rows, lens in zip(tokens.split(batch), lengths.split(batch), strict=True):
        acts = model.activations(rows.to(model.device), hooks)
        a = torch.cat([acts[h].cpu().float().reshape(*rows.shape, n_heads, -1) for h in hooks], 2)
        out.append(_reduce(a, lens, position))
    return torch.cat(out)


def outputs_and_gradients(model: HookedModel, tok: TaskTokens, metric: str, n_layers: int,
                          n_heads: int, position: str = "last",
                          batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_outputs` of the positive prompts and d(task metric)/d(each head's output) in the
    same shape (`position` last or all; zero at padding): one forward and one backward pass a
    prompt."""
    if position not in ("last", "all"):
        raise SaelabError(f"metric gradients are per position: use last or all, not {position!r}")
    hooks = [result_hook(layer) for layer in range(n_layers)]
    fn = task_metric(metric)
    outs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for index in torch.arange(len(tok)).split(batch):
        part = tok.rows(index)
        def loss(logits: torch.Tensor, p: TaskTokens = part) -> torch.Tensor:
            return fn(last_logits(logits, p.pos_len).cpu(), p).sum()

        acts = model.activations(part.pos.to(model.device), hooks, with_grads=True, loss=loss)
        for keys, store in ((hooks, outs), ([f"{h}:grad" for h in hooks], grads)):
            a = torch.cat([acts[k].cpu().float().reshape(*part.pos.shape, n_heads, -1) for k in keys], 2)
            store.append(_reduce(a, part.pos_len, position))
    return torch.cat(outs), torch.cat(grads)


class CircuitSAE(SAE):
    """The shared SAE and the scale its training rows were divided by (every input is)."""

    input_scale: float = 1.0


def train_sae(x: torch.Tensor, kind: str = "relu", n_latents: int = 200, l1: float = 0.02,
              epochs: int = 500, lr: float = 1e-3, seed: int = 0) -> CircuitSAE:
    """Train the shared SAE on rows x (M, d) full-batch; see the module docstring."""
    if kind not in SAE_KINDS:
        raise SaelabError(f"unknown circuit SAE {kind!r}; use {' or '.join(SAE_KINDS)}")
    if min(n_latents, epochs) < 1 or lr <= 0 or l1 < 0:
        raise SaelabError("n_latents and epochs must be positive, lr > 0 and l1 >= 0")
    budget = allocators.get(kind).budget
    cfg = SAEConfig(d_in=x.shape[1], n_latents=n_latents, k=1 if budget else 0, allocator=kind)
    sae = CircuitSAE(cfg)
    sae.input_scale = float(x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    x = x / sae.input_scale
    init_sae(sae, x, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    every = torch.arange(n_latents).expand(x.shape[0], n_latents)
    for _ in range(epochs):
        if not budget:  # relu: every positive latent is active: a dense code beats n-wide index lists
            vals = torch.relu(torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.T))
            x_hat = torch.addmm(sae.b_dec, vals, sae.W_dec)
            penalty = l1_penalty(sae, x, every, vals)
        else:
            x_hat, penalty = sae.decode(*sae.encode(x)), torch.zeros(())
        loss = (x - x_hat).pow(2).sum(1).mean() + l1 * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
    return sae


@torch.no_grad()
def code_vectors(sae: CircuitSAE, outputs: torch.Tensor) -> torch.Tensor:
    """What each output's code writes: active latents times decoder rows, in the outputs' units
    (the decoder bias, common to every code, left out), same shape as `outputs`. Dense, as in
    `train_sae`: the relu SAE's codes are every positive latent, the topk SAE's its top k."""
    flat = outputs.reshape(-1, outputs.shape[-1]) / sae.input_scale
    pre = sae.pre_acts(flat.to(sae.W_enc.dtype))
    if allocators.get(sae.cfg.allocator).budget:
        top = pre.topk(sae.cfg.k, dim=1)
        act = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:
        act = torch.relu(pre)
    return (act @ sae.W_dec).reshape(outputs.shape).float() * sae.input_scale


@torch.no_grad()
def codes(sae: CircuitSAE, outputs: torch.Tensor) -> torch.Tensor:
    """(P, N) argmax latent of each (prompt, head) output (P, N, d)."""
    flat = outputs.reshape(-1, outputs.shape[-1]) / sae.input_scale
    return sae.pre_acts(flat.to(sae.W_enc.dtype)).argmax(1).reshape(outputs.shape[:2])
