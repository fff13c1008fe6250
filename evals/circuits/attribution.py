"""Node scores by exact patching, attribution patching (EAP), EAP-IG and SAE codes.

Every method returns, per node of a basis (`bases`), an estimate of the node's effect as the
ground truth defines it (`patching`): the drop in the task metric when the node alone takes its
counterfactual (or mean) value, averaged over prompts and divided by the drop of the whole
counterfactual run.

- patching: one batched forward pass per node (exact; `max_nodes` caps the cost).
- eap (Syed et al.): -(a_cf - a_clean) . dm/da at the clean run; a clean and a counterfactual
  pass capture the activations, one more forward and backward pass takes the gradient.
- eap-ig: the same with dm/da averaged over `steps` runs whose token embeddings
  (`hook_embed`) lie at alpha = k/steps, k = 1..steps, on the line from the counterfactual's
  to the clean prompt's (Hanna et al.'s EAP-IG-inputs; one set of runs serves every site).
- codes: O'Neill & Bui's shared SAE (`discover`, one trial; heads only) with its config's score,
  by default relevance (each head's code change dotted with the metric's gradient): a ranking
  rather than an effect.
Activations are patched at every position, so a prompt and its counterfactual must have the
same length (or use ablation="mean").
Passes are counted per prompt, forward and backward separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from saelab.errors import SaelabError
from saelab.models import HookedModel
from saelab.tasks import Task, TaskTokens, last_logits, tokenize
from saelab.tasks import metric as task_metric

from .bases import Basis, Parts, Site
from .bases import basis as make_basis
from .patching import _masked_mean, _Runner, check_tokens

METHODS = ("patching", "eap", "eap-ig", "codes")
DEFAULT_STEPS = 5
DEFAULT_MAX_NODES = 4096


@dataclass
class Attribution:
    """Per-node scores of one method on one basis, and their cost.

    Fields:
        method, basis: what scored what.
        names: node names (heads "L.H", neurons "L.nI", latents "HOOK/I" and "HOOK/error").
        scores: (N,) estimated normalised effect (codes: discover's node score, a ranking).
        errors: (N,) bool, error nodes.
        forward_passes, backward_passes: per prompt.
        seconds: wall time.
        prompts: prompts scored.
        clean_metric, counterfactual_metric: mean task metric of the two runs.
    """

    method: str
    basis: str
    names: list[str]
    scores: torch.Tensor
    errors: torch.Tensor
    forward_passes: int
    backward_passes: int
    seconds: float
    prompts: int
    clean_metric: float = float("nan")
    counterfactual_metric: float = float("nan")
    extra: dict = field(default_factory=dict)

    def cost(self) -> dict:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "seconds": round(self.seconds, 3), "prompts": self.prompts}


class Sources:
    """The clean and source (counterfactual or mean) parts of every site, and the two metrics."""

    def __init__(self, run: _Runner, basis: Basis, ablation: str):
        tokens = run.tokens
        m_clean, clean = run.capture(tokens.pos, basis.hooks, tokens.pos_len)
        m_cf, cf = run.capture(tokens.cf, basis.hooks, tokens.cf_len)
        self.clean = [s.split(clean[s.hook]) for s in basis.sites]
        if ablation == "counterfactual":
            self.source = [s.split(cf[s.hook]) for s in basis.sites]
        else:
            self.source = [[_masked_mean(p.flatten(2), tokens.pos_len).reshape(p.shape) for p in parts]
                           for parts in self.clean]
        self.m_clean, self.m_cf = m_clean, m_cf
        self.total = (m_clean - m_cf).mean().item()
        if abs(self.total) < 1e-6:
            raise SaelabError(
                f"the counterfactual run does not change the task metric (clean {m_clean.mean():.4f},"
                f" counterfactual {m_cf.mean():.4f}); the model does not do this task")


def patch(site: Site, source: Parts, replace: list[torch.Tensor]) -> Callable:
    """A splice setting the nodes where `replace` (bool per group, (N_g,)) is True to `source`,
    the others as the run computes them."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        cur = site.split(x)
        delta = [(s.to(x) - c) * r.to(x)[:, None] for s, c, r in zip(source, cur, replace, strict=True)]
        return x + site.lin(delta)
    return fn


def patch_mask(basis: Basis, sources: list[Parts], mask: torch.Tensor) -> dict[str, Callable]:
    """Splices patching the nodes where `mask` (N,) is True; sites with none are left alone."""
    out = {}
    for site, src, groups in zip(basis.sites, sources, basis.per_site(mask), strict=True):
        if any(g.any() for g in groups):
            out[site.hook] = patch(site, src, groups)
    return out


def exact(model: HookedModel, tokens: TaskTokens, basis: Basis, ablation: str = "counterfactual",
          metric: str = "logit-diff", max_nodes: int = DEFAULT_MAX_NODES,
          progress: bool = True) -> Attribution:
    """Patch every node alone; see the module docstring."""
    if len(basis) > max_nodes:
        raise SaelabError(f"exact patching of {len(basis)} nodes needs {len(basis)} forward passes "
                          f"over the prompts, above max_nodes (--max-patch-nodes) = {max_nodes}; "
                          "raise it or use eap-ig")
    check_tokens(tokens, ablation)
    start, run = time.perf_counter(), _Runner(model, tokens, metric)
    src = Sources(run, basis, ablation)
    effect = torch.zeros(len(tokens), len(basis))
    one = torch.zeros(len(basis), dtype=torch.bool)
    for i in tqdm(range(len(basis)), desc=f"patching {basis.name}", disable=not progress):
        one[i] = True
        effect[:, i] = (src.m_clean - run.run(tokens.pos, patch_mask(basis, src.source, one))) / src.total
        one[i] = False
    return Attribution("patching", basis.name, basis.names, effect.mean(0), basis.errors, run.passes,
                       0, time.perf_counter() - start, len(tokens), src.m_clean.mean().item(),
                       src.m_cf.mean().item())


def _gradients(model: HookedModel, tokens: TaskTokens, basis: Basis, metric: str,
               embed: Callable | None = None) -> list[Parts]:
    """dm/d(part) of the summed task metric at every site's parts, on the positive prompts
    (token embeddings replaced by `embed` if given)."""
    deltas: list[Parts] = []

    def add(site: Site) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            zero = [torch.zeros_like(p).requires_grad_(True) for p in site.split(x.detach())]
            deltas.append(zero)
            return x + site.lin(zero)
        return fn

    replace = {s.hook: add(s) for s in basis.sites}
    if embed is not None:  # a site at hook_embed splits the interpolated embedding
        site_fn = replace.get("hook_embed")
        replace["hook_embed"] = embed if site_fn is None else (lambda x: site_fn(embed(x)))
    with torch.enable_grad():
        logits = model.logits(tokens.pos.to(model.device), replace)
        m = task_metric(metric)(last_logits(logits, tokens.pos_len), tokens).sum()
        flat = torch.autograd.grad(m, [d for parts in deltas for d in parts], allow_unused=True)
    grads, i = [], 0
    for parts in deltas:
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(parts, flat[i:], strict=False)])
        i += len(parts)
    return grads


def gradient_scores(model: HookedModel, tokens: TaskTokens, basis: Basis, method: str,
                    ablation: str = "counterfactual", metric: str = "logit-diff",
                    steps: int = DEFAULT_STEPS) -> Attribution:
    """EAP or EAP-IG (inputs) node scores; see the module docstring."""
    if steps < 1:
        raise SaelabError(f"steps must be positive, got {steps}")
    if method == "eap-ig" and ablation != "counterfactual":
        raise SaelabError("eap-ig interpolates from the counterfactual's token embeddings; use "
                          "ablation counterfactual with it, or eap for mean ablation")
    check_tokens(tokens, ablation)
    start, run = time.perf_counter(), _Runner(model, tokens, metric)
    src = Sources(run, basis, ablation)
    if method == "eap":
        grads, backward = _gradients(model, tokens, basis, metric), 1
    else:
        embeds = model.activations(tokens.cf.to(model.device), ["hook_embed"])["hook_embed"]
        backward = steps
        runs = []
        for k in range(1, steps + 1):
            def embed(x: torch.Tensor, a: float = k / steps) -> torch.Tensor:
                return embeds.to(x) + a * (x - embeds.to(x))

            runs.append(_gradients(model, tokens, basis, metric, embed))
        grads = [[torch.stack(g).mean(0) for g in zip(*site, strict=True)]
                 for site in zip(*runs, strict=True)]
        run.passes += len(tokens)  # the counterfactual embeddings
    score = torch.cat([((s - c) * g.cpu()).sum((1, 3)) for src_p, clean_p, grad_p in
                       zip(src.source, src.clean, grads, strict=True)
                       for s, c, g in zip(src_p, clean_p, grad_p, strict=True)], dim=1)  # (P, N)
    effect = -score / src.total
    forward = run.passes + backward * len(tokens)
    return Attribution(method, basis.name, basis.names, effect.mean(0), basis.errors, forward,
                       backward * len(tokens), time.perf_counter() - start, len(tokens),
                       src.m_clean.mean().item(), src.m_cf.mean().item(),
                       {"steps": steps} if method == "eap-ig" else {})


def code_scores(model: HookedModel, task: str | Task, basis: Basis, prompts: int, seed: int,
                progress: bool = True, config=None) -> Attribution:
    """Per-head scores from one `discover` trial (heads only) of `config` (a DiscoverConfig; its
    SAE settings and score, by default relevance, with one trial of `prompts` held-out prompts)."""
    from dataclasses import replace

    from .discover import DiscoverConfig, discover
    from .patching import GroundTruth

    if basis.name != "heads":
        raise SaelabError("the codes method scores heads only; use --basis heads, or eap, eap-ig "
                          "or patching for neurons and dictionaries")
    n = len(basis)
    n_layers = len(basis.sites)
    none = torch.full((n,), float("nan"))
    truth = GroundTruth(n_layers, n // n_layers, none, none, torch.full((n, n), float("nan")), None,
                        "counterfactual", 0, 0, 0, 0.0, 0.0, "logit-diff", 0.0, 0.0)
    cfg = replace(config or DiscoverConfig(), trials=1, prompts=prompts, edges=False, seed=seed)
    res = discover(model, task, config=cfg, truth=truth, progress=progress)
    return Attribution("codes", "heads", basis.names, res.node_counts[0], basis.errors,
                       res.passes[0], res.backward_passes[0], res.seconds[0], prompts)


def attribute(model: HookedModel, task: str | Task | TaskTokens, basis="heads", method: str = "eap-ig",
              *, prompts: int = 64, seed: int = 0, ablation: str = "counterfactual",
              metric: str = "logit-diff", steps: int = DEFAULT_STEPS,
              max_nodes: int = DEFAULT_MAX_NODES, progress: bool = True,
              codes_config=None) -> Attribution:
    """Score every node of `basis` ("heads", "neurons", a dictionary path, an SAE, {hook: SAE} or
    a `Basis`) on `task` (a name, a `Task`, or `TaskTokens`) with `method` (`METHODS`).

    A task name draws `prompts` distinct rows with `seed`; codes draws its SAE's training rows
    and `prompts` scored rows from the task (from a `Task`'s rows alone), its SAE set by
    `codes_config` (a DiscoverConfig)."""
    from saelab.tasks import draw_distinct

    if method not in METHODS:
        raise SaelabError(f"unknown attribution method {method!r}; use {', '.join(METHODS)}")
    b = basis if isinstance(basis, Basis) else make_basis(model, basis)
    if method == "codes":
        if isinstance(task, TaskTokens):
            raise SaelabError("the codes method needs a task name or Task, not tokens")
        return code_scores(model, task, b, prompts, seed, progress, codes_config)
    if isinstance(task, TaskTokens):
        tokens = task
    else:
        rows = draw_distinct(task, prompts, seed) if isinstance(task, str) else task
        tokens = tokenize(rows, model.tokenizer, model.context_length)
    if method == "patching":
        return exact(model, tokens, b, ablation, metric, max_nodes, progress)
    return gradient_scores(model, tokens, b, method, ablation, metric, steps)
