"""saelab's EAP edge scores checked against auto-circuit 1.0.1 itself, on the zoo task model.
auto-circuit needs transformer-lens 3.x, so this runs only where it imports (CI's side venv).

Two mends let auto-circuit 1.0.1 import on transformer-lens 3.9, applied before its import:
its KV-cache class moved (aliased here), and it imports `attrs` without declaring it (.ci/run
installs it)."""

import sys
import types

import pytest
import torch

from saelab.evals.circuits.edges import attribute_edges
from saelab.models import load_model
from saelab.tasks import draw_distinct, tokenize

MODEL = "zoo:tasks-4l"


def _mend_transformer_lens() -> None:
    """auto-circuit 1.0.1 imports transformer-lens 2's KV-cache name; 3.x moved the class."""
    import transformer_lens

    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    except ImportError:
        return  # not transformer-lens 3.x: auto-circuit will not import, and the test skips
    old = types.ModuleType("transformer_lens.past_key_value_caching")
    old.HookedTransformerKeyValueCache = TransformerLensKeyValueCache  # type: ignore[attr-defined]
    sys.modules.setdefault("transformer_lens.past_key_value_caching", old)
    transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache


_mend_transformer_lens()
pytest.importorskip("auto_circuit")

from auto_circuit.data import PromptPairBatch  # noqa: E402
from auto_circuit.prune_algos.edge_attribution_patching import (  # noqa: E402
    edge_attribution_patching_prune_scores,
)
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402


def one_length(model, task: str, n: int):
    """IOI tokens of the most common length (auto-circuit reads position -1 of unpadded rows)."""
    tok = tokenize(draw_distinct(task, n, 0), model.tokenizer, model.context_length)
    length = int(tok.pos_len.mode().values)
    keep = (tok.pos_len == length) & (tok.cf_len == length)
    tok = tok.rows(keep.nonzero().flatten())
    return tok, length


def auto_circuit_scores(tok, length: int) -> dict[str, float]:
    """auto-circuit's EAP scores (answer_diff) on its own copy of the model (it edits it)."""
    tl = load_model(MODEL).model
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    pm = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True,
                         device=torch.device("cpu"))
    batch = PromptPairBatch(0, 0, tok.pos[:, :length], tok.cf[:, :length], tok.answer, tok.wrong)
    scores = edge_attribution_patching_prune_scores(pm, [batch], None, answer_diff=True)
    return {e.name: float(scores[e.dest.module_name][e.patch_idx]) for e in pm.edges}


def test_eap_edge_scores_equal_auto_circuits():
    model = load_model(MODEL)
    tok, length = one_length(model, "ioi", 48)
    assert len(tok) >= 8
    ours = attribute_edges(model, tok, "eap")
    theirs = auto_circuit_scores(tok, length)
    mine = ours.edges()
    assert set(mine) == set(theirs)  # the same graph: Resid Start, heads' Q/K/V, MLPs, Resid End
    assert any(k.endswith(".Q") for k in mine) and "MLP 0->Resid End" in mine
    total = ours.clean_metric - ours.counterfactual_metric
    names = sorted(theirs)
    a = torch.tensor([mine[k] * total for k in names])  # back to metric units
    b = torch.tensor([theirs[k] for k in names])
    assert b.abs().max() > 0.1  # real effects, not rounding
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # a head-to-head edge is the sum of its Q, K and V edges
    heads = ours.head_edges() * total
    n = ours.n_heads
    for s, r in [(0, 2 * n + 1), (n + 3, 3 * n + 5)]:
        want = sum(theirs[f"A{s // n}.{s % n}->A{r // n}.{r % n}.{x}"] for x in "QKV")
        assert abs(float(heads[s, r]) - want) <= 1e-4 * float(b.abs().max())
