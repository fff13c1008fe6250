"""Sparse encode/decode kernels for k-sparse autoencoders and activation-sparse MLPs.

Two backends (Triton for CUDA, plain torch for CPU and as fallback) behind one set of functions;
``SAELAB_KERNEL_BACKEND`` in {auto, torch, triton} forces one (``saelab.kernels.backend``).
Depends on torch only (triton optionally, imported lazily), never on the rest of saelab.
"""

from .autograd import sparse_decode, sparse_encode
from .mlp import SparseMLP, active_code, mask_code, sparse_mlp_down
from .primitives import gather_dot, gather_weighted_sum, scatter_outer_add
from .select import topk_indices

__all__ = [
    "SparseMLP",
    "active_code",
    "gather_dot",
    "gather_weighted_sum",
    "mask_code",
    "scatter_outer_add",
    "sparse_decode",
    "sparse_encode",
    "sparse_mlp_down",
    "topk_indices",
]
