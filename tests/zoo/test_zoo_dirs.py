"""`saelab zoo build` writes to the user's zoo directory, never into the package, and `zoo:NAME`
resolves shipped models first, then user builds."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from saelab import zoo
from saelab.cli.app import main
from saelab.errors import SaelabError
from saelab.zoo.build import build


@pytest.fixture
def user_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_ZOO_DIR", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


def _package_files() -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in zoo.MODELS_DIR.rglob("*")}


def test_user_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_ZOO_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert zoo.user_dir() == tmp_path / "cache" / "saelab" / "zoo"
    monkeypatch.setenv("SAELAB_ZOO_DIR", str(tmp_path / "mine"))
    assert zoo.user_dir() == tmp_path / "mine"


def test_build_writes_to_user_dir_not_package(user_zoo):
    before = _package_files()
    default = zoo.RECIPES[zoo.DEFAULT_MODEL.removeprefix("zoo:")]
    recipe = dataclasses.replace(default, name="tiny-user", tokens=2048, batch_size=4,
                                 context_length=32, checkpoints=0, shuffle_rows=64)
    path = build(recipe, heldout_rows=4)
    assert path == user_zoo / "tiny-user" and (path / "zoo_card.json").exists()
    assert _package_files() == before
    assert zoo.model_dir("zoo:tiny-user") == path
    assert "tiny-user" not in zoo.shipped_models()


def test_shipped_model_wins_and_list_shows_where(user_zoo, capsys):
    shipped = zoo.model_dir("zoo:pystdlib-4l")
    user_zoo.mkdir(parents=True)
    shutil.copytree(shipped, user_zoo / "pystdlib-4l")  # a local rebuild of a shipped recipe
    shutil.copytree(shipped, user_zoo / "mine")
    assert zoo.model_dir("zoo:pystdlib-4l") == shipped
    assert zoo.model_dir("zoo:mine") == user_zoo / "mine"
    with pytest.raises(SystemExit) as e:
        main(["zoo", "list"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "zoo:mine " in out and f"[built: {user_zoo / 'mine'}]" in out
    assert f"[shipped: {shipped}]" in out
    assert f"{zoo.DEFAULT_MODEL} (default) " in out and out.count("(default)") == 1


def test_recipe_architecture_fields_reach_the_model(user_zoo):
    from safetensors.torch import load_file

    recipe = zoo.ZooRecipe("tiny-untied", n_layer=1, d_model=16, n_head=2, d_mlp=32, context_length=16,
                           tokens=256, batch_size=4, checkpoints=0, shuffle_rows=16, init_std=0.5,
                           tie_embeddings=False)
    path = build(recipe, heldout_rows=2)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["initializer_range"] == 0.5 and cfg["tie_word_embeddings"] is False
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0
    weights = load_file(str(path / "model.safetensors"))
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    assert 0.3 < weights["transformer.wpe.weight"].std().item() < 0.7  # drawn with std 0.5


# --- zoo build replaces nothing it did not make (issue 22) ----------------------------------------

TINY = dict(tokens=512, batch_size=4, context_length=16, checkpoints=0, shuffle_rows=16,
            n_layer=1, d_model=16, n_head=2, d_mlp=32)


@pytest.fixture
def no_training(monkeypatch):
    """A build that gets as far as its first step fails the test: refusals come before it."""
    from saelab.zoo import build as zoo_build

    def train(*a, **k):
        raise AssertionError("training started before the output directory was refused")

    monkeypatch.setattr(zoo_build, "byte_tokenizer", train)


def _cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


def _tree(root) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def test_rebuild_needs_overwrite_and_replaces_only_a_zoo_build(user_zoo, tmp_path, monkeypatch):
    recipe = zoo.ZooRecipe("tiny-again", **TINY)
    path = build(recipe, heldout_rows=2)  # the default place: the user's zoo directory
    first = _tree(path)
    with monkeypatch.context() as m:
        m.setattr("saelab.zoo.build.byte_tokenizer", lambda *a: pytest.fail("trained"))
        with pytest.raises(SaelabError, match=f"a zoo model is already built at {path}; pass --overwrite"):
            build(recipe, heldout_rows=2)
        assert _tree(path) == first
        (path / "notes.txt").write_text("mine")
        with pytest.raises(SaelabError, match=r"also holds files no build writes \(notes.txt\)"):
            build(recipe, heldout_rows=2, overwrite=True)
        (path / "notes.txt").unlink()
    again = build(dataclasses.replace(recipe, seed=1), heldout_rows=2, overwrite=True)
    assert again == path and json.loads((path / "zoo_card.json").read_text())["recipe"]["seed"] == 1
    assert (path / "model.safetensors").read_bytes() != first["model.safetensors"]
    assert sorted(p.name for p in user_zoo.iterdir()) == ["tiny-again"]  # no temp or old dir left


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_build_into_a_users_directory_is_refused_before_training(tmp_path, capsys, no_training,
                                                                 overwrite):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    before = _tree(tmp_path)
    code, err = _cli(["zoo", "build", "pystdlib-4l-v2", "--out", str(mine), *overwrite], capsys)
    assert code == 2 and err == (f"saelab: error: output directory {mine} is not empty and is not a "
                                 "zoo build (no zoo_card.json; it holds data.csv); zoo build replaces "
                                 "nothing else: pick a new or empty directory")
    assert _tree(tmp_path) == before


def test_build_never_writes_into_the_shipped_models(capsys, no_training):
    shipped = zoo.model_dir("zoo:pystdlib-4l")
    code, err = _cli(["zoo", "build", "pystdlib-4l-v2", "--out", str(shipped), "--overwrite"], capsys)
    assert code == 2 and "inside saelab's shipped models" in err
