"""Faithfulness of circuits made of a method's top head-to-head edges (MIB's edge circuits).

A circuit of size k keeps the k head-to-head edges (sender head in an earlier layer than the
receiving head, `patching.edge_mask`) with the largest |score| (`faithfulness.order`). A pruned
edge (s, r) feeds receiver r's query, key and value inputs (`blocks.l.hook_{q,k,v}_input`, one
copy of the residual stream per head in transformer-lens's split-qkv-input mode,
`edges.factorized`) the sender's counterfactual output in place of the output s computes in
this run:

    input of r = (this run's residual stream) + sum over pruned senders s of (s_cf - s_run),

s_run being s's `hook_result` in the same pass (pruned edges into s may have moved it). Every
other edge (from the embeddings and the MLPs, into the MLPs and the logits) is always kept, so
nothing but head-to-head paths is cut. f, CPR, CMD, completeness and `edges_to_08` are as
`faithfulness` defines them for nodes, over the E edges; f(all kept) = 1 (the clean run) and
f(none kept) = 0 by construction.

m(empty), every head-to-head edge pruned, is not the node circuit without heads: there every
head's counterfactual output also reaches the MLPs and the logits; here heads still write what
they compute (layer 0's heads their clean outputs) to both. What does hold exactly, and is
tested in float64 (tests/evals/test_edge_faithfulness.py): one pruned edge moves the metric by
its path-patching effect (`patching.ground_truth`); pruning every edge out of s adds s's
counterfactual change to every later head's inputs and nothing else; pruning them all gives
each head the clean embeddings, the biases and this run's MLP outputs plus every earlier
head's counterfactual output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import TaskTokens

from .edges import QKV, factorized
from .faithfulness import curve, order
from .patching import _Runner, check_tokens, edge_mask, head_shape, result_hook


class NoFlow(SaelabError):
    """Cutting every head-to-head edge leaves the task metric where it was: f is undefined."""


def prune(cf: list[torch.Tensor], pruned: torch.Tensor) -> dict[str, Callable]:
    """Splices cutting the head-to-head edges where `pruned` ((L*H, L*H) bool, head index
    layer * H + head) is True; `cf[l]`: layer l's per-head counterfactual outputs (P, T, H, d).
    Needs `factorized(model)`."""
    n_layers, n_heads = len(cf), cf[0].shape[2]
    now: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            now[layer] = x.unflatten(-1, (n_heads, -1))
            return x
        return fn

    def cut(layer: int) -> Callable:
        into = pruned[:layer * n_heads, layer * n_heads:(layer + 1) * n_heads]  # (senders, H)

        def fn(x: torch.Tensor) -> torch.Tensor:
            change = torch.cat([cf[s].to(x) - now[s] for s in range(layer)], dim=2)  # (P, T, S, d)
            return x + torch.einsum("ptsd,sh->pthd", change, into.to(x)).flatten(2)
        return fn

    out = {result_hook(layer): keep(layer) for layer in range(n_layers - 1)}
    for layer in range(1, n_layers):
        if pruned[:, layer * n_heads:(layer + 1) * n_heads].any():
            out.update({f"blocks.{layer}.hook_{x}_input": cut(layer) for x in QKV})
    return out


def edge_problem(model: HookedModel) -> str | None:
    """Why `model` has no head-to-head edges to score and cut, or None."""
    n_layers, n_heads = head_shape(model)
    if n_layers < 2:
        return f"model {model.spec} has one layer, so no head feeds another"
    if getattr(model.model.cfg, "n_key_value_heads", None) not in (None, n_heads):
        return (f"model {model.spec} shares keys and values between heads (grouped-query "
                "attention), so a head has no Q, K and V input of its own")
    return None


def check_edge_scores(model: HookedModel, scores: torch.Tensor) -> torch.Tensor:
    """The (L*H, L*H) edge mask, or one line for a model without head-to-head edges or scores
    of another shape."""
    problem = edge_problem(model)
    if problem:
        raise SaelabError(f"{problem}; edge circuits need two layers or more of heads with their own inputs")
    n_layers, n_heads = head_shape(model)
    mask = edge_mask(n_layers, n_heads)
    if scores.shape != mask.shape:
        raise SaelabError(f"edge scores must be ({len(mask)}, {len(mask)}) for {n_layers} layers "
                          f"of {n_heads} heads (EdgeAttribution.head_edges()), got {tuple(scores.shape)}")
    return mask


def edge_faithfulness(model: HookedModel, tokens: TaskTokens, scores: torch.Tensor,
                      metric: str = "logit-diff", completeness: bool = True,
                      progress: bool = True) -> dict:
    """f of the top head-to-head edges by |score| (`scores`: (L*H, L*H), as
    `EdgeAttribution.head_edges()`) at every size, completeness, CPR, CMD, edges_to_08; see the
    module docstring."""
    check_tokens(tokens, "counterfactual")
    mask = check_edge_scores(model, scores)
    n_layers, n_heads = head_shape(model)
    pairs = mask.nonzero()
    run = _Runner(model, tokens, metric)
    with factorized(model):
        hooks = [result_hook(layer) for layer in range(n_layers)]
        full = run.run(tokens.pos).mean().item()
        _, acts = run.capture(tokens.cf, hooks, tokens.cf_len)
        cf = [acts[h].unflatten(-1, (n_heads, -1)) for h in hooks]

        def metric_of(patched: torch.Tensor) -> float:
            cut = torch.zeros_like(mask)
            cut[pairs[:, 0], pairs[:, 1]] = patched
            return run.run(tokens.pos, prune(cf, cut)).mean().item()

        empty = metric_of(torch.ones(len(pairs), dtype=torch.bool))
        span = full - empty
        if abs(span) < 1e-6:
            raise NoFlow(f"cutting every head-to-head edge leaves the task metric at {full:.4f}; "
                              "the task does not flow between heads, so edge faithfulness is undefined")
        out = curve(len(pairs), order(scores[mask]), lambda p: (metric_of(p) - empty) / span,
                    completeness, "edges", "faithfulness head-to-head edges", progress)
    return {"edges": len(pairs), **out, "m_full": round(full, 5), "m_empty": round(empty, 5),
            "ablation": "counterfactual", "metric": metric, "prompts": len(tokens),
            "forward_passes": run.passes}
