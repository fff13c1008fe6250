import pytest

from saelab.zoo import DEFAULT_MODEL


@pytest.fixture(scope="session")
def zoo_model():
    from saelab.models import load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def small_cache(zoo_model, tmp_path_factory):
    """A 5000-row cache of two hooks in 4 shards (the last one short)."""
    from saelab.cache import build_cache
    from saelab.data import TokenData

    out = tmp_path_factory.mktemp("cache")
    build_cache(zoo_model, TokenData(context_length=64), ["blocks.1.hook_resid_post",
                "blocks.0.mlp.hook_post"], out, tokens=5000, batch_rows=16, shard_rows=1500)
    return out
