"""Sparse encode/decode kernels for k-sparse autoencoders and activation-sparse MLPs.

Two backends (Triton for CUDA, plain torch for CPU and as fallback) behind one set of functions;
``SAELAB_KERNEL_BACKEND`` in {auto, torch, triton} forces one (``saelab.kernels.backend``).
On CPU the gather-weighted-sum and the sparse MLP down-projection run a small C loop compiled on
first use with the system compiler (``saelab.kernels.native``; ``embedding_bag`` without one).
Depends on torch only (triton optionally, imported lazily), never on the rest of saelab.
"""

if __name__ == "kernels":
    # Imported by its folder name because a checkout's root is on sys.path (pytest, or python
    # started in the checkout); this folder then shadows PyPI's `kernels`, which transformers
    # imports. saelab's kernels are only ever `saelab.kernels`: hand the name to the installed one.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (saelab's is saelab.kernels)", name="kernels")
    sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["kernels"])
else:
    from .autograd import sparse_decode, sparse_encode
    from .mlp import SparseMLP, active_code, mask_code, padded_rows, sparse_mlp_down
    from .primitives import gather_dot, gather_weighted_sum, scatter_outer_add
    from .select import topk_indices

__all__ = [
    "SparseMLP",
    "active_code",
    "gather_dot",
    "gather_weighted_sum",
    "mask_code",
    "padded_rows",
    "scatter_outer_add",
    "sparse_decode",
    "sparse_encode",
    "sparse_mlp_down",
    "topk_indices",
]
