"""Imports flow one way: kernels <- core (the rest of saelab) <- training,
evals <- the CLI layer (saelab.cli and its modules, saelab.__main__). Every import of every
module of the package counts, inside functions and relative ones included."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = ("saelab", "saelab.kernels", "saelab.training", "saelab.evals")
RANK = {"kernels": 0, "core": 1, "training": 2, "evals": 2, "cli": 3}


def _modules() -> dict[str, Path]:
    """module name -> source file, for every .py under each package's directory (the mapped
    subpackages live outside saelab/'s directory, so each is walked from its own)."""
    found = {}
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join((name, *parts))
            found.setdefault(module.removesuffix(".__init__"), path)
    return found


MODULES = _modules()


def layer(module: str) -> str | None:
    """The layer of a saelab module name; None outside saelab."""
    if module in ("saelab.__main__", "saelab.cli") or module.startswith("saelab.cli."):
        return "cli"
    for sub in ("kernels", "training", "evals"):
        if module == f"saelab.{sub}" or module.startswith(f"saelab.{sub}."):
            return sub
    if module == "saelab" or module.startswith("saelab."):
        return "core"
    return None


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative ones resolved; for
    `from P import N` where P.N is a module of the package, P.N."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in MODULES else base))
    return found


def test_every_layer_has_modules():
    """The walk sees the whole package (a wrong root would make the test below vacuous)."""
    seen = {layer(m) for m in MODULES}
    assert seen == set(RANK), seen
    assert {"saelab.training.run", "saelab.evals.evaluate", "saelab.kernels.autograd",
            "saelab.cli.app", "saelab.sae"} <= set(MODULES)


def test_resolves_relative_imports():
    """`from .primitives import x` in saelab.kernels.autograd is saelab.kernels.primitives."""
    targets = {t for _, t in imports("saelab.kernels.autograd", MODULES["saelab.kernels.autograd"])}
    assert "saelab.kernels.primitives" in targets


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module):
    mine = layer(module)
    bad = [f"line {line}: {target} ({layer(target)})" for line, target in imports(module, MODULES[module])
           if layer(target) is not None and layer(target) != mine and RANK[layer(target)] >= RANK[mine]]
    assert not bad, f"{module} ({mine}) imports against the layers: {bad}"
