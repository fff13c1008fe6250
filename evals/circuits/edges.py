"""Edge scores by attribution patching on the residual stream's factorized graph.

Senders write into the residual stream: "Resid Start" (token and position embeddings,
`blocks.0.hook_resid_pre`), every head "A{l}.{h}" (its `attn.hook_result` slice) and every MLP
"MLP l" (`hook_mlp_out`). Receivers read it: every head's query, key and value input
"A{l}.{h}.Q" / ".K" / ".V" (`blocks.l.hook_{q,k,v}_input`, the residual before ln1, one copy per
head: transformer-lens's split-qkv-input mode, switched on only while scoring), every MLP's input
"MLP l" (`hook_mlp_in`, before ln2) and "Resid End" (the last block's `hook_resid_post`). A
sender feeds a receiver that reads after it writes: a head in layer l feeds heads of later layers,
MLP l (unless attention and MLP run in parallel) and later MLPs, and Resid End. These are
auto-circuit's factorized edges, named as it names them.

Edge (s, r) score, as node scores (`attribution`): -(s_cf - s_clean) . dm/d(r's input) at the
clean run, summed over positions, averaged over prompts and divided by the drop of the whole
counterfactual run: the estimated share of the effect that flows from s straight into r.
- eap: one clean and one counterfactual pass capture the senders, one forward and backward
  pass takes every receiver's gradient (Syed et al.).
- eap-ig: that gradient averaged over `steps` runs whose token embeddings lie at k/steps on the
  line from the counterfactual's to the clean prompt's (EAP-IG-inputs, as for nodes).
A head-to-head edge is the sum of its Q, K and V edges (`head_edges`, laid out as
`GroundTruth.edge_effect`, which path patching fills for the same edges).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import Task, TaskTokens, last_logits, tokenize
from saelab.tasks import metric as task_metric

from .attribution import DEFAULT_STEPS
from .patching import _Runner, check_tokens, head_shape, result_hook

EDGE_METHODS = ("eap", "eap-ig")
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """A sender or receiver: its name, the hook holding its vector (per-head hooks give a head
    index), and when it writes or reads (a sender feeds a receiver when write < read)."""

    name: str
    hook: str
    head: int | None
    time: float


@dataclass
class EdgeAttribution:
    """Edge scores of one method, and their cost.

    Fields:
        method: eap or eap-ig.
        senders, receivers: node names ("Resid Start", "A{l}.{h}", "MLP l"; "A{l}.{h}.Q/K/V",
            "MLP l", "Resid End").
        scores: (S, R) estimated normalised effect of each edge; NaN where s does not feed r.
        n_layers, n_heads: the head grid (`head_edges`).
        forward_passes, backward_passes: per prompt.
        seconds: wall time.
        prompts: prompts scored.
        clean_metric, counterfactual_metric: mean task metric of the two runs (their difference
            turns a score back into metric units: auto-circuit's EAP score is that times -1
            times the mean of (s_cf - s_clean) . dm/dr).
    """

    method: str
    senders: list[str]
    receivers: list[str]
    scores: torch.Tensor
    n_layers: int
    n_heads: int
    forward_passes: int
    backward_passes: int
    seconds: float
    prompts: int
    clean_metric: float
    counterfactual_metric: float

    def edges(self) -> dict[str, float]:
        """{"SENDER->RECEIVER": score} over every edge of the graph."""
        return {f"{self.senders[s]}->{self.receivers[r]}": float(self.scores[s, r])
                for s, r in torch.isfinite(self.scores).nonzero().tolist()}

    def head_edges(self) -> torch.Tensor:
        """(L*H, L*H) head-to-head scores, Q + K + V, NaN where the sender is not in an earlier
        layer; head index = layer * n_heads + head, as `GroundTruth.edge_effect`."""
        n = self.n_layers * self.n_heads
        out = torch.full((n, n), float("nan"))
        send = {name: i for i, name in enumerate(self.senders)}
        recv = {name: i for i, name in enumerate(self.receivers)}
        for s in range(n):
            for r in range(n):
                ls, hs = divmod(s, self.n_heads)
                lr, hr = divmod(r, self.n_heads)
                if ls < lr:
                    out[s, r] = sum(self.scores[send[f"A{ls}.{hs}"], recv[f"A{lr}.{hr}.{x.upper()}"]]
                                    for x in QKV)
        return out

    def cost(self) -> dict:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "seconds": round(self.seconds, 3), "prompts": self.prompts}


def graph(model: HookedModel) -> tuple[list[Node], list[Node]]:
    """The factorized graph's senders and receivers (module docstring)."""
    n_layers, n_heads = head_shape(model)
    cfg = model.model.cfg
    if getattr(cfg, "n_key_value_heads", None) not in (None, n_heads):
        raise SaelabError(f"model {model.spec} shares keys and values between heads (grouped-query "
                          "attention); edge scores need one Q, K and V input per head")
    mlp, parallel = not cfg.attn_only, bool(getattr(cfg, "parallel_attn_mlp", False))
    senders = [Node("Resid Start", "blocks.0.hook_resid_pre", None, 0)]
    receivers = []
    for layer in range(n_layers):
        attn_t, mlp_t = 2 * layer + 1, 2 * layer + (1 if parallel else 2)
        for h in range(n_heads):
            senders.append(Node(f"A{layer}.{h}", result_hook(layer), h, attn_t))
            receivers += [Node(f"A{layer}.{h}.{x.upper()}", f"blocks.{layer}.hook_{x}_input", h, attn_t)
                          for x in QKV]
        if mlp:
            senders.append(Node(f"MLP {layer}", f"blocks.{layer}.hook_mlp_out", None, mlp_t))
            receivers.append(Node(f"MLP {layer}", f"blocks.{layer}.hook_mlp_in", None, mlp_t))
    receivers.append(Node("Resid End", f"blocks.{n_layers - 1}.hook_resid_post", None, 2 * n_layers + 1))
    return senders, receivers


@contextmanager
def factorized(model: HookedModel) -> Iterator[None]:
    """Per-head Q/K/V inputs and the MLP inputs as live hooks while inside (the forward values
    are unchanged); the model's own settings come back after."""
    tl, cfg = model.model, model.model.cfg
    model.check_hooks([result_hook(0)])  # turns per-head results on
    before = (bool(cfg.use_split_qkv_input), bool(getattr(cfg, "use_hook_mlp_in", False)))
    tl.set_use_split_qkv_input(True)  # type: ignore[attr-defined]
    if not cfg.attn_only:
        tl.set_use_hook_mlp_in(True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        tl.set_use_split_qkv_input(before[0])  # type: ignore[attr-defined]
        if not cfg.attn_only:
            tl.set_use_hook_mlp_in(before[1])  # type: ignore[attr-defined]


def _vectors(acts: dict[str, torch.Tensor], nodes: list[Node], heads: int) -> torch.Tensor:
    """(P, T, len(nodes), d_model): each node's vector from its hook's (flattened) activation."""
    out = []
    for n in nodes:
        a = acts[n.hook]
        out.append(a.unflatten(-1, (heads, -1))[:, :, n.head] if n.head is not None else a)
    return torch.stack(out, 2)


def _receiver_grads(model: HookedModel, tokens: TaskTokens, receivers: list[Node], metric: str,
                    embed: Callable | None = None) -> dict[str, torch.Tensor]:
    """dm/d(input) of the summed task metric at every receiver hook (flattened), on the positive
    prompts (token embeddings replaced by `embed` if given)."""
    zeros: dict[str, torch.Tensor] = {}

    def add(hook: str) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            zeros[hook] = torch.zeros_like(x).requires_grad_(True)
            return x + zeros[hook]
        return fn

    replace: dict[str, Callable] = {h: add(h) for h in dict.fromkeys(n.hook for n in receivers)}
    if embed is not None:
        replace["hook_embed"] = embed
    with torch.enable_grad():
        logits = model.logits(tokens.pos.to(model.device), replace)
        m = task_metric(metric)(last_logits(logits, tokens.pos_len), tokens).sum()
        grads = torch.autograd.grad(m, list(zeros.values()), allow_unused=True)
    return {h: torch.zeros_like(z) if g is None else g
            for (h, z), g in zip(zeros.items(), grads, strict=True)}


def edge_scores(model: HookedModel, tokens: TaskTokens, method: str = "eap", metric: str = "logit-diff",
                steps: int = DEFAULT_STEPS) -> EdgeAttribution:
    """Score every edge of the factorized graph; see the module docstring."""
    if method not in EDGE_METHODS:
        raise SaelabError(f"unknown edge attribution method {method!r}; use {' or '.join(EDGE_METHODS)}")
    if steps < 1:
        raise SaelabError(f"steps must be positive, got {steps}")
    check_tokens(tokens, "counterfactual")
    senders, receivers = graph(model)
    n_layers, n_heads = head_shape(model)
    start, run = time.perf_counter(), _Runner(model, tokens, metric)
    with factorized(model):
        send_hooks = list(dict.fromkeys(n.hook for n in senders))
        m_clean, clean = run.capture(tokens.pos, send_hooks, tokens.pos_len)
        m_cf, cf = run.capture(tokens.cf, send_hooks, tokens.cf_len)
        total = (m_clean - m_cf).mean().item()
        if abs(total) < 1e-6:
            raise SaelabError(
                f"the counterfactual run does not change the task metric (clean {m_clean.mean():.4f},"
                f" counterfactual {m_cf.mean():.4f}); the model does not do this task")
        if method == "eap":
            grads, backward = _receiver_grads(model, tokens, receivers, metric), 1
        else:
            embeds = model.activations(tokens.cf.to(model.device), ["hook_embed"])["hook_embed"]
            runs = [_receiver_grads(model, tokens, receivers, metric,
                                    lambda x, a=k / steps: embeds.to(x) + a * (x - embeds.to(x)))
                    for k in range(1, steps + 1)]
            grads = {h: torch.stack([g[h] for g in runs]).mean(0) for h in runs[0]}
            backward = steps
            run.passes += len(tokens)  # the counterfactual embeddings
    delta = _vectors(cf, senders, n_heads) - _vectors(clean, senders, n_heads)  # (P, T, S, d)
    grad = _vectors({h: g.cpu() for h, g in grads.items()}, receivers, n_heads)  # (P, T, R, d)
    scores = -torch.einsum("ptsd,ptrd->sr", delta.double(), grad.double()) / (len(tokens) * total)
    scores = scores.to(delta.dtype)
    feeds = torch.tensor([[s.time < r.time for r in receivers] for s in senders])
    scores[~feeds] = float("nan")
    return EdgeAttribution(method, [n.name for n in senders], [n.name for n in receivers], scores,
                           n_layers, n_heads, run.passes + backward * len(tokens), backward * len(tokens),
                           time.perf_counter() - start, len(tokens), m_clean.mean().item(),
                           m_cf.mean().item())


def attribute_edges(model: HookedModel, task: str | Task | TaskTokens, method: str = "eap", *,
                    prompts: int = 64, seed: int = 0, metric: str = "logit-diff",
                    steps: int = DEFAULT_STEPS) -> EdgeAttribution:
    """Edge scores on `task` (a name, whose `prompts` distinct rows are drawn with `seed`, a
    `Task` or `TaskTokens`), beside `attribute`'s node scores."""
    from saelab.tasks import draw_distinct

    if isinstance(task, TaskTokens):
        tokens = task
    else:
        rows = draw_distinct(task, prompts, seed) if isinstance(task, str) else task
        tokens = tokenize(rows, model.tokenizer, model.context_length)
    return edge_scores(model, tokens, method, metric, steps)
