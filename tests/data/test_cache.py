import json

import pytest
import torch

from saelab.data.cache import MANIFEST, CacheStream, Manifest, build_cache
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError

HOOK = "blocks.1.hook_resid_post"


def _all_rows(directory, hook=HOOK):
    from safetensors.torch import load_file

    m = Manifest.read(directory)
    return torch.cat([load_file(str(directory / s["file"]))[hook] for s in m.shards])


def test_manifest_records_what_was_cached(small_cache):
    m = json.loads((small_cache / MANIFEST).read_text())
    assert m["model"] == "zoo:pystdlib-4l" and m["rows"] == 5000
    assert m["hooks"] == {HOOK: 128, "blocks.0.mlp.hook_post": 512}
    assert [s["rows"] for s in m["shards"]] == [1500, 1500, 1500, 500]
    assert m["data"]["spec"] == "builtin:stdlib" and m["data"]["split"] == "train"


def test_cached_rows_match_a_fresh_forward_without_bos(small_cache, zoo_model):
    rows = next(TokenData(context_length=64).batches(zoo_model.tokenizer, 16))
    acts = zoo_model.activations(rows, [HOOK])[HOOK]
    keep = (rows != 256)
    torch.testing.assert_close(_all_rows(small_cache)[: int(keep.sum())], acts[keep])


@pytest.mark.parametrize("batch", [1000, 777])
def test_every_row_served_exactly_once_per_epoch(small_cache, batch):
    stream = CacheStream(small_cache, HOOK, batch, seed=3, buffer_shards=2)
    it = iter(stream)
    epoch = []
    while stream.epoch == 0:
        epoch.append(next(it))
        if sum(b.shape[0] for b in epoch) >= 5000:
            break
    served = torch.cat(epoch)
    ref = _all_rows(small_cache)
    assert served.shape == ref.shape
    # same multiset of rows: compare sorted by a row fingerprint
    key = lambda x: x @ torch.linspace(1, 2, x.shape[1])  # noqa: E731
    torch.testing.assert_close(served[key(served).argsort()], ref[key(ref).argsort()])
    assert not torch.equal(served, ref)  # and actually shuffled


def test_resume_from_state_continues_exactly(small_cache):
    a = CacheStream(small_cache, HOOK, 600, seed=1, buffer_shards=2)
    it = iter(a)
    full = [next(it) for _ in range(14)]  # crosses group and epoch boundaries
    b = CacheStream(small_cache, HOOK, 600, seed=1, buffer_shards=2)
    it_b = iter(b)
    for _ in range(5):
        next(it_b)
    state = b.state_dict()
    c = CacheStream(small_cache, HOOK, 600, seed=1, buffer_shards=2)
    c.load_state_dict(state)
    resumed = [next(iter_c) for iter_c in [iter(c)] for _ in range(9)]
    for x, y in zip(full[5:], resumed, strict=True):
        torch.testing.assert_close(x, y)


def test_truncated_shard_names_the_file(small_cache, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_cache, broken)
    shard = broken / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SaelabError, match="shard_00001.safetensors"):
        CacheStream(broken, HOOK, 100)


def test_corrupt_shard_with_same_size_names_the_file(small_cache, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_cache, broken)
    shard = broken / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xff" * 8  # header length garbage
    shard.write_bytes(bytes(data))
    stream = CacheStream(broken, HOOK, 5000, buffer_shards=4)
    with pytest.raises(SaelabError, match="shard_00002.safetensors"):
        next(iter(stream))


def test_missing_cache_and_missing_hook(small_cache, tmp_path):
    with pytest.raises(SaelabError, match="no activation cache"):
        CacheStream(tmp_path, HOOK, 10)
    with pytest.raises(SaelabError, match="holds hooks"):
        CacheStream(small_cache, "blocks.3.hook_resid_post", 10)


def test_build_refuses_non_empty_dir_and_leaves_it(zoo_model, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(SaelabError, match="not empty"):
        build_cache(zoo_model, TokenData(), [HOOK], tmp_path, tokens=10)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "precious"
