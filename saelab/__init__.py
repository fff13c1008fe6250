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
from saelab.specs import hub_name  # noqa: E402


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load a dictionary, in eval() mode: a saelab directory (`sae.safetensors` + `cfg.json`),
    a SAELens one (`sae_weights.safetensors` + `cfg.json`), or `hf:OWNER/NAME[/FOLDER]`, a
    Hugging Face hub repo holding either. `dtype` casts the weights (default: as stored)."""
    from saelab import saelens

    spec = str(path)
    repo = hub_name(spec)
    path = saelens.hub_snapshot(repo) if repo is not None else Path(path)
    if not path.is_dir():
        raise SaelabError(
            f"no dictionary directory {spec!r}; for the Hugging Face hub write hf:OWNER/NAME[/FOLDER]"
        )
    sae = saelens.import_saelens(path, device=device) if saelens.is_saelens_dir(path) \
        else SAE.load(path, device=device)
    return sae.to(dtype).eval() if dtype is not None else sae.eval()


__all__ = ["SAE", "SAEConfig", "SparseCode", "SaelabError", "load", "__version__"]
