"""Does activation sparsity emerge during training? Density measured on a build's checkpoints.

`saelab zoo build` keeps the initial model, a few intermediate ones and the final one under
`MODEL_DIR/checkpoints/step-N/` (`saelab.zoo.ZooRecipe.checkpoints`); each is measured here on
the same held-out rows, with the same activity threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.sparsity.measure import measure
from saelab.models import load_model, resolve_spec
from saelab.zoo.build import CHECKPOINTS_DIR


def checkpoint_dirs(spec: str) -> list[Path]:
    """A model's kept checkpoints, in step order, or a one-line error saying how to get them."""
    root = Path(resolve_spec(spec)) / CHECKPOINTS_DIR
    dirs = sorted(p for p in root.glob("step-*") if (p / "checkpoint.json").exists())
    if not dirs:
        raise SaelabError(
            f"model {spec} has no training checkpoints ({root} is empty or missing); zoo builds "
            "keep them: `saelab zoo build NAME --out DIR`, then `saelab sparsity --model DIR "
            "--checkpoints`"
        )
    return dirs


def over_training(spec: str, data: TokenData, tokens: int = 8192, threshold: float | None = None,
                  batch_rows: int = 32, device: str = "cpu") -> list[dict]:
    """Model-wide and per-layer density of every checkpoint of `spec`, in step order."""
    out = []
    for path in tqdm(checkpoint_dirs(spec), desc="checkpoints", unit="model"):
        meta = json.loads((path / "checkpoint.json").read_text())
        r = measure(load_model(str(path), device), data, tokens, threshold, batch_rows)
        out.append({"step": meta["step"], "tokens_seen": meta["tokens_seen"], "path": str(path),
                    "density": r["density"], "layer_density": [x["density"] for x in r["layers"]],
                    "dead_neurons": [x["dead_neurons"] for x in r["layers"]]})
    return out
