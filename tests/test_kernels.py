"""saelab.kernels against an independent dense float64 reference.

The reference builds the dense (B, n) code matrix ``Z`` with ``scatter_add``
(so duplicate indices add up) and uses plain matmuls and dense autograd.
"""

from __future__ import annotations

import pytest
import torch
from saelab.kernels import autograd as kernels_autograd
from saelab.kernels import (
    gather_dot,
    gather_weighted_sum,
    scatter_outer_add,
    sparse_decode,
    sparse_encode,
    torch_ops,
)
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

F64 = torch.float64
LOW_PRECISION = [torch.bfloat16, torch.float16]

# (B, k, n, d, kind); n=37 is neither a power of two nor a multiple of 8.
CASES = [
    (1, 1, 37, 5, "distinct"),
    (8, 1, 37, 16, "shared"),  # k=1 and every token picks the same latent
    (1, 6, 37, 9, "duplicates"),
    (16, 8, 37, 12, "duplicates"),
    (16, 8, 64, 12, "shared"),
    (12, 5, 37, 7, "zero_vals"),
    (9, 37, 37, 3, "distinct"),  # k == n
    (64, 16, 512, 48, "distinct"),
]
CASE_IDS = [f"B{b}-k{k}-n{n}-d{d}-{kind}" for b, k, n, d, kind in CASES]


def make_code(
    B: int, k: int, n: int, kind: str, seed: int = 0, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "duplicates":
        idx = torch.randint(0, n, (B, k), generator=gen)
        if k > 1:
            idx[:, -1] = idx[:, 0]  # every row repeats a latent
    else:
        idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(B)])
    if kind == "shared":
        idx[:, 0] = n - 1  # may also create duplicates; both must work
    vals = torch.randn(B, k, generator=gen, dtype=F64)
    if kind == "zero_vals":
        vals[torch.rand(B, k, generator=gen) < 0.4] = 0.0
    return idx, vals.to(dtype)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def dense_codes(idx: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """Dense (B, n) code matrix; differentiable w.r.t. ``vals``."""
    return torch.zeros(idx.shape[0], n, dtype=vals.dtype).scatter_add(1, idx, vals)


def reference(
    op: str, idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """Float64 dense result of ``op``; ``g`` is (B, d) and ``W`` is (n, d)."""
    vals, g, W = vals.to(F64), g.to(F64), W.to(F64)
    if op == "gather_weighted_sum":
        return dense_codes(idx, vals, W.shape[0]) @ W
    if op == "gather_dot":
        return (g @ W.T).gather(1, idx)
    return dense_codes(idx, vals, W.shape[0]).T @ g


def run(
    op: str, idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    if op == "gather_weighted_sum":
        return gather_weighted_sum(idx, vals, W)
    if op == "gather_dot":
        return gather_dot(idx, g, W)
    return scatter_outer_add(idx, vals, g, W.shape[0])


OPS = ["gather_weighted_sum", "gather_dot", "scatter_outer_add"]


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "three_chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES, ids=CASE_IDS)
def test_primitive_matches_dense_reference(op, B, k, n, d, kind, dtype, chunked, monkeypatch):
    if chunked:  # budget for ceil(B / 3) rows, so the last chunk is usually ragged
        rows = (B + 2) // 3
        monkeypatch.setattr(torch_ops, "_CHUNK_BYTES", rows * k * d * dtype.itemsize)
    idx, vals = make_code(B, k, n, kind, dtype=dtype)
    g, W = randn(B, d, seed=1, dtype=dtype), randn(n, d, seed=2, dtype=dtype)
    out = run(op, idx, vals, g, W)
    assert out.dtype == dtype
    assert_close(out, reference(op, idx, vals, g, W).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_budget_below_one_row_still_works(op, dtype, monkeypatch):
    monkeypatch.setattr(torch_ops, "_CHUNK_BYTES", 1)
    idx, vals = make_code(5, 3, 37, "duplicates", dtype=dtype)
    g, W = randn(5, 4, seed=1, dtype=dtype), randn(37, 4, seed=2, dtype=dtype)
    ref = reference(op, idx, vals, g, W).to(dtype)
    assert_close(run(op, idx, vals, g, W), ref)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES, ids=CASE_IDS)
def test_sparse_decode_matches_dense_autograd(B, k, n, d, kind, with_bias):
    idx, vals = make_code(B, k, n, kind)
    W, bias = randn(n, d, seed=1), randn(d, seed=2)
    grad_out = randn(2 * d, B, seed=3)[::2].T  # transposed and strided
    assert not grad_out.is_contiguous()

    leaves = [t.clone().requires_grad_() for t in (vals, W, bias)]
    out = sparse_decode(idx, leaves[0], leaves[1], leaves[2] if with_bias else None)
    out.backward(grad_out)

    ref_leaves = [t.clone().requires_grad_() for t in (vals, W, bias)]
    ref = dense_codes(idx, ref_leaves[0], n) @ ref_leaves[1]
    if with_bias:
        ref = ref + ref_leaves[2]
    ref.backward(grad_out)

    assert_close(out, ref)
    assert_close(leaves[0].grad, ref_leaves[0].grad)
    assert_close(leaves[1].grad, ref_leaves[1].grad)
    assert_close(leaves[2].grad, ref_leaves[2].grad)  # both None without bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES, ids=CASE_IDS)
def test_sparse_encode_matches_dense_autograd(B, k, n, d, kind, with_bias):
    idx, _ = make_code(B, k, n, kind)
    x, W_enc, b_enc = randn(B, d, seed=1), randn(n, d, seed=2), randn(n, seed=3)
    grad_vals = randn(B, 2 * k, seed=4)[:, ::2]  # strided
    assert grad_vals.numel() == 1 or not grad_vals.is_contiguous()

    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
    vals = sparse_encode(leaves[0], leaves[1], leaves[2] if with_bias else None, idx)
    vals.backward(grad_vals)

    ref_leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
    pre = ref_leaves[0] @ ref_leaves[1].T
    if with_bias:
        pre = pre + ref_leaves[2]
    ref = pre.gather(1, idx)
    ref.backward(grad_vals)

    assert_close(vals, ref)
    assert_close(leaves[0].grad, ref_leaves[0].grad)
    assert_close(leaves[1].grad, ref_leaves[1].grad)
    assert_close(leaves[2].grad, ref_leaves[2].grad)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind", ["duplicates", "shared"])
def test_gradcheck_sparse_decode(kind, with_bias):
    idx, vals = make_code(5, 4, 7, kind)
    inputs = [vals, randn(7, 3, seed=1)] + ([randn(3, seed=2)] if with_bias else [])
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: sparse_decode(idx, *t), inputs)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind", ["duplicates", "shared"])
def test_gradcheck_sparse_encode(kind, with_bias):
    idx, _ = make_code(5, 4, 7, kind)
    x, W_enc = randn(5, 3, seed=1).requires_grad_(), randn(7, 3, seed=2).requires_grad_()
    if with_bias:
        b_enc = randn(7, seed=3).requires_grad_()
        assert torch.autograd.gradcheck(lambda *t: sparse_encode(*t, idx), [x, W_enc, b_enc])
    else:
        assert torch.autograd.gradcheck(lambda *t: sparse_encode(*t, None, idx), [x, W_enc])


def _forbid(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} computed a gradient nobody asked for")

    return fail


def test_backward_skips_unneeded_grads(monkeypatch):
    idx, vals = make_code(6, 3, 37, "duplicates")
    W, x = randn(37, 4, seed=1), randn(6, 4, seed=2)
    # vals and x are constants: their grads (gather_dot / gather_weighted_sum) must not run.
    monkeypatch.setattr(kernels_autograd, "gather_dot", _forbid("gather_dot"))
    W_dec = W.clone().requires_grad_()
    sparse_decode(idx, vals, W_dec).sum().backward()
    assert_close(W_dec.grad, dense_codes(idx, vals, 37).sum(0)[:, None].expand(37, 4))

    monkeypatch.undo()
    monkeypatch.setattr(kernels_autograd, "gather_weighted_sum", _forbid("gather_weighted_sum"))
    W_enc = W.clone().requires_grad_()
    sparse_encode(x, W_enc, None, idx).sum().backward()
    counts = dense_codes(idx, torch.ones_like(vals), 37)
    assert_close(W_enc.grad, counts.T @ x)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel among the outputs of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_no_dense_code_matrix_is_built():
    B, k, n, d = 64, 4, 4096, 8  # every legitimate tensor is far smaller than B * n
    idx, vals = make_code(B, k, n, "duplicates", dtype=torch.float32)
    vals.requires_grad_()
    W = randn(n, d, seed=1, dtype=torch.float32).requires_grad_()
    x = randn(B, d, seed=2, dtype=torch.float32).requires_grad_()
    b_enc = torch.zeros(n, requires_grad=True)
    bias = torch.zeros(d, requires_grad=True)
    with _LargestTensor() as mode:
        codes = sparse_encode(x, W, b_enc, idx)
        (sparse_decode(idx, codes * vals, W, bias) ** 2).sum().backward()
    # The largest tensor is the (n, d) weight gradient, so the backward was observed too.
    assert mode.max_numel == n * d < B * n
    with _LargestTensor() as dense:  # the probe does see a dense code matrix
        dense_codes(idx, vals.detach(), n)
    assert dense.max_numel == B * n


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("op", OPS)
def test_low_precision_rounds_fp32_result_once(op, dtype):
    """Output equals the exact result of the rounded inputs up to one output rounding."""
    B, k, n, d = 32, 16, 37, 64
    idx, vals = make_code(B, k, n, "duplicates", dtype=dtype)
    g, W = randn(B, d, seed=1, dtype=dtype), randn(n, d, seed=2, dtype=dtype)
    out = run(op, idx, vals, g, W)
    assert out.dtype == dtype
    ref = reference(op, idx, vals, g, W)  # float64 from the same rounded inputs
    # Half an ulp relative error from the final rounding; atol covers fp32 accumulation.
    assert_close(out.to(F64), ref, rtol=torch.finfo(dtype).eps / 2, atol=1e-4)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_autograd(dtype):
    """Encode -> decode in low precision keeps dtypes and tracks a float64 run."""
    B, k, n, d = 16, 8, 37, 32
    idx, vals = make_code(B, k, n, "duplicates", dtype=dtype)
    inputs = [randn(B, d, seed=1), randn(n, d, seed=2), randn(n, seed=3), randn(d, seed=4)]
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    ref_leaves = [t.detach().to(F64).requires_grad_() for t in leaves]  # same rounded inputs
    grad_out = randn(B, d, seed=5, dtype=dtype)

    def model(x, W, b_enc, b_dec, vals):
        return sparse_decode(idx, sparse_encode(x, W, b_enc, idx) * vals, W, b_dec)

    out = model(*leaves, vals)
    out.backward(grad_out)
    ref = model(*ref_leaves, vals.to(F64))
    ref.backward(grad_out.to(F64))

    # Several roundings chain here, so compare on the scale of each whole tensor;
    # a wrong or missing gradient term would be off by O(scale).
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    assert_close(out.to(F64), ref, rtol=0.0, atol=8 * eps * ref.abs().max().item())
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == dtype
        scale = ref_leaf.grad.abs().max().item()
        assert_close(leaf.grad.to(F64), ref_leaf.grad, rtol=0.0, atol=8 * eps * scale)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("op", OPS)
def test_low_precision_accumulates_in_fp32(op, dtype):
    """Sum N = 4096 ones: exact in fp32, but a running bf16 (fp16) sum stops at 256 (2048)."""
    N = 4096
    stall = 2 / torch.finfo(dtype).eps  # from here on, adding 1 is lost to rounding
    assert torch.tensor(stall, dtype=dtype) + 1 == stall < N

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=dtype)

    def zeros_idx(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.long)

    if op == "gather_weighted_sum":  # one token picks latent 0 N times
        out = gather_weighted_sum(zeros_idx(1, N), ones(1, N), ones(3, 2))
    elif op == "gather_dot":  # one dot product of length N
        out = gather_dot(zeros_idx(1, 1), ones(1, N), ones(3, N))
    else:  # N tokens all pick latent 0
        out = scatter_outer_add(zeros_idx(N, 1), ones(N, 1), ones(N, 2), 3)
        assert_close(out[1:], torch.zeros_like(out[1:]), rtol=0.0, atol=0.0)
    assert out.dtype == dtype
    assert_close(out[0], torch.full_like(out[0], N), rtol=0.0, atol=0.0)


def test_rejects_bad_inputs():
    idx, vals = make_code(4, 3, 37, "distinct")
    W = randn(37, 5, seed=1)
    with pytest.raises(ValueError, match="vals shape"):
        gather_weighted_sum(idx, vals[:, :2], W)
    with pytest.raises(ValueError, match="g must have shape"):
        gather_dot(idx, randn(5, 5, seed=2), W)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_decode(idx, vals, W, randn(6, seed=3))
    with pytest.raises(TypeError, match="idx must be"):
        gather_dot(idx.double(), randn(4, 5, seed=2), W)


@pytest.mark.parametrize("bad", [-1, 37])  # negative indices must not wrap around
@pytest.mark.parametrize("op", OPS)
def test_rejects_out_of_range_indices(op, bad):
    idx, vals = make_code(4, 3, 37, "distinct")
    idx[1, 2] = bad
    with pytest.raises((IndexError, RuntimeError)):
        run(op, idx, vals, randn(4, 5, seed=1), randn(37, 5, seed=2))
