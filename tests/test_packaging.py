"""The installed layout: training/, evals/, kernels/ live under saelab, never at top level."""

import importlib.util
import subprocess
import sys
from pathlib import Path


def test_subpackages_import_under_saelab():
    for name in ("saelab.training", "saelab.evals", "saelab.kernels", "saelab.zoo"):
        assert importlib.util.find_spec(name) is not None, name


def test_no_top_level_training_evals_kernels(tmp_path):
    # run from an empty directory so the repo root (which has these folders) is not on sys.path
    code = (
        "import importlib.util, sys; "
        "print([n for n in ('training', 'evals', 'kernels') if importlib.util.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_kernels_import_nothing_else_of_saelab():
    src = Path(importlib.util.find_spec("saelab.kernels").origin).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import saelab" not in text and "from saelab" not in text, f


def test_default_zoo_model_ships_and_is_small():
    from saelab.zoo import DEFAULT_MODEL, model_dir

    d = model_dir(DEFAULT_MODEL)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "zoo_card.json"):
        assert (d / name).exists(), name
    assert sum(f.stat().st_size for f in d.iterdir()) <= 10 * 2**20
