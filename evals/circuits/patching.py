"""Ground-truth circuits by activation patching: the slow baseline circuit discovery is judged by.

Nodes (heads): head h's output (its `hook_z` slice, which fixes its `hook_result`) is replaced
in the positive run by its value on the counterfactual prompt (or, with `ablation="mean"`, by
its mean over the positive prompts' real positions); the effect is the drop in the task's metric
(logit or probability difference, `saelab.tasks.METRICS`), averaged over prompts and divided by
the drop a full counterfactual run causes. Its standard error over prompts is the standard
deviation of the per-prompt drops (sample, n - 1) over sqrt(prompts), divided by the same total
(the total taken as fixed).

Edges (sender s -> receiver r, s in an earlier layer): path patching of the direct path. The
receiver layer's input (`blocks.Lr.hook_resid_pre`) gets s's output change (counterfactual or
mean minus positive `hook_result` of s) added, everything else clean; r's `hook_z` from that run
is then spliced into an otherwise clean run, and the drop in logit difference is the edge's effect.

A head (edge) is in the circuit when its |effect| is more than `share` of the summed |effects|
of all heads (edges); the default share, 1 / count, means "more than an equal share".

Stability (`ground_truth_sets`): the heads are patched again on further prompt sets, disjoint
from the first; the circuit is stable when every pair of sets' head circuits has Jaccard
|A & B| / |A | B| >= `STABLE_JACCARD`. An unstable ground truth measures its prompts more than
the model, and reports leave its task out of cross-task means (`report.headline`).

Forward passes are counted per prompt (a batched pass over P prompts counts P), as are the SAE
method's, so the two are compared on the same footing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import METRICS, TaskTokens, last_logits
from saelab.tasks import metric as task_metric

ABLATIONS = ("counterfactual", "mean")


def check_tokens(tokens: TaskTokens, ablation: str) -> None:
    """Equal lengths for counterfactual patching, a known ablation: one line before any work."""
    if ablation not in ABLATIONS:
        raise SaelabError(f"unknown ablation {ablation!r}; use {' or '.join(ABLATIONS)}")
    if ablation == "counterfactual" and not torch.equal(tokens.pos_len, tokens.cf_len):
        bad = int((tokens.pos_len != tokens.cf_len).nonzero()[0])
        raise SaelabError(
            f"prompt {bad} and its counterfactual differ in length ({int(tokens.pos_len[bad])} vs "
            f"{int(tokens.cf_len[bad])} tokens); patching needs equal lengths (or ablation='mean')")
STABLE_JACCARD = 0.8  # issue 24: the same circuit, or Jaccard >= 0.8, on disjoint prompt sets


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def result_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_result"


def head_shape(model: HookedModel) -> tuple[int, int]:
    """(layers, heads per layer), or a clear error for a model without per-head hooks."""
    n_layers = model.n_layers
    n_heads = getattr(model.model.cfg, "n_heads", None)
    hooks = [h for layer in range(n_layers) for h in (z_hook(layer), result_hook(layer))]
    missing = [h for h in hooks if h not in model.model.hook_dict]
    if not n_heads or missing:
        raise SaelabError(
            f"model {model.spec} has no per-head attention hooks ({missing[0] if missing else 'n_heads'} "
            "is missing); circuit evals need blocks.L.attn.hook_z and blocks.L.attn.hook_result"
        )
    model.check_hooks(hooks)  # turns on per-head results
    return n_layers, n_heads


@dataclass
class GroundTruth:
    """A circuit found by patching, with what it cost.

    Fields:
        n_layers, n_heads: the head grid; head index = layer * n_heads + head.
        node_effect: (L*H,) normalised drop in the metric when the head is patched.
        node_se: (L*H,) its standard error over prompts.
        edge_effect: (L*H, L*H) same for edge (sender, receiver); NaN where no edge exists or
            edges were not computed.
        share: the inclusion rule's share of the summed |effect|.
        ablation: counterfactual or mean.
        prompts: prompts patched.
        node_passes, edge_passes: forward passes (per prompt) of the node and edge stages.
        node_seconds, edge_seconds: their wall time.
        metric: the task metric (logit-diff or prob-diff).
        clean_metric, counterfactual_metric: its means over the two runs.
        stability: the circuit on further disjoint prompt sets (`stability`), if measured.
    """

    n_layers: int
    n_heads: int
    node_effect: torch.Tensor
    node_se: torch.Tensor
    edge_effect: torch.Tensor
    share: float | None
    ablation: str
    prompts: int
    node_passes: int
    edge_passes: int
    node_seconds: float
    edge_seconds: float
    metric: str
    clean_metric: float
    counterfactual_metric: float
    source: str = field(default="activation patching")
    stability: dict | None = None

    @property
    def nodes(self) -> torch.Tensor:
        """(L*H,) bool: heads in the circuit."""
        return _above_share(self.node_effect, self.share)

    @property
    def edge_mask(self) -> torch.Tensor:
        """(L*H, L*H) bool: pairs that are edges (sender in an earlier layer)."""
        return edge_mask(self.n_layers, self.n_heads)

    @property
    def has_edges(self) -> bool:
        return bool(torch.isfinite(self.edge_effect[self.edge_mask]).all())

    @property
    def edges(self) -> torch.Tensor:
        """(L*H, L*H) bool: edges in the circuit (all False without edge effects)."""
        out = torch.zeros_like(self.edge_mask)
        if self.has_edges:
            out[self.edge_mask] = _above_share(self.edge_effect[self.edge_mask], self.share)
        return out

    def to_dict(self) -> dict:
        n = self.n_heads
        heads = [f"{i // n}.{i % n}" for i in range(self.n_layers * n)]
        return {
            "source": self.source, "ablation": self.ablation, "prompts": self.prompts,
            "share": self.share if self.share is not None else 1 / len(heads),
            "heads": [h for h, keep in zip(heads, self.nodes.tolist(), strict=True) if keep],
            "node_effect": {h: round(e, 5) for h, e in zip(heads, self.node_effect.tolist(), strict=True)},
            "node_effect_se": {h: round(e, 5) for h, e in zip(heads, self.node_se.tolist(), strict=True)},
            "edges": [f"{heads[s]}->{heads[r]}" for s, r in self.edges.nonzero().tolist()],
            "node_forward_passes": self.node_passes, "edge_forward_passes": self.edge_passes,
            "node_seconds": round(self.node_seconds, 3), "edge_seconds": round(self.edge_seconds, 3),
            "metric": self.metric, "clean_metric": round(self.clean_metric, 4),
            "counterfactual_metric": round(self.counterfactual_metric, 4),
            "stability": self.stability,
        }


def edge_mask(n_layers: int, n_heads: int) -> torch.Tensor:
    layer = torch.arange(n_layers).repeat_interleave(n_heads)
    return layer[:, None] < layer[None, :]


def _above_share(effect: torch.Tensor, share: float | None) -> torch.Tensor:
    mag = effect.abs()
    share = 1 / mag.numel() if share is None else share
    return mag > share * mag.sum()


class _Runner:
    """Batched forward passes over a task's positive prompts, counted per prompt."""

    def __init__(self, model: HookedModel, tokens: TaskTokens, metric: str):
        self.model, self.tokens, self.passes = model, tokens, 0
        self.device, self.metric = model.device, task_metric(metric)

    def run(self, tokens: torch.Tensor, replace: dict[str, Callable] | None = None,
            lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Per-prompt task metric of one batched pass."""
        self.passes += tokens.shape[0]
        with torch.no_grad():
            logits = self.model.logits(tokens.to(self.device), replace)
        lengths = self.tokens.pos_len if lengths is None else lengths
        return self.metric(last_logits(logits, lengths).cpu(), self.tokens)

    def capture(self, tokens: torch.Tensor, hooks: list[str], lengths: torch.Tensor,
                replace: dict[str, Callable] | None = None):
        """(task metric, {hook: activation}) of one pass, `replace` spliced in first."""
        acts, replace = {}, replace or {}

        def keep(name):
            def fn(x):
                x = replace[name](x) if name in replace else x
                acts[name] = x.detach().clone()
                return x
            return fn

        value = self.run(tokens, {**replace, **{h: keep(h) for h in hooks}}, lengths)
        return value, acts


def _set_head(head: int, d_head: int, value: torch.Tensor) -> Callable:
    """A splice function writing `value`'s slice of one head into the (B, T, H*d) activation."""
    sl = slice(head * d_head, (head + 1) * d_head)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., sl] = value[..., sl].to(x.dtype)
        return x
    return fn


def _masked_mean(acts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions of every prompt, broadcast back to (P, T, d)."""
    real = (torch.arange(acts.shape[1], device=acts.device)[None, :] < lengths[:, None].to(acts.device))
    mean = (acts * real[..., None]).sum((0, 1)) / real.sum()
    return mean.expand_as(acts)


def mean_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 0 and its standard error, sample std (n - 1) / sqrt(n); 0 for one row."""
    n = values.shape[0]
    se = values.std(0, correction=1) / n ** 0.5 if n > 1 else torch.zeros_like(values[0])
    return values.mean(0), se


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks; 1 when both are empty (the same circuit)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def stability(circuits: list[torch.Tensor], prompts: int, n_heads: int) -> dict:
    """Pairwise Jaccard of head circuits (bool masks over L*H heads) found on disjoint prompt
    sets; stable when the smallest is at least STABLE_JACCARD."""
    pairs = [(i, j) for i in range(len(circuits)) for j in range(i + 1, len(circuits))]
    values = [jaccard(circuits[i], circuits[j]) for i, j in pairs]
    low = min(values) if values else None
    return {"sets": len(circuits), "prompts_per_set": prompts,
            "circuits": [[f"{i // n_heads}.{i % n_heads}" for i in c.nonzero().flatten().tolist()]
                         for c in circuits],
            "jaccard": [round(v, 4) for v in values], "min_jaccard": low,
            "stable": low is not None and low >= STABLE_JACCARD, "threshold": STABLE_JACCARD}


def ground_truth_sets(model: HookedModel, tokens: TaskTokens, sets: list[TaskTokens],
                      **kwargs) -> GroundTruth:
    """`ground_truth(model, tokens, **kwargs)` with its stability over the disjoint prompt
    `sets` (heads only; a set that is `tokens` itself reuses its circuit)."""
    truth = ground_truth(model, tokens, **kwargs)
    if len(sets) > 1:
        extra = {i: ground_truth(model, t, **{**kwargs, "edges": False})
                 for i, t in enumerate(sets) if t is not tokens}
        circuits = [extra[i].nodes if i in extra else truth.nodes for i in range(len(sets))]
        truth.stability = {**stability(circuits, len(sets[0]), truth.n_heads),
                           "forward_passes": sum(g.node_passes for g in extra.values()),
                           "seconds": round(sum(g.node_seconds for g in extra.values()), 3)}
    return truth


def ground_truth(model: HookedModel, tokens: TaskTokens, *, ablation: str = "counterfactual",
                 edges: bool = True, share: float | None = None, metric: str = "logit-diff",
                 progress: bool = True) -> GroundTruth:
    """Patch every head (and, with `edges`, every head-to-head direct path); see module doc."""
    check_tokens(tokens, ablation)
    if metric not in METRICS:
        raise SaelabError(f"unknown task metric {metric!r}; use {' or '.join(METRICS)}")
    if share is not None and not 0 < share < 1:
        raise SaelabError(f"share must be in (0, 1), got {share}")
    n_layers, n_heads = head_shape(model)
    d_head = model.model.cfg.d_head
    d_model = model.model.cfg.d_model
    run = _Runner(model, tokens, metric)
    start = time.perf_counter()
    hooks = [h for layer in range(n_layers) for h in (z_hook(layer), result_hook(layer))]
    m_clean, clean = run.capture(tokens.pos, hooks, tokens.pos_len)
    if ablation == "counterfactual":
        m_cf, source = run.capture(tokens.cf, hooks, tokens.cf_len)
    else:
        source = {h: _masked_mean(a, tokens.pos_len) for h, a in clean.items()}
        m_cf = run.run(tokens.pos, {h: (lambda x, v=v: v) for h, v in source.items()
                                     if h.endswith("hook_z")})
    total = (m_clean - m_cf).mean().item()
    if abs(total) < 1e-6:
        raise SaelabError(
            f"the {ablation} run does not change the task metric ({metric}: clean "
            f"{m_clean.mean():.4f}, patched {m_cf.mean():.4f}); the model does not do this task"
        )
    n = n_layers * n_heads
    node = torch.zeros(len(tokens), n)  # per-prompt drops
    bar = tqdm(total=n, desc="patching heads", disable=not progress)
    for i in range(n):
        layer, head = divmod(i, n_heads)
        m_patched = run.run(tokens.pos, {z_hook(layer): _set_head(head, d_head, source[z_hook(layer)])})
        node[:, i] = (m_clean - m_patched) / total
        bar.update()
    bar.close()
    node_passes, node_seconds = run.passes, time.perf_counter() - start
    edge = torch.full((n, n), float("nan"))
    if edges:
        start = time.perf_counter()
        pairs = [(s, lr) for s in range(n) for lr in range(s // n_heads + 1, n_layers)]
        bar = tqdm(total=len(pairs) * n_heads, desc="path patching edges", disable=not progress)
        for s, lr in pairs:
            ls, hs = divmod(s, n_heads)
            shape = (*clean[result_hook(ls)].shape[:2], n_heads, d_model)
            delta = (source[result_hook(ls)] - clean[result_hook(ls)]).reshape(shape)[:, :, hs]
            add = {f"blocks.{lr}.hook_resid_pre": lambda x, d=delta: x + d.to(x.dtype)}
            _, acts = run.capture(tokens.pos, [z_hook(lr)], tokens.pos_len, add)
            for hr in range(n_heads):
                m_patched = run.run(tokens.pos, {z_hook(lr): _set_head(hr, d_head, acts[z_hook(lr)])})
                edge[s, lr * n_heads + hr] = (m_clean - m_patched).mean() / total
                bar.update()
        bar.close()
        edge_passes, edge_seconds = run.passes - node_passes, time.perf_counter() - start
    else:
        edge_passes, edge_seconds = 0, 0.0
    return GroundTruth(n_layers, n_heads, *mean_se(node), edge, share, ablation, len(tokens),
                       node_passes, edge_passes, node_seconds, edge_seconds, metric,
                       m_clean.mean().item(), m_cf.mean().item())
