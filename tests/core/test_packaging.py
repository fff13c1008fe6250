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
ROOT = Path(__file__).resolve().parents[2]


def test_subpackages_import_under_saelab():
    for name in ("saelab.training", "saelab.evals", "saelab.kernels", "saelab.zoo"):
        assert importlib.util.find_spec(name) is not None, name


def test_no_top_level_training_evals_kernels(tmp_path):
    # the installed package alone: from an empty directory, without the tests' PYTHONPATH (the
    # repo root, which has these folders). Other distributions may own these names (transformers
    # depends on PyPI's `kernels`); saelab must not, nor may they resolve into this checkout.
    code = (
        "import importlib.metadata as m, importlib.util as u, json; "
        "print(json.dumps({n: [m.packages_distributions().get(n, []), "
        "u.find_spec(n) and u.find_spec(n).origin] for n in ('training', 'evals', 'kernels')}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, check=True).stdout)
    for name, (dists, origin) in out.items():
        assert "saelab" not in dists, name
        assert origin is None or Path(origin).resolve().parent != ROOT / name, (name, origin)


def test_top_level_kernels_is_never_saelabs():
    """With the checkout's root on sys.path (as here), its kernels/ folder would shadow PyPI's
    `kernels`, which transformers imports to load any HF model: the name goes to the installed
    package, or is missing when none is installed."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        code = "import kernels"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr
    else:
        kernels = importlib.import_module("kernels")
        assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
        assert importlib.import_module("saelab.kernels").__file__ != kernels.__file__


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


def test_ci_runs_the_readmes_test_command():
    """The README's second set-up command (after installing the dev extra) is, step for step,
    what CI runs in its main venv: lint, type check, tests."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if 'pip install ".[dev]" && ' in line)
    steps = command.split('pip install ".[dev]" && ', 1)[1].split(" && ")
    assert steps[:2] == ["ruff check .", "mypy"] and steps[-1] == "pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    main_venv = ci.split('pip install -q ".[dev]"\n', 1)[1].split(")\n", 1)[0]
    ran = [line.split("#")[0].strip() for line in main_venv.splitlines()]
    ran = [r.replace("pytest -q", "pytest") for r in ran if r]
    assert ran[: len(steps)] == steps, (steps, ran)


def test_every_subpackage_is_installed():
    """A folder of modules missing from pyproject's package list installs without it, and the
    installed `saelab` then fails to import (the checkout's tests would not notice)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {Path(folder): name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for folder, name in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found <= set(setuptools["packages"]), sorted(found - set(setuptools["packages"]))
