"""The compiled CPU gather-weighted-sum (saelab.kernels.native) against a dense float64 reference,
its build cache, and the fallback to embedding_bag when it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

from saelab.kernels import SparseMLP, gather_weighted_sum, native

F64 = torch.float64
# (B, k, n, d): odd sizes (d not a multiple of the vector width), k not a multiple of 4, k = 0
SHAPES = [(1, 1, 7, 3), (1, 7, 53, 37), (3, 13, 53, 37), (5, 4, 9, 129), (2, 0, 11, 5), (1, 0, 11, 5)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches > 1 take the compiled loop only on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch):
    """Counts the compiled loop's calls, so a test knows which path ran."""
    seen = []
    real = native.gather_weighted_sum

    def spy(*args):
        seen.append(args[2].dtype)
        return real(*args)

    monkeypatch.setattr(native, "gather_weighted_sum", spy)
    return seen


def _code(B: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (B, k), generator=gen)
    if k > 2:
        idx[:, 1] = idx[:, 0]  # duplicates add up
    vals = torch.randn(B, k, generator=gen, dtype=F64)
    vals[torch.rand(B, k, generator=gen) < 0.3] = 0.0  # padding-like zeros are skipped
    return idx, vals


def _reference(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(idx.shape[0], W.shape[0], dtype=F64).scatter_add(1, idx, vals.to(F64))
    return dense @ W.to(F64)


def test_compiles_where_a_compiler_exists():
    if shutil.which("cc") is None:  # CI's image has one (.ci/run checks it): there this must build
        assert native.library() is None and "compiler" in native.status()
    else:
        assert native.status() == "compiled", native.status()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,k,n,d", SHAPES)
def test_matches_float64_reference(one_thread, calls, dtype, B, k, n, d):
    idx, vals = _code(B, k, n, seed=B * 100 + k)
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(d), dtype=F64).to(dtype)
    out = gather_weighted_sum(idx, vals.to(dtype), W)
    assert out.dtype == dtype and out.shape == (B, d)
    ref = _reference(idx, vals.to(dtype), W)  # the same rounded inputs, summed in float64
    # fp32: sums of <= 13 terms; bf16: one rounding of an fp32 sum to bf16 (8 bits of mantissa)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    assert_close(out.to(F64), ref, **tol)
    assert calls == [dtype]


def test_mixed_dtypes_accumulate_in_fp32(one_thread, calls):
    """fp32 values over bf16 weights: the result is fp32, from fp32 accumulation."""
    idx, vals = _code(1, 300, 400, seed=3)
    W = torch.randn(400, 33, dtype=F64).to(torch.bfloat16)
    out = gather_weighted_sum(idx, vals.float(), W)
    assert out.dtype == torch.float32
    assert_close(out.to(F64), _reference(idx, vals.float(), W), rtol=1e-5, atol=1e-5)
    assert calls == [torch.bfloat16]


def test_out_of_range_index_is_refused(one_thread, calls):
    W = torch.randn(5, 4)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        gather_weighted_sum(torch.tensor([[1, 5]]), torch.ones(1, 2), W)
    with pytest.raises(IndexError):
        gather_weighted_sum(torch.tensor([[-1]]), torch.ones(1, 1), W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n,d", [(1, 61, 19), (4, 61, 19), (3, 8, 129), (1, 1, 1)])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_masked_down_matches_float64_reference(one_thread, dtype, B, n, d, threshold):
    """Straight from dense h: units with |h| <= threshold (h == 0 at 0) left out, the rest summed."""
    gen = torch.Generator().manual_seed(B * n + d)
    h = torch.relu(torch.randn(B, n, generator=gen, dtype=F64) - 0.5).to(dtype)
    h[0, : n // 2] = -h[0, : n // 2]  # negative activations count by magnitude
    if B > 1:
        h[1] = 0  # a token with no active unit
    W = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    assert native.usable_masked(h, W)
    out = native.masked_down(h, W, threshold)
    kept = h.to(F64) * (h.to(F64).abs() > threshold)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    assert out.dtype == dtype and out.shape == (B, d)
    assert_close(out.to(F64), kept @ W.to(F64), **tol)
    if B > 1:
        assert not out[1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_count_active_hand_computed(one_thread, dtype):
    h = torch.tensor([[0.0, 0.5, -0.2, 0.0, 1.0], [0.0, 0.0, 0.0, -2.0, 0.01]], dtype=dtype)
    assert native.count_active(h) == 5
    assert native.count_active(h, 0.3) == 3  # 0.5, 1.0, -2.0
    assert native.count_active(h[:1]) == 3 and native.count_active(torch.zeros(1, 7, dtype=dtype)) == 0


def test_masked_down_needs_no_gradient_and_matching_shapes(one_thread):
    W = torch.randn(6, 3)
    assert not native.usable_masked(torch.ones(1, 6, requires_grad=True), W)
    assert not native.usable_masked(torch.ones(1, 6, dtype=F64), W.to(F64))
    assert not native.usable_masked(torch.ones(1, 6, dtype=torch.bfloat16), W)  # dtypes differ
    with torch.no_grad():
        assert native.usable_masked(torch.ones(1, 6, requires_grad=True), W)
    with pytest.raises(ValueError, match="6 rows"):
        native.masked_down(torch.ones(1, 5), W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_down_projection_uses_it(one_thread, monkeypatch, dtype):
    seen = []
    real = native.masked_down
    monkeypatch.setattr(native, "masked_down", lambda *a: seen.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    d, d_ff = 19, 61
    mlp = SparseMLP.of(*(t.to(dtype) for t in (
        torch.randn(d, d_ff, generator=gen), torch.randn(d_ff, generator=gen) - 1,
        torch.randn(d_ff, d, generator=gen), torch.randn(d, generator=gen))))
    x = torch.randn(4, d, generator=gen).to(dtype)
    h = mlp.hidden(x).to(F64)
    ref = h @ mlp.W_out.to(F64) + mlp.b_out.to(F64)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    assert_close(mlp.sparse_down(x).to(F64), ref, **tol)
    assert seen == [1]
    x.requires_grad_()
    mlp.sparse_down(x).sum().backward()  # a gradient wanted: the differentiable path
    assert seen == [1] and x.grad is not None


def test_multithreaded_batches_keep_embedding_bag(calls):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        idx, vals = _code(4, 6, 20, seed=1)
        W = torch.randn(20, 8)
        assert_close(gather_weighted_sum(idx, vals.float(), W).to(F64), _reference(idx, vals.float(), W),
                     rtol=1e-5, atol=1e-5)
        gather_weighted_sum(idx[:1], vals[:1].float(), W)  # one token: compiled on any thread count
    finally:
        torch.set_num_threads(threads)
    assert calls == ([] if native.library() is None else [torch.float32])


def test_switched_off_or_no_compiler_falls_back(monkeypatch, tmp_path, calls):
    idx, vals = _code(1, 9, 30, seed=2)
    W = torch.randn(30, 7)
    ref = _reference(idx, vals.float(), W)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.library() is None and native.status().startswith("off")
    assert_close(gather_weighted_sum(idx, vals.float(), W).to(F64), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv(native.ENV_SWITCH)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SAELAB_NATIVE_DIR", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        assert native.library() is None
        assert "no C compiler" in native.status() and "no-such-cc" in native.status()
        assert_close(gather_weighted_sum(idx, vals.float(), W).to(F64), ref, rtol=1e-5, atol=1e-5)
    finally:
        native._load.cache_clear()
    assert calls == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (CI's image has one)")
def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_NATIVE_DIR", str(tmp_path))
    cc = shutil.which("cc")
    assert cc is not None
    first = native._build(cc)
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
    monkeypatch.setattr(native, "SOURCE", native.SOURCE + "\n/* changed */\n")
    assert native._build(cc) != first
