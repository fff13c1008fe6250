"""Dictionaries on disk in every format saelab reads: its own (`saelab.sae`), SAELens's
(`saelens`), EleutherAI sparsify's and run directories of one dictionary per hook (`sparsify`),
and the Hugging Face hub (`hub`). `open_dictionary` tells them apart; `saelab.load` is it."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.data.specs import hub_name
from saelab.errors import SaelabError
from saelab.sae import SAE


def open_dictionary(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> SAE | dict[str, SAE]:
    """The dictionary (or {hook: SAE} of a run directory) at `path`, in eval() mode; see
    `saelab.load`."""
    from saelab.formats import hub, saelens, sparsify

    spec = str(path)
    repo = hub_name(spec)
    path = hub.hub_snapshot(repo) if repo is not None else Path(path)
    if not path.is_dir():
        raise SaelabError(
            f"no dictionary directory {spec!r}; for the Hugging Face hub write hf:OWNER/NAME[/FOLDER]"
        )
    if sparsify.recognises(path):  # a sparsify dictionary, or a run dir -> {hook: SAE}
        return sparsify.load(path, device=device, dtype=dtype)
    sae = saelens.import_saelens(path, device=device) if saelens.is_saelens_dir(path) \
        else SAE.load(path, device=device)
    return sae.to(dtype).eval() if dtype is not None else sae.eval()


def load_one(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The one dictionary at `path`; a run directory ({hook: SAE}) is refused in one line."""
    sae = open_dictionary(path, device=device)
    if isinstance(sae, dict):
        raise SaelabError(f"{path} is a run directory of {len(sae)} dictionaries ({', '.join(sae)}); "
                          "pass one hook's subdirectory")
    return sae
