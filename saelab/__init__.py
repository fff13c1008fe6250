"""saelab: sparse autoencoders for interpretability.

    import saelab
    sae = saelab.load("runs/sae")       # a dictionary directory written by `saelab train`
    idx, vals = sae.encode(x)            # (B, k) latent indices and values
    x_hat = sae.decode(idx, vals)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from saelab.errors import SaelabError  # noqa: E402
from saelab.sae import SAE, SAEConfig  # noqa: E402


def load(path: str, device: str = "cpu") -> SAE:
    """Load a dictionary directory (`sae.safetensors` + `cfg.json`)."""
    return SAE.load(path, device=device)


__all__ = ["SAE", "SAEConfig", "SaelabError", "load", "__version__"]
