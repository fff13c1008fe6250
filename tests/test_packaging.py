"""The layout: training/, evals/, kernels/ live under saelab, never at top level, installed or
in the checkout (where the symlinks saelab/training -> ../training etc. give it that shape)."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SUBPACKAGES = ("saelab", "saelab.training", "saelab.evals", "saelab.kernels")
ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import_under_saelab():
    for name in ("saelab.training", "saelab.evals", "saelab.kernels", "saelab.zoo"):
        assert importlib.util.find_spec(name) is not None, name


def test_no_top_level_training_evals_kernels(tmp_path):
    # the installed package alone: from an empty directory, without the tests' PYTHONPATH (the
    # repo root, which has these folders)
    code = (
        "import importlib.util, sys; "
        "print([n for n in ('training', 'evals', 'kernels') if importlib.util.find_spec(n)])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_checkout_is_what_gets_tested(tmp_path):
    """This session and its subprocesses (from any cwd) import every part of saelab from this
    checkout, never a mix with an installed copy."""
    def where(origin: str) -> Path:
        return Path(origin).resolve().parent

    here = [where(importlib.import_module(name).__file__) for name in SUBPACKAGES]
    assert here == [ROOT / "saelab", ROOT / "training", ROOT / "evals", ROOT / "kernels"]
    code = (f"import importlib, json; "
            f"print(json.dumps([importlib.import_module(n).__file__ for n in {SUBPACKAGES!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert [where(f) for f in json.loads(out)] == here


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
