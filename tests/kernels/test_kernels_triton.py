"""The Triton backend on CPU, under Triton's interpreter, against the dense float64 reference.

TRITON_INTERPRET=1 must be set before triton is imported, and with it set ``auto`` dispatch sends
CPU tensors to Triton. So these tests never run in the main pytest session (where they would
reroute every other kernel test through the slow interpreter): the one test that does run there
starts a fresh pytest on this file with the variable set, and in that subprocess the others run.
Shapes stay tiny: the interpreter executes every program instance in Python.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels import F64, dense_codes, make_code, randn, reference, rerun_interpreted, run
from torch.testing import assert_close

from saelab.kernels import backend, sparse_decode, sparse_encode

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_under_interpreter"
)

# (B, k, n, d, kind): k=20 > BLOCK_K and d=70 > BLOCK_D exercise the kernels' inner loops.
CASES = [
    (1, 1, 37, 5, "distinct"),
    (6, 1, 37, 9, "shared"),  # every token picks the same latent
    (3, 20, 37, 70, "duplicates"),
    (5, 4, 37, 7, "zero_vals"),
]
CASE_IDS = [f"B{b}-k{k}-n{n}-d{d}-{kind}" for b, k, n, d, kind in CASES]
OPS = ["gather_weighted_sum", "gather_dot", "scatter_outer_add"]


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_under_interpreter():
    rerun_interpreted(__file__)


@interpreted
def test_auto_dispatch_picks_triton():
    assert backend.name_for(torch.device("cpu")) == "triton"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES, ids=CASE_IDS)
def test_primitive_matches_dense_reference(op, B, k, n, d, kind, dtype):
    idx, vals = make_code(B, k, n, kind, dtype=dtype)
    g, W = randn(B, d, seed=1, dtype=dtype), randn(n, d, seed=2, dtype=dtype)
    out = run(op, idx.int() if kind == "shared" else idx, vals, g, W)
    assert out.dtype == dtype
    assert_close(out, reference(op, idx, vals, g, W).to(dtype))


@interpreted
@pytest.mark.parametrize("layout", ["row_strided", "column_major"])
@pytest.mark.parametrize("op", ["gather_weighted_sum", "gather_dot"])
def test_strided_dictionary(op, layout):
    idx, vals = make_code(4, 3, 37, "duplicates", dtype=torch.float32)
    g, W = randn(4, 6, seed=1, dtype=torch.float32), randn(37, 6, seed=2, dtype=torch.float32)
    if layout == "row_strided":  # rows 10 apart, columns contiguous: indexed as it is
        W_view = torch.zeros(37, 10)[:, :6].copy_(W)
    else:  # columns not contiguous: copied first
        W_view = W.T.contiguous().T
    assert not W_view.is_contiguous()
    assert_close(run(op, idx, vals, g, W_view), reference(op, idx, vals, g, W).float())


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_rounds_fp32_result_once(op, dtype):
    """One output rounding: half an ulp, except that the interpreter's fp32 -> bf16 cast
    truncates (GPUs round to nearest), which costs up to a whole ulp."""
    idx, vals = make_code(6, 20, 37, "duplicates", dtype=dtype)
    g, W = randn(6, 70, seed=1, dtype=dtype), randn(37, 70, seed=2, dtype=dtype)
    out = run(op, idx, vals, g, W)
    assert out.dtype == dtype
    ref = reference(op, idx, vals, g, W)
    ulps = 1.0 if dtype == torch.bfloat16 else 0.5
    assert_close(out.to(F64), ref, rtol=ulps * torch.finfo(dtype).eps, atol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_accumulates_in_fp32(op, dtype):
    """Sum N = 4096 ones: exact in fp32, but a running bf16 (fp16) sum stops at 256 (2048)."""
    N = 4096
    ones = lambda *shape: torch.ones(*shape, dtype=dtype)  # noqa: E731
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731
    if op == "gather_weighted_sum":
        out = run(op, zeros(1, N), ones(1, N), None, ones(3, 2))
    elif op == "gather_dot":
        out = run(op, zeros(1, 1), None, ones(1, N), ones(3, N))
    else:
        out = run(op, zeros(N, 1), ones(N, 1), ones(N, 2), ones(3, 2))
        assert_close(out[1:], torch.zeros_like(out[1:]), rtol=0.0, atol=0.0)
    assert_close(out[0], torch.full_like(out[0], N), rtol=0.0, atol=0.0)


@interpreted
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES[1:3], ids=CASE_IDS[1:3])
def test_encode_decode_gradients_match_dense_autograd(B, k, n, d, kind):
    idx, vals = make_code(B, k, n, kind)
    inputs = [randn(B, d, seed=1), randn(n, d, seed=2), randn(n, seed=3), randn(d, seed=4)]
    grad_out = randn(2 * d, B, seed=5)[::2].T  # non-contiguous, as autograd may hand it over

    leaves = [t.clone().requires_grad_() for t in inputs]
    x, W, b_enc, b_dec = leaves
    out = sparse_decode(idx, sparse_encode(x, W, b_enc, idx) * vals, W, b_dec)
    out.backward(grad_out)

    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    x, W, b_enc, b_dec = ref_leaves
    ref = dense_codes(idx, (x @ W.T + b_enc).gather(1, idx) * vals, n) @ W + b_dec
    ref.backward(grad_out)

    assert_close(out, ref)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert_close(leaf.grad, ref_leaf.grad)
