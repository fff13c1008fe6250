"""Sparse encode/decode kernels for k-sparse autoencoders (torch backend).

Depends on torch only, so it can be tested and benchmarked apart from the
rest of saelab.
"""

from .autograd import sparse_decode, sparse_encode
from .torch_ops import gather_dot, gather_weighted_sum, scatter_outer_add

__all__ = [
    "gather_dot",
    "gather_weighted_sum",
    "scatter_outer_add",
    "sparse_decode",
    "sparse_encode",
]
