"""saelab.kernels against an independent dense float64 reference.

The reference builds the dense (B, n) code matrix ``Z`` with ``scatter_add``
(so duplicate indices add up) and uses plain matmuls and dense autograd.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from saelab.kernels import (
    active_code,
    backend,
    gather_dot,
    gather_weighted_sum,
    scatter_outer_add,
    sparse_decode,
    sparse_encode,
    sparse_mlp_down,
    topk_indices,
    torch_ops,
)
from saelab.kernels import autograd as kernels_autograd

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



def rerun_interpreted(test_file: str) -> str:
    """Run `test_file` again in a subprocess with TRITON_INTERPRET=1 (the Triton kernels on the
    CPU; the variable must be set before triton imports); its stdout, after asserting it passed."""
    from saelab.kernels import backend

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != backend.ENV_VAR}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    return done.stdout

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


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("B", "k", "n", "d", "kind"), CASES, ids=CASE_IDS)
def test_primitive_matches_dense_reference(op, B, k, n, d, kind, dtype, idx_dtype):
    idx, vals = make_code(B, k, n, kind, dtype=dtype)
    g, W = randn(B, d, seed=1, dtype=dtype), randn(n, d, seed=2, dtype=dtype)
    out = run(op, idx.to(idx_dtype), vals, g, W)
    assert out.dtype == dtype
    assert_close(out, reference(op, idx, vals, g, W).to(dtype))


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_promote(op):
    """fp64 values with an fp32 dictionary: computed and returned in fp64."""
    idx, vals = make_code(6, 4, 37, "duplicates")
    g, W = randn(6, 5, seed=1), randn(37, 5, seed=2, dtype=torch.float32)
    out = run(op, idx, vals, g, W)
    assert out.dtype == F64
    assert_close(out, reference(op, idx, vals, g, W))


@pytest.mark.parametrize("budget_rows", [0, 2 / 3, 2], ids=["one_entry", "ragged_entries", "ragged_rows"])
@pytest.mark.parametrize("op", OPS)
def test_half_precision_row_chunks(op, budget_rows, monkeypatch):
    """Half-precision gathers upcast rows chunk by chunk; chunk edges must not show."""
    B, k, d = 5, 3, 4
    monkeypatch.setattr(torch_ops, "_CHUNK_BYTES", int(budget_rows * k * d * 4))
    idx, vals = make_code(B, k, 37, "duplicates", dtype=torch.bfloat16)
    g, W = randn(B, d, seed=1, dtype=torch.bfloat16), randn(37, d, seed=2, dtype=torch.bfloat16)
    assert_close(run(op, idx, vals, g, W), reference(op, idx, vals, g, W).to(torch.bfloat16))


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
    """Records the largest numel among the dense outputs of every aten op.

    Sparse tensors (the CSR pattern of ``idx`` the torch gather-dot runs on) report their dense
    size as numel but store only their entries, so they are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
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


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind", ["duplicates", "shared", "zero_vals"])
def test_sparse_encode_reuses_dense_pre_activations(kind, with_bias):
    """Given the dense pre-activations, values are gathered from them; gradients are unchanged."""
    B, k, n, d = 9, 4, 37, 6
    idx, _ = make_code(B, k, n, kind)
    x, W_enc, b_enc = randn(B, d, seed=1), randn(n, d, seed=2), randn(n, seed=3)
    grad_vals = randn(B, k, seed=4)
    results = []
    for reuse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)]
        bias = leaves[2] if with_bias else None
        with torch.no_grad():
            pre = torch.addmm(b_enc if with_bias else torch.zeros(n, dtype=F64), x, W_enc.T)
        vals = sparse_encode(leaves[0], leaves[1], bias, idx, pre if reuse else None)
        vals.backward(grad_vals)
        results.append([vals.detach()] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want)


def test_sparse_encode_rejects_mismatched_pre():
    idx, _ = make_code(4, 3, 37, "distinct")
    with pytest.raises(ValueError, match="pre must have shape"):
        sparse_encode(randn(4, 5, seed=1), randn(37, 5, seed=2), None, idx, randn(4, 36, seed=3))


def test_sparse_mlp_down_matches_dense_mlp():
    """A ReLU MLP whose down-projection runs on its active hidden units only."""
    B, d_model, d_ff = 24, 16, 96
    x = randn(B, d_model, seed=1).requires_grad_()
    W_in, b_in = randn(d_model, d_ff, seed=2) / 4, randn(d_ff, seed=3) - 1.5  # mostly inactive
    W_out, b_out = randn(d_ff, d_model, seed=4).requires_grad_(), randn(d_model, seed=5).requires_grad_()
    grad_out = randn(B, d_model, seed=6)

    h = torch.relu(x @ W_in + b_in)
    assert 0.02 < (h > 0).double().mean() < 0.25  # sparse, but not trivially so
    idx, vals = active_code(h)
    assert idx.shape[1] == (h > 0).sum(1).max()
    out = sparse_mlp_down(idx, vals, W_out, b_out)
    out.backward(grad_out)
    got = [out.detach()] + [t.grad.clone() for t in (x, W_out, b_out)]

    for t in (x, W_out, b_out):
        t.grad = None
    ref = torch.relu(x @ W_in + b_in) @ W_out + b_out
    ref.backward(grad_out)
    for g, want in zip(got, [ref.detach()] + [t.grad for t in (x, W_out, b_out)], strict=True):
        assert_close(g, want)


def test_active_code_with_k_keeps_largest_magnitudes():
    h = torch.tensor([[0.0, -3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    idx, vals = active_code(h, k=2)
    assert sorted(idx[0].tolist()) == [1, 3] and sorted(vals[0].tolist()) == [-3.0, 2.0]
    assert 0 in idx[1].tolist() and sorted(vals[1].tolist()) == [0.0, 5.0]


@pytest.mark.parametrize(
    ("B", "n", "k", "kind"),
    [(7, 8192, 32, "randn"), (3, 32768, 32, "randn"), (3, 8192, 256, "randn"),
     (5, 24576, 64, "randn"), (4, 1024, 1, "randn"), (3, 37, 5, "randn"), (6, 2048, 16, "ties"),
     (3, 1024, 8, "nan"), (2, 1024, 1024, "randn"), (3, 4096, 32, "constant")],
)
def test_topk_indices_selects_torch_topk_values(B, n, k, kind):
    scores = randn(B, n, seed=0, dtype=torch.float32)
    if kind == "ties":  # a few distinct values: which index wins a tie may differ, values may not
        scores = (scores * 2).round()
    if kind == "nan":
        scores[1, [3, 500]] = float("nan")
    if kind == "constant":  # every block ties
        scores[:] = 1.0
    idx = topk_indices(scores, k)
    assert idx.shape == (B, k) and idx.dtype == torch.int64
    assert all(len(set(row.tolist())) == k for row in idx)  # k distinct latents per row
    want = scores.topk(k, dim=1).values
    assert_close(scores.gather(1, idx).sort(1, descending=True).values, want, equal_nan=True)


# ---- dispatch -------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # select() looks at the type only


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("value", ["", "auto", "torch", "TORCH"])
def test_backend_is_torch_on_cpu(value, monkeypatch, no_interpreter):
    monkeypatch.setenv(backend.ENV_VAR, value)
    assert backend.name_for(CPU) == "torch"


def test_backend_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="SAELAB_KERNEL_BACKEND='cuda' is not one of auto, torch, triton"):
        gather_dot(*make_code(2, 1, 5, "distinct")[:1], randn(2, 3, seed=0), randn(5, 3, seed=1))


def test_forcing_triton_on_cpu_without_interpreter_is_an_error(monkeypatch, no_interpreter):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="SAELAB_KERNEL_BACKEND=triton"):
        backend.select(CPU)


def test_missing_triton(monkeypatch):
    monkeypatch.setattr(backend, "_triton_ops", lambda: "ImportError: No module named 'triton'")
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.name_for(CUDA) == "torch"  # auto falls back
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton cannot be imported .*No module named 'triton'"):
        backend.select(CUDA)


def test_auto_picks_triton_for_cuda_tensors(monkeypatch, no_interpreter):
    pytest.importorskip("triton")
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.name_for(CUDA) == "triton"


def test_kernels_import_only_torch_triton_and_stdlib():
    """kernels sits below the rest of saelab: it must not import it (design, section 1)."""
    allowed = {"torch", "triton", "__future__", *sys.stdlib_module_names}
    kernels_dir = Path(sparse_decode.__code__.co_filename).parent
    for path in kernels_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                assert name.split(".")[0] != "triton" or path.name == "triton_ops.py", path.name


BLOCK_TRITON = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (blocked)")
sys.meta_path.insert(0, Block())
"""


def test_works_where_triton_is_missing():
    """macOS has no triton: saelab.kernels must import and run, and forcing triton must explain."""
    script = BLOCK_TRITON + """
import os, torch
from saelab.kernels import backend, sparse_decode
idx = torch.tensor([[0, 2]]); W = torch.eye(3, requires_grad=True)
sparse_decode(idx, torch.tensor([[1.0, 2.0]]), W).sum().backward()
assert W.grad[2].tolist() == [2.0, 2.0, 2.0]
assert backend.name_for(torch.device("cuda")) == "torch"
os.environ["SAELAB_KERNEL_BACKEND"] = "triton"
try:
    backend.select(torch.device("cuda"))
except RuntimeError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "triton cannot be imported" in done.stdout
