"""The notebook surface: usable SAEs on construction, SparseCode, dense codes, train()/eval()
modes, dtype/device, relu and jumprelu dictionaries, splicing and latents per token."""

import pytest
import torch

import saelab
from saelab import SAE, SAEConfig, SparseCode
from saelab.errors import SaelabError

HOOK = "blocks.2.hook_resid_post"


def dense_reference(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Float64 dense code written out by hand: relu(pre) on each token's k largest."""
    W, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x.double() - b_dec) @ W.T + b_enc
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(sae.cfg.k, dim=1).indices, True)
    return torch.where(keep, pre.relu(), 0.0)


def test_new_sae_is_initialised_and_usable():
    torch.manual_seed(5)
    sae = SAE(SAEConfig(d_in=12, n_latents=40, k=4))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec)
    x = torch.randn(5, 12)
    torch.testing.assert_close(sae.encode_dense(x).double(), dense_reference(sae, x), atol=1e-5, rtol=1e-5)
    assert sae(x).shape == x.shape and torch.isfinite(sae(x)).all()
    assert sae.device == torch.device("cpu") and sae.dtype == torch.float32


def test_encode_takes_any_leading_shape_and_codes_behave_like_pairs():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, n_latents=30, k=3))
    x = torch.randn(2, 7, 8)
    code = sae.encode(x)
    assert isinstance(code, SparseCode) and code.shape == (2, 7, 3)
    idx, vals = code
    assert code[0] is idx and code[1] is vals
    flat = sae.encode(x.reshape(14, 8))
    assert torch.equal(flat.idx.reshape(2, 7, 3), idx)
    dense = sae.encode_dense(x)
    assert dense.shape == (2, 7, 30)
    torch.testing.assert_close(dense.reshape(14, 30).double(), dense_reference(sae, x.reshape(14, 8)),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(code.l0, (dense > 0).sum(-1))
    torch.testing.assert_close(sae.decode(idx, vals), sae.decode(*flat).reshape(2, 7, 8))
    torch.testing.assert_close(sae(x), dense @ sae.W_dec.detach() + sae.b_dec.detach())


def test_threshold_codes_of_different_widths_concatenate():
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=6, n_latents=25, k=4, allocator="mutual_choice")).eval()
    sae.threshold.copy_(torch.rand(25) * 0.5)
    a, b = sae.encode(torch.randn(3, 6)), sae.encode(2 * torch.randn(9, 6))
    assert a.shape[-1] != b.shape[-1]  # widths differ per call: why `cat` pads
    both = SparseCode.cat([a, b])
    assert both.shape[0] == 12
    torch.testing.assert_close(both.to_dense(), torch.cat([a.to_dense(), b.to_dense()]))
    assert torch.equal(both.l0, torch.cat([a.l0, b.l0]))


def test_batch_allocators_follow_train_and_eval_modes():
    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=2, allocator="mutual_choice"))
    x = torch.randn(10, 6)
    assert sae.training
    assert sae.encode(x).l0.sum() == 2 * 10  # train(): the batch's k*B largest, no thresholds
    sae.eval()
    with pytest.raises(SaelabError, match="no inference thresholds yet"):
        sae.encode(x)
    assert sae.encode(x, batch=True).l0.sum() == 20  # an explicit batch= still overrides
    sae.threshold.fill_(0.0)
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x).l0, (pre > 0).sum(1))


def test_load_returns_eval_mode_with_dtype_and_device(tmp_path):
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=3, allocator="mutual_choice"))
    sae.threshold.fill_(0.1)
    sae.save(tmp_path / "d")
    back = saelab.load(tmp_path / "d", dtype=torch.float64)
    assert not back.training and back.dtype == torch.float64 and back.device.type == "cpu"
    x = torch.randn(7, 6)
    torch.testing.assert_close(back.encode_dense(x), sae.eval().encode_dense(x).double())


def test_relu_and_jumprelu_codes_match_their_definitions():
    torch.manual_seed(4)
    x = torch.randn(9, 6)
    relu = SAE(SAEConfig(d_in=6, n_latents=15, k=0, allocator="relu"))
    pre = relu.pre_acts(x)
    torch.testing.assert_close(relu.encode_dense(x), pre.relu())
    jump = SAE(SAEConfig(d_in=6, n_latents=15, k=0, allocator="jumprelu"))
    jump.load_state_dict(relu.state_dict() | {"threshold": torch.rand(15)})
    theta = jump.threshold
    torch.testing.assert_close(jump.encode_dense(x), pre * (pre > theta))
    with pytest.raises(SaelabError, match="k positive for topk"):
        SAEConfig(d_in=6, n_latents=15, k=0)


def perfect_relu_sae(d: int) -> SAE:
    """x = relu(x) - relu(-x): latents +e_i and -e_i reconstruct any input exactly."""
    sae = SAE(SAEConfig(d_in=d, n_latents=2 * d, k=0, allocator="relu", hook=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_splicing_a_perfect_sae_leaves_logits_unchanged(zoo_model, tokens):
    clean = zoo_model.logits(tokens)
    with torch.no_grad():
        spliced = zoo_model.run_with_saes(tokens, {HOOK: perfect_relu_sae(128)})
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=1e-4)


def test_error_term_restores_the_clean_pass_and_the_block_restores_the_model(zoo_model, tokens):
    clean = zoo_model.logits(tokens)
    sae = SAE(SAEConfig(d_in=128, n_latents=512, k=4, hook=HOOK)).eval()
    with torch.no_grad():
        broken = zoo_model.run_with_saes(tokens, {HOOK: sae})
        with zoo_model.spliced({HOOK: sae}, error_term=True):
            kept = zoo_model.logits(tokens)
        with zoo_model.spliced({HOOK: sae}):
            inside = zoo_model.logits(tokens)
    assert (broken - clean).abs().max() > 0.1  # a random SAE changes the prediction
    torch.testing.assert_close(kept, clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inside, broken)
    torch.testing.assert_close(zoo_model.logits(tokens), clean)  # hooks gone after the block


def test_error_term_lets_gradients_reach_the_latents(zoo_model, tokens):
    sae = SAE(SAEConfig(d_in=128, n_latents=256, k=4, hook=HOOK)).eval()
    logits = zoo_model.run_with_saes(tokens, {HOOK: sae}, error_term=True)
    logits[..., 0].sum().backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_latents_per_token_match_encoding_the_activations(zoo_model, tokens):
    sae = SAE(SAEConfig(d_in=128, n_latents=256, k=5, hook=HOOK)).eval()
    code = zoo_model.latents(tokens, sae)
    assert code.shape == (2, 24, 5)
    x = zoo_model.activations(tokens, [HOOK])[HOOK]
    torch.testing.assert_close(code.to_dense(), sae.encode_dense(x))
    both = zoo_model.latents(tokens, {HOOK: sae, "blocks.0.hook_resid_post": SAE(
        SAEConfig(d_in=128, n_latents=64, k=2, hook="blocks.0.hook_resid_post")).eval()})
    assert set(both) == {HOOK, "blocks.0.hook_resid_post"}
    torch.testing.assert_close(both[HOOK].to_dense(), code.to_dense())
