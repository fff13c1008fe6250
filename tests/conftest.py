import os
from pathlib import Path

import pytest

# pyproject's `pythonpath = ["."]` makes this session import the checkout's saelab; the tests'
# subprocesses (`python -m saelab`, torchrun, a fresh pytest) import it too, from any cwd.
ROOT = Path(__file__).resolve().parents[1]
TEST_MODEL = "zoo:pystdlib-4l"  # the small shipped model the mechanics tests run on (not the default)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def zoo_model():
    from saelab.models import load_model

    return load_model(TEST_MODEL)


@pytest.fixture(scope="session")
def small_cache(zoo_model, tmp_path_factory):
    """A 5000-row cache of two hooks in 4 shards (the last one short)."""
    from saelab.data.cache import build_cache
    from saelab.data.tokens import TokenData

    out = tmp_path_factory.mktemp("cache")
    build_cache(zoo_model, TokenData(context_length=64), ["blocks.1.hook_resid_post",
                "blocks.0.mlp.hook_post"], out, tokens=5000, batch_rows=16, shard_rows=1500)
    return out
