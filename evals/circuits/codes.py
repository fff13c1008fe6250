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
greater-than, an early head reading the year); `head_gradients` gives the task metric's
gradient with respect to every head's output, the relevance weight, and (`receivers`) each
head's input gradient: that output gradient taken back through the head's own attention layer
to the layer's residual input (one small backward per head, through one layer only), which a
sender's change is dotted with for the routed edge score (`scoring.edge_relevance`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def resid_pre_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass
class HeadGradients:
    """One forward and backward pass over the positive prompts, in `head_outputs`' shape
    (P, [T,] L*H, d_model), zero at padding.

    Fields:
        outputs: each head's output.
        grads: d(task metric)/d(each head's output).
        inputs: with `receivers`, d(grads . head's output)/d(its layer's residual input): how
            the metric would move, through this head alone, per unit change of the head's
            input (zero for layer-0 heads, which no head sends to); None otherwise.
        local_backward_passes: per prompt, the extra backward passes through one attention
            layer that `inputs` took (one per head above layer 0).
    """

    outputs: torch.Tensor
    grads: torch.Tensor
    inputs: torch.Tensor | None = None
    local_backward_passes: int = 0


def _receiver_inputs(acts: dict[str, torch.Tensor], grads: list[torch.Tensor], shape: tuple[int, ...],
                     n_layers: int, n_heads: int) -> torch.Tensor:
    """(B, T, L*H, d_model): per head above layer 0, the vector-Jacobian product of its output's
    metric gradient through its own attention layer back to that layer's residual input."""
    out = torch.zeros(*shape, n_layers * n_heads, acts[resid_pre_hook(1)].shape[-1])
    for layer in range(1, n_layers):
        result = acts[result_hook(layer)].reshape(*shape, n_heads, -1)
        g = grads[layer].reshape(*shape, n_heads, -1)
        for head in range(n_heads):
            vjp, = torch.autograd.grad(result[:, :, head], acts[resid_pre_hook(layer)],
                                       grad_outputs=g[:, :, head], retain_graph=True)
            out[:, :, layer * n_heads + head] = vjp.detach().cpu().float()
    return out


def head_gradients(model: HookedModel, tok: TaskTokens, metric: str, n_layers: int,
                   n_heads: int, position: str = "last", receivers: bool = False,
                   batch: int = 64) -> HeadGradients:
    """`head_outputs` of the positive prompts, the task metric's gradient with respect to each,
    and with `receivers` each head's input gradient (`HeadGradients`); `position` last or all."""
    if position not in ("last", "all"):
        raise SaelabError(f"metric gradients are per position: use last or all, not {position!r}")
    hooks = [result_hook(layer) for layer in range(n_layers)]
    inputs = [resid_pre_hook(layer) for layer in range(1, n_layers)] if receivers and n_layers > 1 else []
    model.check_hooks(hooks + inputs)
    fn = task_metric(metric)
    parts: dict[str, list[torch.Tensor]] = {"outputs": [], "grads": [], "inputs": []}
    for index in torch.arange(len(tok)).split(batch):
        part = tok.rows(index)
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, store: dict[str, torch.Tensor] = acts):
            def fn(x: torch.Tensor, hook) -> torch.Tensor:
                store[name] = x
                return x
            return fn

        # frozen weights: an embedding leaf that needs grad puts every later activation on the graph
        fwd = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
        fwd += [(h, keep(h)) for h in hooks + inputs]
        with torch.enable_grad():
            logits = model.model.run_with_hooks(part.pos.to(model.device), fwd_hooks=fwd,
                                                return_type="logits")
            value = fn(last_logits(logits, part.pos_len).cpu(), part).sum()
            grads = list(torch.autograd.grad(value, [acts[h] for h in hooks], retain_graph=bool(inputs)))
            shape = tuple(part.pos.shape)
            per_head = {
                "outputs": [acts[h].detach().cpu().float().reshape(*shape, n_heads, -1) for h in hooks],
                "grads": [g.cpu().float().reshape(*shape, n_heads, -1) for g in grads],
            }
            if inputs:
                per_head["inputs"] = [_receiver_inputs(acts, grads, shape, n_layers, n_heads)]
        for key, values in per_head.items():
            parts[key].append(_reduce(torch.cat(values, 2), part.pos_len, position))
    return HeadGradients(torch.cat(parts["outputs"]), torch.cat(parts["grads"]),
                         torch.cat(parts["inputs"]) if parts["inputs"] else None,
                         n_heads * (n_layers - 1) if inputs else 0)


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
