"""saelab: sparse autoencoders for interpretability.

    import saelab
    sae = saelab.load("runs/sae")       # a dictionary directory written by `saelab train`,
                                        # a SAELens directory, or a hub repo id
    idx, vals = sae.encode(x)            # (B, k) latent indices and values
    x_hat = sae.decode(idx, vals)
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from saelab.errors import SaelabError  # noqa: E402
from saelab.sae import SAE, SAEConfig  # noqa: E402


def load(path_or_repo_id: str | Path, device: str = "cpu") -> SAE:
    """Load a dictionary: a saelab directory (`sae.safetensors` + `cfg.json`), a SAELens one
    (`sae_weights.safetensors` + `cfg.json`), a sparsify one (told apart from saelab's by
    cfg.json), or a Hugging Face hub repo `owner/name[/folder]` holding one. A run directory
    (one dictionary subdirectory per hook, as sparsify and multi-hook `saelab train` write)
    gives {hook: SAE} (`saelab.sparsify_format.load_run`). A path that does not exist locally
    and is not absolute or ./-relative is tried as a repo id."""
    from saelab import saelens, sparsify_format

    path, spec = Path(path_or_repo_id), str(path_or_repo_id)
    if not path.exists() and "/" in spec and not spec.startswith((".", "/", "~")):
        path = saelens.hub_snapshot(spec)
    if sparsify_format.recognises(path):  # a sparsify dictionary, or a run dir -> {hook: SAE}
        return sparsify_format.load(path, device=device)
    if saelens.is_saelens_dir(path):
        return saelens.import_saelens(path, device=device)
    return SAE.load(path, device=device)


__all__ = ["SAE", "SAEConfig", "SaelabError", "load", "__version__"]
