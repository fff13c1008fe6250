"""Circuit recovery by node attribution: one method on one basis, judged three ways.

`recover(model, task, basis, method, config)`:
1. draws `attr_prompts + faith_prompts` distinct task rows (seed `seed`) and splits them: the
   first part is scored, the second is held out for faithfulness (codes: `train_prompts` more
   rows after those for its SAE, and `discover` draws from the scored and those rows alone, so
   no method sees a held-out text);
2. scores every node with `method` (`attribution.attribute`) on the scored prompts;
3. patches every node exactly on the same prompts (when the basis has at most
   `max_patch_nodes` nodes): the ground truth. Agreement: Pearson correlation of the method's
   scores with the exact effects (how well it estimates them), and node ROC AUC of |score|
   against the ground-truth circuit (nodes whose |effect| exceeds an equal share of the
   summed |effects|, `patching`'s rule);
4. measures faithfulness of the method's top nodes on the held-out prompts (`faithfulness`);
5. with eap or eap-ig on heads (`attr_edges`), the same for head-to-head edges (`edge_report`):
   scores from `edges.edge_scores` (Q + K + V), agreement with path patching of every direct
   head-to-head path (`patching.ground_truth`, the codes method's edge truth) on the scored
   prompts, and edge-circuit faithfulness on the held-out ones (`edge_faithfulness`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.checks import check_field_types, check_number, doc_field
from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import (
    METRICS,
    Task,
    TaskTokens,
    check_capacity,
    default_metric,
    draw_distinct,
    tokenize,
)

from . import scoring
from .accuracy import warn_if_inaccurate
from .attribution import DEFAULT_STEPS, METHODS, Attribution, attribute
from .bases import Basis, HeadSite
from .bases import basis as make_basis
from .edge_faithfulness import NoFlow, edge_faithfulness, edge_problem
from .edges import EDGE_METHODS, edge_scores
from .faithfulness import faithfulness, order
from .patching import ABLATIONS, _above_share, edge_mask, ground_truth

TOP_EDGES = 20  # edges listed by name in circuits.json's "top" and circuits.md


@dataclass(frozen=True)
class AttributionConfig:
    """How `--method patching|eap|eap-ig` scores nodes and judges the circuits they give (the
    codes method's settings are under Discovery)."""

    attr_prompts: int = doc_field(48, "Prompts the method scores nodes on (and exact patching "
                                  "patches, for the agreement numbers); with faith_prompts at "
                                  "most what the task can make (greater-than: 112).")
    faith_prompts: int = doc_field(48, "Held-out prompts, disjoint from the scored ones, on "
                                   "which circuit faithfulness is measured.")
    ig_steps: int = doc_field(DEFAULT_STEPS, "EAP-IG interpolation steps between the "
                              "counterfactual's and the prompt's token embeddings.")
    node_ablation: str = doc_field("counterfactual", "What a patched node takes: its "
                                   "counterfactual value or its mean over the prompts.")
    max_patch_nodes: int = doc_field(1024, "Exact patching (ground truth, Pearson, ROC AUC) runs "
                                     "only for bases with at most this many nodes (one forward "
                                     "pass over the prompts per node), and path patching of "
                                     "head-to-head edges for at most this many edges.")
    attr_edges: bool | None = doc_field(None, "Also score head-to-head edges (eap or eap-ig on "
                                        "heads, counterfactual patching): agreement with path "
                                        "patching and faithfulness of edge circuits.",
                                        default_doc="on where edges exist: eap or eap-ig on heads "
                                        "of a model of two layers or more without grouped-query "
                                        "attention, counterfactual patching")
    completeness: bool = doc_field(True, "Also measure completeness (the circuit patched, the "
                                   "rest kept) at every size.")
    attr_metric: str | None = doc_field(None, "Task metric: logit-diff or prob-diff (--metric "
                                        "also sets it).",
                                        default_doc="the task's own: prob-diff for greater-than, "
                                        "logit-diff otherwise")
    attr_seed: int = doc_field(0, "Seed of the scored and held-out prompts.")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("attr_prompts", "faith_prompts", "ig_steps", "max_patch_nodes"):
            check_number(name, getattr(self, name), 1)
        check_number("attr_seed", self.attr_seed, 0)
        if self.node_ablation not in ABLATIONS:
            raise SaelabError(f"unknown node ablation {self.node_ablation!r}; use "
                              f"{' or '.join(ABLATIONS)}")
        if self.attr_metric is not None and self.attr_metric not in METRICS:
            raise SaelabError(f"unknown task metric {self.attr_metric!r}; use {' or '.join(METRICS)}")


def check_method(method: str, basis: str) -> None:
    """One line for a method the basis cannot take."""
    if method not in METHODS:
        raise SaelabError(f"unknown circuit method {method!r}; use {', '.join(METHODS)}")
    if method == "codes" and basis != "heads":
        raise SaelabError(f"the codes method scores heads only, not {basis!r}; use --method eap, "
                          "eap-ig or patching for neurons and dictionaries")


def edges_wanted(edges: bool | None, method: str, basis: str, ablation: str) -> bool:
    """Whether head-to-head edges are scored (`attr_edges`; None: where they can be), or one
    line for edges asked of a method or basis that has none."""
    can = method in EDGE_METHODS and basis == "heads" and ablation == "counterfactual"
    if edges and not can:
        why = (f"basis {basis!r} has no edges (edges join heads); use --basis heads" if basis != "heads"
               else f"edges are scored by eap or eap-ig, not {method}" if method not in EDGE_METHODS
               else "edges are patched from the counterfactual; use --node-ablation counterfactual")
        raise SaelabError(f"--attr-edges: {why}, or drop --attr-edges")
    return can if edges is None else edges


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _codes_train_prompts(codes_config) -> int:
    from .discover import DiscoverConfig  # discover imports this module

    return (codes_config or DiscoverConfig()).train_prompts


def recover(model: HookedModel, task: str | Task, basis="heads", method: str = "eap-ig",
            config: AttributionConfig | None = None, progress: bool = True,
            truth: bool = True, codes_config=None) -> dict:
    """The report dict of one method on one basis; see the module docstring (`truth=False`
    skips step 3; `codes_config`: the DiscoverConfig of the codes method's SAE)."""
    cfg = config or AttributionConfig()
    if isinstance(basis, str):
        check_method(method, basis)
        edges_wanted(cfg.attr_edges, method, basis, cfg.node_ablation)
    name = task if isinstance(task, str) else task.name
    metric = cfg.attr_metric or default_metric(name)
    train = _codes_train_prompts(codes_config) if method == "codes" else 0
    split = cfg.attr_prompts + cfg.faith_prompts
    sizes = f"{cfg.attr_prompts} + {cfg.faith_prompts}"
    check_capacity(task, split + train,
                   f"attr_prompts + faith_prompts + train_prompts = {sizes} + {train}" if train
                   else f"attr_prompts + faith_prompts = {sizes}")
    b = basis if isinstance(basis, Basis) else make_basis(model, basis)
    kind = "heads" if all(isinstance(s, HeadSite) for s in b.sites) else b.name
    check_method(method, kind)
    edges = edges_wanted(cfg.attr_edges, method, kind, cfg.node_ablation)
    problem = edge_problem(model) if edges else None
    if problem and cfg.attr_edges:
        raise SaelabError(f"--attr-edges: {problem}; drop --attr-edges")
    edges = edges and not problem  # on by default only where edges exist
    rows = draw_distinct(task, split + train, cfg.attr_seed)
    scored = tokenize(rows.subset(range(cfg.attr_prompts)), model.tokenizer, model.context_length)
    held = tokenize(rows.subset(range(cfg.attr_prompts, split)), model.tokenizer,
                    model.context_length)
    kw: dict = {"ablation": cfg.node_ablation, "metric": metric, "progress": progress}
    if method != "codes":  # discover warns on its own rows
        warn_if_inaccurate(model, name, scored)
    if method == "codes":  # the scored rows and its SAE's, never the held-out ones
        seen = rows.subset([*range(cfg.attr_prompts), *range(split, split + train)])
        scores = attribute(model, seen, b, "codes", prompts=cfg.attr_prompts, seed=cfg.attr_seed,
                           progress=progress, codes_config=codes_config)
    else:
        scores = attribute(model, scored, b, method, steps=cfg.ig_steps,
                           max_nodes=cfg.max_patch_nodes, **kw)
    exact = None
    if truth and len(b) <= cfg.max_patch_nodes:
        exact = scores if method == "patching" else attribute(model, scored, b, "patching",
                                                              max_nodes=cfg.max_patch_nodes, **kw)
    faith = faithfulness(model, held, b, scores.scores, cfg.node_ablation, metric,
                         cfg.completeness, progress)
    out = report(model, name, b, scores, exact, faith, method, cfg, metric)
    if edges:
        out["edges"] = edge_report(model, scored, held, method, cfg, metric,
                                   truth and exact is not None, progress)
    return out


def edge_report(model: HookedModel, scored: TaskTokens, held: TaskTokens, method: str,
                cfg: AttributionConfig, metric: str, truth: bool, progress: bool) -> dict:
    """circuits.json's "edges": head-to-head scores, their agreement with path patching (with
    `truth`, at most `max_patch_nodes` edges) and edge-circuit faithfulness (module docstring)."""
    attr = edge_scores(model, scored, method, metric, cfg.ig_steps)
    scores = attr.head_edges()
    mask, n = edge_mask(attr.n_layers, attr.n_heads), attr.n_heads
    names = [f"{s // n}.{s % n}->{r // n}.{r % n}" for s, r in mask.nonzero().tolist()]
    values = scores[mask]
    out = {"method": method, "edges": len(names), "graph_edges": len(attr.edges()),
           "cost": attr.cost(), "cpr": None, "cmd": None, "edges_to_08": None, "faithfulness": None,
           "top": [[names[i], round(float(values[i]), 6)] for i in order(values)[:TOP_EDGES].tolist()],
           "scores": dict(zip(names, (round(v, 6) for v in values.tolist()), strict=True))}
    try:
        faith = edge_faithfulness(model, held, scores, metric, cfg.completeness, progress)
        out.update(cpr=faith["cpr"], cmd=faith["cmd"], edges_to_08=faith["edges_to_08"],
                   faithfulness=faith)
    except NoFlow as e:  # the node report stands; say why the edge curve is missing
        out["faithfulness_note"] = str(e)
    if not truth or len(names) > cfg.max_patch_nodes:
        out.update(edge_roc_auc=None, pearson=None, truth=None,
                   truth_note=f"no path patching ({len(names)} edges; max_patch_nodes="
                   f"{cfg.max_patch_nodes}, or no node patching)")
        return out
    gt = ground_truth(model, scored, edges=True, metric=metric, progress=progress)
    effect, circuit = gt.edge_effect[mask], gt.edges[mask]
    out.update(edge_roc_auc=scoring.roc_auc(values.abs(), circuit), pearson=pearson(values, effect))
    out["truth"] = {
        "source": "path patching of every head-to-head direct path (patching.ground_truth, the "
                  "codes method's edge truth), same prompts",
        "cost": {"forward_passes": gt.node_passes + gt.edge_passes,
                 "seconds": round(gt.node_seconds + gt.edge_seconds, 3), "prompts": gt.prompts},
        "circuit": [names[i] for i in circuit.nonzero().flatten().tolist()],
        "top": [[names[i], round(float(effect[i]), 6)] for i in order(effect)[:TOP_EDGES].tolist()],
        "all": dict(zip(names, (round(v, 6) for v in effect.tolist()), strict=True))}
    return out


def report(model: HookedModel, task: str, b: Basis, scores: Attribution, truth: Attribution | None,
           faith: dict, method: str, cfg: AttributionConfig, metric: str) -> dict:
    """circuits.json's content for an attribution method."""
    from dataclasses import asdict

    out = {"model": model.spec, "task": task, "method": method, "basis": b.name, "metric": metric,
           "nodes": len(b), "error_nodes": int(b.errors.sum()), "sites": b.hooks,
           "config": asdict(cfg), "cost": scores.cost(),
           "cpr": faith["cpr"], "cmd": faith["cmd"], "nodes_to_08": faith["nodes_to_08"],
           "faithfulness": faith, "scores": dict(zip(b.names, (round(v, 6) for v in
                                                              scores.scores.tolist()), strict=True))}
    if scores.extra:
        out["method_settings"] = scores.extra
    if truth is None:
        out.update(node_roc_auc=None, pearson=None, truth=None,
                   truth_note=f"no exact patching ({len(b)} nodes; max_patch_nodes="
                   f"{cfg.max_patch_nodes})")
        return out
    circuit = _above_share(truth.scores, None)
    out["node_roc_auc"] = scoring.roc_auc(scores.scores.abs(), circuit)
    out["pearson"] = pearson(scores.scores, truth.scores) if method != "codes" else None
    top = truth.scores.abs().argsort(descending=True)
    out["truth"] = {"source": "exact patching of every node, same prompts", "cost": truth.cost(),
                    "circuit": [b.names[i] for i in circuit.nonzero().flatten().tolist()],
                    "top": {b.names[i]: round(float(truth.scores[i]), 5) for i in top[:10].tolist()},
                    "all": dict(zip(b.names, (round(v, 6) for v in truth.scores.tolist()), strict=True)),
                    "clean_metric": truth.clean_metric,
                    "counterfactual_metric": truth.counterfactual_metric}
    return out


def dictionary_circuit(model: HookedModel, sae, task: str, method: str = "eap-ig",
                       config: AttributionConfig | None = None) -> dict:
    """What `saelab eval DICT --task T` adds to eval.json: the faithfulness of circuits of the
    dictionary's latents (and error node) scored by `method`, without exact patching."""
    r = recover(model, task, {sae.cfg.hook: sae}, method, config, progress=True, truth=False)
    f = r["faithfulness"]
    return {"task": task, "method": method, "metric": r["metric"], "nodes": r["nodes"],
            "cpr": r["cpr"], "cmd": r["cmd"], "nodes_to_08": r["nodes_to_08"],
            "fraction_to_08": f["fraction_to_08"], "sizes": f["sizes"],
            "faithfulness": f["faithfulness"], "completeness": f["completeness"],
            "error_nodes_kept": f["error_nodes_kept"], "prompts": f["prompts"],
            "ablation": f["ablation"], "cost": r["cost"],
            "circuit_nodes": top_nodes(r["scores"], r["nodes_to_08"])}


def top_nodes(scores: dict[str, float], k: int | None) -> list[list]:
    """[name, score] of the k nodes faithfulness keeps first (largest |score|): with k =
    nodes_to_08, the smallest measured circuit with f >= 0.8 (none when no size reached it)."""
    from .faithfulness import order

    names = list(scores)
    ranked = order(torch.tensor([scores[n] for n in names]))
    return [[names[i], scores[names[i]]] for i in ranked[:k or 0].tolist()]
