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
4. measures faithfulness of the method's top nodes on the held-out prompts (`faithfulness`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.checks import check_field_types, check_number, doc_field
from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import METRICS, Task, check_capacity, default_metric, draw_distinct, tokenize

from . import scoring
from .accuracy import warn_if_inaccurate
from .attribution import DEFAULT_STEPS, METHODS, Attribution, attribute
from .bases import Basis, HeadSite
from .bases import basis as make_basis
from .faithfulness import faithfulness
from .patching import ABLATIONS, _above_share


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
                                     "pass over the prompts per node).")
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
    name = task if isinstance(task, str) else task.name
    metric = cfg.attr_metric or default_metric(name)
    train = _codes_train_prompts(codes_config) if method == "codes" else 0
    split = cfg.attr_prompts + cfg.faith_prompts
    sizes = f"{cfg.attr_prompts} + {cfg.faith_prompts}"
    check_capacity(task, split + train,
                   f"attr_prompts + faith_prompts + train_prompts = {sizes} + {train}" if train
                   else f"attr_prompts + faith_prompts = {sizes}")
    b = basis if isinstance(basis, Basis) else make_basis(model, basis)
    check_method(method, "heads" if all(isinstance(s, HeadSite) for s in b.sites) else b.name)
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
    return report(model, name, b, scores, exact, faith, method, cfg, metric)


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
