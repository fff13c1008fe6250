import pytest

from saelab.data.heldout import resolve_dictionary
from saelab.errors import SaelabError
from saelab.formats import load_one
from saelab.sae import SAE, SAEConfig


def _run_dir(tmp_path):
    """A run directory: one dictionary subdirectory per hook, as multi-hook training writes."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for hook in hooks:
        SAE(SAEConfig(d_in=4, n_latents=8, k=2, hook=hook)).save(tmp_path / "run" / hook)
    return tmp_path / "run", hooks


def test_a_run_directory_where_one_dictionary_belongs_is_one_line(tmp_path):
    run, hooks = _run_dir(tmp_path)
    for call in (lambda: load_one(run), lambda: resolve_dictionary(str(run), "zoo:none", None, None, "cpu")):
        with pytest.raises(SaelabError, match="run directory of 2 dictionaries") as e:
            call()
        assert all(h in str(e.value) for h in hooks) and "\n" not in str(e.value)


def test_load_one_gives_the_dictionary_itself(tmp_path):
    run, hooks = _run_dir(tmp_path)
    sae = load_one(run / hooks[1])
    assert isinstance(sae, SAE) and sae.cfg.hook == hooks[1] and not sae.training
