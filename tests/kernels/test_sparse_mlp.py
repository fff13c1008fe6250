"""Activation-sparse MLP forwards (saelab.kernels.SparseMLP) against the dense MLP in float64.

Runs on the torch backend here, and on the Triton backend in a TRITON_INTERPRET=1 subprocess
(as tests/kernels/test_kernels_triton.py does): the same tests, rerouted by `auto` dispatch.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

from saelab.kernels import SparseMLP, backend, cost, mask_code
from saelab.kernels.cost import CHECK_SHARE, MARGIN, CostModel, bucket

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


def test_threshold_drops_small_units_of_smooth_activations():
    """GELU is never exactly 0: with a threshold the sparse paths equal the dense MLP with every
    unit at or under it zeroed (float64 reference); threshold 0 keeps them all (exact)."""
    gelu = torch.nn.functional.gelu
    exact = _mlp(16, 40, seed=11, act=gelu, offset=-1.0)
    x = _x(5, 16, seed=12)
    h = exact.hidden(x)
    assert (h != 0).all()
    cut = SparseMLP.of(exact.W_in, exact.b_in, exact.W_out, exact.b_out, act=gelu, threshold=0.05)
    kept = h * (h.abs() > 0.05)
    assert 0.1 < (kept != 0).double().mean() < 0.9
    ref = kept @ exact.W_out + exact.b_out
    for out in (cut.sparse_down(x), cut.union_down(x), cut.sparse_down(x[:1])):
        assert_close(out, ref[: out.shape[0]])
    assert_close(exact.sparse_down(x), exact.dense(x))
    with pytest.raises(ValueError, match="threshold is a magnitude"):
        SparseMLP.of(exact.W_in, exact.b_in, exact.W_out, exact.b_out, threshold=-1.0)


def test_cost_model_hand_computed(monkeypatch):
    model = CostModel(dense=1.0, fixed=0.25, per_row=0.01)
    assert model.sparse(30) == pytest.approx(0.55)
    assert not model.never_sparse
    assert model.use_sparse(59) and not model.use_sparse(61)  # 0.25 + 0.6 = MARGIN * 1.0
    assert CostModel(dense=1.0, fixed=MARGIN, per_row=0.0).never_sparse
    assert CostModel(dense=1.0, fixed=MARGIN - 0.1, per_row=0.0, check=0.1).never_sparse  # fixed + check
    assert CostModel(dense=1.0, fixed=0.0, per_row=0.0, check=CHECK_SHARE + 0.01).never_sparse  # looking
    assert not CostModel(dense=1.0, fixed=0.0, per_row=0.0, check=CHECK_SHARE).never_sparse
    assert [bucket(b) for b in (1, 2, 3, 8, 9, 64)] == [1, 2, 4, 8, 16, 64]
    # calibrate: per_row from the two timed row counts, fixed extrapolated to zero rows
    monkeypatch.setattr(cost, "_median_times", lambda fns, rounds: [2.0, 0.3, 1.3])
    monkeypatch.setattr(cost, "COSTS", {})
    got = cost.calibrate("k", lambda: None, lambda rows: lambda: None, 10, 110)
    assert (got.dense, got.fixed, got.per_row) == pytest.approx((2.0, 0.2, 0.01))
    monkeypatch.setattr(cost, "_median_times", lambda fns, rounds: pytest.fail("measured twice"))
    assert cost.calibrate("k", lambda: None, lambda rows: lambda: None, 10, 110) is got
    monkeypatch.setattr(cost, "_median_times", lambda fns, rounds: [2.0, 0.3, 1.3, 0.07][: len(fns)])
    checked = cost.calibrate("c", lambda: None, lambda rows: lambda: None, 10, 110, check=lambda: None)
    assert checked.check == pytest.approx(0.07) and checked.never_sparse  # 0.07 > 3% of 2.0


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["always sparse", "never sparse", "by rows"])
def test_auto_forward_matches_dense_and_follows_the_cost_model(monkeypatch, dtype, model):
    """mlp(x) equals the dense float64 MLP on either path, and takes the path the model picks."""
    mlp64 = _mlp(70, 96, seed=13)
    mlp = _mlp(70, 96, seed=13, dtype=dtype)
    x64 = _x(3, 70, seed=14)
    x = x64.to(dtype)
    h = mlp.hidden(x)
    # the compiled loop reads each token's active rows; the padded code pads to the most active
    rows = int((h != 0).sum()) if mlp._masked(h) else x.shape[0] * int((h != 0).sum(1).max())
    fixed_cost = {"always sparse": CostModel(1.0, 0.0, 0.0), "never sparse": CostModel(1.0, 1.0, 0.0),
                  "by rows": CostModel(1.0, 0.0, MARGIN / (rows + 0.5))}[model]  # sparse wins at `rows`
    monkeypatch.setattr(SparseMLP, "costs", lambda self, batch: fixed_cost)
    calls = []
    original = SparseMLP.down_sparse
    monkeypatch.setattr(SparseMLP, "down_sparse", lambda self, h: calls.append(1) or original(self, h))
    out = mlp(x)
    tol = {F64: {}, torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}[dtype]
    assert out.dtype == dtype
    assert_close(out.double(), mlp64.dense(x64), **tol)
    assert len(calls) == (model != "never sparse")
    if model == "by rows":  # one more active row tips it to dense
        tipped = CostModel(1.0, 0.0, MARGIN / (rows - 0.5))
        monkeypatch.setattr(SparseMLP, "costs", lambda self, batch: tipped)
        mlp.reset_routes()  # each layer keeps its decision per batch size once made
        assert_close(mlp(x).double(), mlp64.dense(x64), **tol)
        assert len(calls) == 1


def test_auto_forward_counts_padded_rows_not_nonzeros(monkeypatch):
    """The sparse path pads each token to the batch's largest count: token 0 has 10 active
    units, tokens 1-3 one each, so 13 nonzeros but 40 rows read, past a break-even of 20 rows:
    the dense path runs."""
    mlp = SparseMLP.of(torch.eye(16, dtype=F64), None, _x(16, 16, seed=3), None)  # h = relu(x)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[0, :10] = mask[1:, 11] = True
    x = torch.where(mask, 1.0, -1.0).to(F64)
    monkeypatch.setattr(SparseMLP, "costs", lambda self, batch: CostModel(1.0, 0.0, MARGIN / 20))
    calls = []
    original = SparseMLP.down_sparse
    monkeypatch.setattr(SparseMLP, "down_sparse", lambda self, h: calls.append(1) or original(self, h))
    assert_close(mlp(x), mlp.dense(x))
    assert calls == []
    mlp(x[1:])  # the three one-unit tokens: 3 rows, sparse
    assert calls == [1]
    single = SparseMLP.of(mlp.W_in.float(), None, mlp.W_out.float(), None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if single._masked(x.float()):  # the compiled loop reads only the 13 active rows: sparse
            assert_close(single(x.float()), single.dense(x.float()))
            assert calls == [1, 1]
    finally:
        torch.set_num_threads(threads)


def test_auto_forward_calibrates_once_per_bucket(monkeypatch):
    """The real calibration runs on first use of a (shape, dtype, threads, batch bucket) only."""
    monkeypatch.setattr(cost, "COSTS", {})
    mlp = _mlp(8, 37, seed=15, dtype=torch.float32)
    for B in (1, 3, 4, 3):
        x = _x(B, 8, seed=B, dtype=torch.float32)
        assert_close(mlp(x).double(), _mlp(8, 37, seed=15).dense(x.double()), rtol=1e-5, atol=1e-5)
    assert sorted(key[-1] for key in cost.COSTS) == [1, 4]
    assert all(c.dense > 0 and c.per_row >= 0 for c in cost.COSTS.values())


def test_auto_forward_decides_once_per_batch_size(monkeypatch):
    """Where sparse never pays, later calls run the dense computation inline: the cost model is
    consulted on a batch size's first call only, and nothing looks at the activations."""
    looked_up = []
    never = CostModel(1.0, 1.0, 0.0)
    monkeypatch.setattr(SparseMLP, "costs", lambda self, batch: looked_up.append(batch) or never)
    monkeypatch.setattr("saelab.kernels.mlp.active_mask", lambda *a: pytest.fail("looked at activations"))
    mlp = _mlp(12, 40, seed=16)
    for B in (2, 2, 5, 2, 5):
        x = _x(B, 12, seed=B)
        assert_close(mlp(x), _mlp(12, 40, seed=16).dense(x))
    assert looked_up == [2, 5]
    assert mlp.route(2) == mlp.dense and mlp._dense_batches == {2, 5} and not mlp._routes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [True, False])
def test_bound_route_matches_dense_float64(monkeypatch, dtype, sparse):
    """`route(B)`, bound once, is what mlp(x) runs at batch B: the dense forward itself where
    sparse never pays, else the per-call decision; either equals the float64 dense MLP."""
    model = CostModel(1.0, 0.0, 0.0) if sparse else CostModel(1.0, 1.0, 0.0)
    monkeypatch.setattr(SparseMLP, "costs", lambda self, batch: model)
    calls = []
    original = SparseMLP.down_sparse
    monkeypatch.setattr(SparseMLP, "down_sparse", lambda self, h: calls.append(1) or original(self, h))
    mlp64, mlp = _mlp(33, 80, seed=21), _mlp(33, 80, seed=21, dtype=dtype)
    x64 = _x(4, 33, seed=22)
    route = mlp.route(4)
    assert (route == mlp.dense) is not sparse
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for forward in (route, mlp):
        assert_close(forward(x64.to(dtype)).double(), mlp64.dense(x64), **tol)
    assert len(calls) == 2 * sparse
