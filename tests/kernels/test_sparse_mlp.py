"""Activation-sparse MLP forwards (saelab.kernels.SparseMLP) against the dense MLP in float64.

Runs on the torch backend here, and on the Triton backend in a TRITON_INTERPRET=1 subprocess
(as tests/kernels/test_kernels_triton.py does): the same tests, rerouted by `auto` dispatch.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels import rerun_interpreted  # same folder
from torch.testing import assert_close

from saelab.kernels import SparseMLP, backend, mask_code

F64 = torch.float64
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _mlp(d: int, d_ff: int, seed: int, dtype=F64, act=torch.relu, offset: float = -1.5) -> SparseMLP:
    """Random weights whose ReLU units are mostly inactive (negative input bias)."""
    g = torch.Generator().manual_seed(seed)
    W_in = torch.randn(d, d_ff, generator=g, dtype=F64) / d**0.5
    b_in = torch.randn(d_ff, generator=g, dtype=F64) * 0.3 + offset
    W_out = torch.randn(d_ff, d, generator=g, dtype=F64)
    b_out = torch.randn(d, generator=g, dtype=F64)
    return SparseMLP.of(*(t.to(dtype) for t in (W_in, b_in, W_out, b_out)), act=act)


def _x(B: int, d: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def test_backend_in_use():
    assert backend.name_for(torch.device("cpu")) == ("triton" if INTERPRETED else "torch")


def test_mask_code_hand_computed():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = mask_code(mask)
    assert idx.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    idx, valid = mask_code(mask[:1])  # batch 1: exactly the active units, no padding
    assert idx.tolist() == [[1, 3, 4]] and valid.all()
    idx, valid = mask_code(mask[1:2])
    assert idx.shape == (1, 1) and not valid.any()


# (B, d, d_ff): batch 1 (decode) and batched; d_ff not a power of two; d > the kernels' blocks
SHAPES = [(1, 8, 37), (1, 70, 96), (5, 8, 37), (9, 70, 96)]


@pytest.mark.parametrize(("B", "d", "d_ff"), SHAPES)
def test_sparse_down_matches_dense(B, d, d_ff):
    mlp = _mlp(d, d_ff, seed=B + d)
    x = _x(B, d, seed=1)
    h = mlp.hidden(x)
    assert 0 < (h > 0).double().mean() < 0.4  # sparse, not trivially so
    assert_close(mlp.sparse_down(x), mlp.dense(x))
    assert_close(mlp.union_down(x), mlp.dense(x))


def test_sparse_down_with_an_all_zero_token():
    mlp = _mlp(8, 37, seed=3)
    x = _x(4, 8, seed=2)
    x[2] = 0  # pre = b_in < 0 everywhere: no active unit at all
    assert (mlp.hidden(x)[2] == 0).all()
    assert_close(mlp.sparse_down(x), mlp.dense(x))
    assert_close(mlp.sparse_down(x[2:3]), mlp.dense(x[2:3]))
    assert_close(mlp.union_down(x[2:3]), mlp.dense(x[2:3]))


@pytest.mark.parametrize(("B", "d", "d_ff"), SHAPES)
@pytest.mark.parametrize("which", ["exact", "subset", "superset"])
def test_active_set_forward(B, d, d_ff, which):
    """Only the given units are computed: equals the dense MLP with the others zeroed."""
    mlp = _mlp(d, d_ff, seed=d_ff + B)
    x = _x(B, d, seed=4)
    h = mlp.hidden(x)
    g = torch.Generator().manual_seed(5)
    coin = torch.rand(h.shape, generator=g, dtype=F64) < 0.5
    chosen = {"exact": h > 0, "subset": (h > 0) & coin, "superset": (h > 0) | coin}[which]
    idx, valid = mask_code(chosen)
    ref = (h * chosen) @ mlp.W_out + mlp.b_out
    assert_close(mlp.active(x, idx, valid), ref)
    if which != "subset":  # every active unit computed: the MLP's exact output
        assert_close(mlp.active(x, idx, valid), mlp.dense(x))


def test_active_set_forward_gelu():
    gelu = torch.nn.functional.gelu
    mlp = _mlp(16, 40, seed=7, act=gelu, offset=0.0)
    x = _x(6, 16, seed=8)
    h = mlp.hidden(x)
    chosen = h.abs() > 0.05
    idx, valid = mask_code(chosen)
    assert_close(mlp.active(x, idx, valid), (h * chosen) @ mlp.W_out + mlp.b_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    mlp64, x64 = _mlp(70, 96, seed=9), _x(3, 70, seed=10)
    mlp = _mlp(70, 96, seed=9, dtype=dtype)
    x = x64.to(dtype)
    ref = mlp64.dense(x64)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    idx, valid = mask_code(mlp64.hidden(x64) > 0)
    for out in (mlp.sparse_down(x), mlp.active(x, idx, valid)):
        assert out.dtype == dtype
        assert_close(out.double(), ref, **tol)


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_under_triton_interpreter():
    assert "skipped" in rerun_interpreted(__file__)  # only this test skips there
