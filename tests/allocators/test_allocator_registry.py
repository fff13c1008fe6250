"""The allocator registry: each kind is one registered object that the SAE, the trainer and the
formats ask, so no code outside `saelab/allocators/` compares allocator names, and a new kind
works everywhere once registered."""

import re
from pathlib import Path

import pytest
import torch

from saelab import allocators
from saelab.allocators.base import Allocator, Selection, topk
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[2]
NAME_TEST = re.compile(r"allocator\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*\S*\.allocator\b")


def test_no_allocator_name_comparisons_outside_the_registry():
    found = []
    for folder in ("saelab", "training", "evals", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "saelab" / "allocators") or path.parent.is_symlink():
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if NAME_TEST.search(line.split("#")[0]):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, found


def test_scan_sees_a_comparison():
    assert NAME_TEST.search('if cfg.allocator == "relu":')
    assert NAME_TEST.search('with_grads=cfg.sae.allocator == "gradient_topk"')
    assert not NAME_TEST.search('allocator=dic.allocator, beta=dic.beta')


@pytest.mark.parametrize("name", allocators.ALLOCATORS)
def test_every_kind_builds_and_selects(name):
    kind = allocators.get(name)
    assert kind.name == name and kind.saelens_architecture in ("topk", "standard", "jumprelu")
    sae = SAE(SAEConfig(d_in=6, n_latents=10, k=3 if kind.budget else 0, allocator=name)).train()
    assert hasattr(sae, "threshold") == kind.thresholds
    if kind.thresholds:
        sae.threshold.fill_(0.1)
    x = torch.randn(8, 6)
    pre = sae.pre_acts(x)
    sel = sae.select(pre, grad=torch.randn(8, 6) if kind.needs_grad else None, batch=kind.batch_level)
    active = torch.zeros_like(pre, dtype=torch.bool).scatter_(
        1, sel.idx, torch.ones_like(sel.idx, dtype=torch.bool) if sel.mask is None else sel.mask)
    if kind.budget and not kind.batch_level:
        assert (active.sum(1) == 3).all()
    elif kind.budget:
        assert active.sum() <= 3 * 8
    else:
        limit = sae.threshold if kind.thresholds else 0.0
        assert torch.equal(active, pre > limit)


def test_unknown_allocator_is_one_line():
    with pytest.raises(SaelabError, match="unknown allocator 'bottomk'; available: topk, "):
        allocators.get("bottomk")


class BottomK(Allocator):
    """A kind made up for this test: the k *smallest* pre-activations (never useful)."""

    name = "bottomk"
    saelens_architecture = "topk"

    def select(self, sae, pre, grad, batch) -> Selection:
        return topk(-pre, sae.cfg.k)


def test_a_new_kind_is_one_registration(monkeypatch):
    monkeypatch.setitem(allocators.REGISTRY, "bottomk", BottomK())
    sae = SAE(SAEConfig(d_in=5, n_latents=9, k=2, allocator="bottomk"))
    x = torch.randn(4, 5)
    idx, _ = sae.encode(x)
    expected = sae.pre_acts(x).topk(2, dim=1, largest=False).indices
    assert torch.equal(idx.sort(1).values, expected.sort(1).values)
