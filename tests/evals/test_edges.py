"""EAP edge scores against finite differences of path patching, in float64.

An edge's EAP score is the derivative, along the sender's counterfactual change, of the metric
when that change reaches the receiver alone. Path patching computes that run without the
split-input hooks the scores use: the change eps * delta is added to the residual stream where
the receiver reads it (a head's layer's hook_resid_pre, an MLP's hook_resid_mid, the last
hook_resid_post), the receiver's output (its hook_z slice, its hook_mlp_out) is read from that
run and spliced into a clean one. A central difference of that metric in eps is the reference.
"""

import pytest
import torch
from test_circuits_patching import TASK, tiny_model

from saelab.errors import SaelabError
from saelab.evals.circuits.edges import attribute_edges, factorized, graph
from saelab.models import load_model
from saelab.tasks import Task, last_logits, tokenize

EPS = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("e") / "m"
    tiny_model(path, live={(0, 0), (0, 1), (1, 0), (1, 1)})
    return load_model(str(path), dtype=torch.float64)


def metric(model, tok, replace) -> torch.Tensor:
    """Mean logit difference in float64 (the task metric rounds to float32, too coarse for
    a difference quotient); TASK has one answer and one wrong token per prompt."""
    with torch.no_grad():
        last = last_logits(model.logits(tok.pos, replace), tok.pos_len)
    return (last.gather(1, tok.answer[:, :1]) - last.gather(1, tok.wrong[:, :1])).mean()


def path_patched(model, tok, inject: str, delta, read: str | None, head: int | None, eps: float):
    """Metric of a clean run whose receiver (output at `read`, one head's slice if `head`) is
    taken from a run with eps * delta added at `inject` (no `read`: the metric of that run)."""
    add = {inject: lambda x: x + eps * delta}
    if read is None:
        return metric(model, tok, add)
    got = {}

    def keep(x):
        got["x"] = x.clone()
        return x

    metric(model, tok, {**add, read: keep})
    if head is None:
        return metric(model, tok, {read: lambda x: got["x"]})
    d = got["x"].shape[-1] // model.model.cfg.n_heads
    sl = slice(head * d, (head + 1) * d)

    def splice(x):
        x = x.clone()
        x[..., sl] = got["x"][..., sl]
        return x

    return metric(model, tok, {read: splice})


def receiver_site(name: str, n_layers: int) -> tuple[str, str | None, int | None]:
    """(where the change is added, where the receiver's output is read, its head)."""
    if name == "Resid End":
        return f"blocks.{n_layers - 1}.hook_resid_post", None, None
    if name.startswith("MLP"):
        layer = int(name.split()[1])
        return f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out", None
    layer, head = (int(v) for v in name[1:].split("."))
    return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z", head


def test_eap_edges_are_path_patching_derivatives(model):
    tok = tokenize(TASK, model.tokenizer)
    scores = attribute_edges(model, tok, "eap")
    total = scores.clean_metric - scores.counterfactual_metric
    senders, _ = graph(model)
    acts = {}
    for name, toks in (("clean", tok.pos), ("cf", tok.cf)):
        with factorized(model):
            acts[name] = model.activations(toks, list(dict.fromkeys(s.hook for s in senders)))
    n_heads, n_layers = model.model.cfg.n_heads, model.n_layers
    edges = scores.edges()
    receivers = ["Resid End"] + [f"MLP {layer}" for layer in range(n_layers)] + [
        f"A{layer}.{h}" for layer in range(n_layers) for h in range(n_heads)]
    checked = 0
    for sender in senders:
        diff = acts["cf"][sender.hook] - acts["clean"][sender.hook]
        delta = diff.unflatten(-1, (n_heads, -1))[:, :, sender.head] if sender.head is not None else diff
        for r in receivers:
            if r.startswith("A"):  # a head reads through Q, K and V: the path sums the three
                if f"{sender.name}->{r}.Q" not in edges:
                    continue
                got = sum(edges[f"{sender.name}->{r}.{x}"] for x in "QKV")
            elif f"{sender.name}->{r}" in edges:
                got = edges[f"{sender.name}->{r}"]
            else:
                continue
            inject, read, head = receiver_site(r, n_layers)
            up = path_patched(model, tok, inject, delta, read, head, EPS)
            down = path_patched(model, tok, inject, delta, read, head, -EPS)
            want = -float(up - down) / (2 * EPS) / total
            assert abs(float(got) - want) < 1e-6 * (1 + abs(want)), f"{sender.name}->{r}"
            checked += 1
    # Resid End: all 7 senders; MLP 0: 3, MLP 1: 6; layer-0 heads: Resid Start; layer-1 heads: 4
    assert checked == 7 + 3 + 6 + 2 * 1 + 2 * 4
    assert max(abs(v) for v in edges.values()) > 1e-2  # real effects


def test_q_k_and_v_edges_split_the_head_edge(model):
    """Each letter's score is the derivative of adding the change to that input alone."""
    tok = tokenize(TASK, model.tokenizer)
    scores = attribute_edges(model, tok, "eap")
    edges, total = scores.edges(), scores.clean_metric - scores.counterfactual_metric
    with factorized(model):
        acts = {k: model.activations(t, ["blocks.0.attn.hook_result"])["blocks.0.attn.hook_result"]
                for k, t in (("clean", tok.pos), ("cf", tok.cf))}
        delta = (acts["cf"] - acts["clean"]).unflatten(-1, (2, -1))[:, :, 1]  # head A0.1
        for x in "qkv":
            def add(v, eps):
                def fn(a):
                    a = a.unflatten(-1, (2, -1)).clone()
                    a[:, :, 0] += eps * v  # receiver A1.0
                    return a.flatten(2)
                return fn
            hook = f"blocks.1.hook_{x}_input"
            want = -float(metric(model, tok, {hook: add(delta, EPS)})
                          - metric(model, tok, {hook: add(delta, -EPS)})) / (2 * EPS) / total
            assert abs(edges[f"A0.1->A1.0.{x.upper()}"] - want) < 1e-6 * (1 + abs(want))
    assert abs(sum(edges[f"A0.1->A1.0.{x}"] for x in "QKV") - float(scores.head_edges()[1, 2])) < 1e-9


def test_eap_ig_with_one_step_is_eap(model):
    """EAP-IG's single step sits at alpha = 1: the clean run, EAP's gradient."""
    tok = tokenize(TASK, model.tokenizer)
    eap, ig = attribute_edges(model, tok, "eap"), attribute_edges(model, tok, "eap-ig", steps=1)
    torch.testing.assert_close(eap.scores, ig.scores, equal_nan=True)
    ig5 = attribute_edges(model, tok, "eap-ig")
    assert (ig5.backward_passes, ig5.forward_passes) == (5 * len(tok), 8 * len(tok))
    assert not torch.allclose(ig5.scores.nan_to_num(), eap.scores.nan_to_num())


def test_settings_restored_and_bad_input(model):
    tok = tokenize(TASK, model.tokenizer)
    attribute_edges(model, tok)
    assert not model.model.cfg.use_split_qkv_input and not model.model.cfg.use_hook_mlp_in
    with pytest.raises(SaelabError, match="unknown edge attribution method 'acdc'; use eap or eap-ig"):
        attribute_edges(model, tok, "acdc")
    uneven = Task("copy", ("abcd",), ("xbcde",), (("e",),), (("f",),))
    with pytest.raises(SaelabError, match="differ in length"):
        attribute_edges(model, uneven)
    same = Task("copy", ("abcd", "qbcd"), ("abcd", "qbcd"), (("e",), ("e",)), (("f",), ("f",)))
    with pytest.raises(SaelabError, match="does not change the task metric"):
        attribute_edges(model, same)
