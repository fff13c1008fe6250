"""saelab: sparse autoencoders for interpretability.

    import saelab
    sae = saelab.load("runs/sae")       # a dictionary directory written by `saelab train`,
                                        # a SAELens directory, or hf:OWNER/NAME on the hub
    idx, vals = sae.encode(x)            # (..., k) latent indices and values (a SparseCode)
    z = sae.encode_dense(x)              # (..., n_latents)
    x_hat = sae.decode(idx, vals)
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from saelab.errors import SaelabError  # noqa: E402
from saelab.sae import SAE, SAEConfig, SparseCode  # noqa: E402


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> SAE | dict[str, SAE]:
    """Load a dictionary, in eval() mode: a saelab directory (`sae.safetensors` + `cfg.json`),
    a SAELens one (`sae_weights.safetensors` + `cfg.json`), a sparsify one (told apart from
    saelab's by cfg.json), or `hf:OWNER/NAME[/FOLDER]`, a Hugging Face hub repo holding one.
    `dtype` casts the weights (default: as stored). A run directory (one dictionary subdirectory
    per hook, as sparsify and multi-hook `saelab train` write) gives {hook: SAE}."""
    from saelab.formats import open_dictionary

    return open_dictionary(path, device, dtype)


__all__ = ["SAE", "SAEConfig", "SparseCode", "SaelabError", "load", "__version__"]
