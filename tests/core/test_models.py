"""The transformer-lens adapter; this file also runs in CI's transformer-lens 3.x venv."""

import pytest
import torch

from saelab.errors import SaelabError
from saelab.models import TL_MAJOR, load_model


def test_backend_matches_installed_line(zoo_model):
    kind = "TransformerBridge" if TL_MAJOR >= 4 else "HookedTransformer"
    assert kind in zoo_model.backend


def test_loss_and_mlp_activations_match_huggingface(zoo_model):
    """Independent reference: the raw HF model (weight processing must not change these)."""
    from transformers import AutoModelForCausalLM

    from saelab.models import resolve_spec

    hf = AutoModelForCausalLM.from_pretrained(resolve_spec(zoo_model.spec)).eval()
    tokens = torch.tensor([[256] + list(b"def main():\n    return 0\n")])
    captured = {}
    handle = hf.transformer.h[1].mlp.act.register_forward_hook(
        lambda m, i, o: captured.__setitem__("post", o))
    with torch.no_grad():
        hf_loss = hf(tokens, labels=tokens).loss
    handle.remove()
    acts = zoo_model.activations(tokens, ["blocks.1.mlp.hook_post", "blocks.3.hook_resid_post"])
    torch.testing.assert_close(acts["blocks.1.mlp.hook_post"], captured["post"], atol=1e-4, rtol=1e-4)
    assert acts["blocks.3.hook_resid_post"].shape == (1, tokens.shape[1], 128)
    tl_loss = zoo_model.model(tokens, return_type="loss")
    torch.testing.assert_close(tl_loss, hf_loss, atol=1e-4, rtol=1e-4)


def test_hook_dims_flatten_heads(zoo_model):
    dims = zoo_model.hook_dims(["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"])
    assert dims == {"blocks.0.attn.hook_z": 128, "blocks.0.mlp.hook_post": 512}


def test_gradients_match_autograd_on_hf(zoo_model):
    """with_grads: d(summed next-token loss)/d(resid) equals a direct autograd computation."""
    tokens = torch.tensor([[256] + list(b"import os\nprint(os.sep)\n")])
    hook = "blocks.2.hook_resid_post"
    out = zoo_model.activations(tokens, [hook], with_grads=True)
    grad = out[f"{hook}:grad"]
    assert grad.shape == out[hook].shape and grad.abs().sum() > 0
    # reference: splice a leaf tensor in at the hook and differentiate the loss w.r.t. it
    leaf = out[hook].clone().requires_grad_(True)
    with torch.enable_grad():
        logits = zoo_model.model.run_with_hooks(
            tokens, fwd_hooks=[(hook, lambda x, hook: leaf)], return_type="logits")
        torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum").backward()
    torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-4)


def test_unknown_hook_is_a_clear_error(zoo_model):
    with pytest.raises(SaelabError, match="unknown hook 'blocks.9.hook_resid_post'"):
        zoo_model.check_hooks(["blocks.9.hook_resid_post"])


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaelabError, match="pass its local directory"):
        load_model("hf:nobody/no-such-model-xyz")


def test_bare_name_is_an_instant_error_without_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a bare model name must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(SaelabError, match="no such directory; for the Hugging Face hub write hf:gpt2"):
        load_model("gpt2")


def test_missing_zoo_model_and_bad_path(tmp_path):
    with pytest.raises(SaelabError, match="zoo model 'nope' is not installed"):
        load_model("zoo:nope")
    with pytest.raises(SaelabError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path / "missing"))
