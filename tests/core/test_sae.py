import pytest
import torch

import saelab
from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig


def _dense_reference(sae, x):
    """The SAE written densely, independently of the sparse kernels."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
    return z, z @ sae.W_dec + sae.b_dec


def _random_sae(d=24, n=50, k=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k)).to(dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def test_encode_decode_match_dense_reference():
    sae = _random_sae()
    x = torch.randn(40, 24, dtype=torch.float64)
    z_ref, xhat_ref = _dense_reference(sae, x)
    with torch.no_grad():
        idx, vals = sae.encode(x)
        assert idx.shape == vals.shape == (40, 5)
        z = torch.zeros_like(z_ref).scatter_add(1, idx, vals)
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(sae.decode(idx, vals), xhat_ref)
        torch.testing.assert_close(sae(x), xhat_ref)


def test_gradients_match_dense_reference():
    """The sparse backward (k rows per token) gives the dense autograd gradients."""
    sae = _random_sae()
    ref = _random_sae()
    x = torch.randn(40, 24, dtype=torch.float64)
    (sae(x) - x).pow(2).sum().backward()
    (_dense_reference(ref, x)[1] - x).pow(2).sum().backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_save_load_roundtrip(tmp_path):
    sae = _random_sae(dtype=torch.float32)
    sae.save(tmp_path / "d")
    loaded = saelab.load(str(tmp_path / "d"))
    assert loaded.cfg == sae.cfg
    for a, b in zip(sae.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SaelabError, match="no saelab dictionary"):
        saelab.load(str(tmp_path))
    sae = _random_sae(dtype=torch.float32)
    sae.save(tmp_path)
    w = tmp_path / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(SaelabError, match="truncated or corrupt"):
        saelab.load(str(tmp_path))


def test_k_larger_than_dictionary_is_rejected():
    with pytest.raises(SaelabError, match="k=60 is larger than the dictionary"):
        SAEConfig(d_in=8, n_latents=50, k=60)
    with pytest.raises(SaelabError, match="unknown allocator"):
        SAEConfig(d_in=8, n_latents=50, k=4, allocator="nope")
