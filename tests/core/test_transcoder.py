"""Transcoders (`SAEConfig.target_hook`, `skip`): the forward pass and its gradients against a
dense float64 computation written here, save/load, and the bad combinations refused in one line."""

import pytest
import torch

import saelab
from saelab.errors import SaelabError
from saelab.models import check_hook_order
from saelab.sae import SAE, SAEConfig

D_IN, D_OUT, N, K = 12, 20, 40, 5
IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def transcoder(skip: bool, allocator: str = "topk", seed: int = 0, dtype=torch.float64) -> SAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D_IN, n_latents=N, k=K, allocator=allocator, hook=IN, target_hook=OUT,
                    d_out=D_OUT, skip=skip)
    sae = SAE(cfg).to(dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def dense(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transcoder written densely: no b_dec on the input, top-k of relu, W_skip x added."""
    pre = x @ sae.W_enc.T + sae.b_enc
    top = pre.topk(K, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
    y = z @ sae.W_dec + sae.b_dec
    if sae.cfg.skip:
        y = y + x @ sae.W_skip.T
    return z, y


@pytest.mark.parametrize("skip", [False, True])
def test_forward_matches_dense_float64(skip):
    sae = transcoder(skip)
    x = torch.randn(30, D_IN, dtype=torch.float64)
    z_ref, y_ref = dense(sae, x)
    with torch.no_grad():
        code = sae.encode(x)
        torch.testing.assert_close(code.to_dense(), z_ref)
        torch.testing.assert_close(sae(x), y_ref)
        torch.testing.assert_close(sae.decode(*code, x), y_ref)
        assert sae(x).shape == (30, D_OUT)
        # leading dims pass through, as for an SAE
        torch.testing.assert_close(sae(x.view(5, 6, D_IN)), y_ref.view(5, 6, D_OUT))


@pytest.mark.parametrize("skip", [False, True])
def test_gradients_match_dense_float64(skip):
    sae, ref = transcoder(skip), transcoder(skip)
    x, y = torch.randn(30, D_IN, dtype=torch.float64), torch.randn(30, D_OUT, dtype=torch.float64)
    (sae(x) - y).pow(2).sum().backward()
    (dense(ref, x)[1] - y).pow(2).sum().backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_skip_decode_needs_the_input():
    sae = transcoder(True)
    x = torch.randn(3, D_IN, dtype=torch.float64)
    with pytest.raises(SaelabError, match="needs its input"):
        sae.decode(*sae.encode(x))


def test_new_transcoder_starts_with_zero_skip_and_unit_rows():
    sae = SAE(SAEConfig(d_in=D_IN, n_latents=N, k=K, hook=IN, target_hook=OUT, d_out=D_OUT, skip=True))
    assert torch.equal(sae.W_skip, torch.zeros(D_OUT, D_IN))
    for w in (sae.W_enc, sae.W_dec):
        torch.testing.assert_close(w.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("allocator", ["topk", "mutual_choice", "relu"])
def test_save_load_roundtrip(tmp_path, skip, allocator):
    sae = transcoder(skip, allocator, dtype=torch.float32)
    if sae.cfg.has_thresholds:
        sae.threshold.fill_(0.5)
    sae.save(tmp_path / "t")
    loaded = saelab.load(str(tmp_path / "t"))
    assert loaded.cfg == sae.cfg and (loaded.cfg.target_hook, loaded.cfg.skip) == (OUT, skip)
    assert sae.state_dict().keys() == loaded.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae.eval()(x))


@pytest.mark.parametrize(("fields", "message"), [
    ({"skip": True}, "skip and d_out describe transcoders; set target_hook"),
    ({"d_out": 7}, "skip and d_out describe transcoders"),
    ({"hook": OUT, "target_hook": IN}, "does not come after input hook"),
    ({"hook": "blocks.2.hook_resid_pre", "target_hook": "blocks.1.hook_mlp_out"}, "does not come after"),
    ({"hook": OUT, "target_hook": OUT}, "does not come after"),
    ({"hook": IN, "target_hook": OUT, "skip": True, "allocator": "matryoshka"},
     "matryoshka with a skip connection is not supported"),
])
def test_bad_combinations_are_one_line_errors(fields, message):
    with pytest.raises(SaelabError, match=message) as e:
        SAEConfig(d_in=D_IN, n_latents=N, k=K, **fields)
    assert "\n" not in str(e.value)


def test_hook_order_across_blocks_and_unknown_names():
    check_hook_order("blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre")  # later block
    check_hook_order("hook_embed", "blocks.0.hook_resid_post")
    check_hook_order("blocks.1.custom_hook", "blocks.1.hook_mlp_out")  # unknown: splicing checks it
    with pytest.raises(SaelabError):
        check_hook_order("blocks.1.mlp.hook_post", "blocks.1.mlp.hook_pre")


def model_transcoder(model, skip: bool, hooks=(IN, OUT)) -> SAE:
    d = model.hook_dims(list(hooks))
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=d[hooks[0]], n_latents=64, k=8, hook=hooks[0], target_hook=hooks[1],
                        d_out=d[hooks[1]], skip=skip, processing=model.processing))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return sae.eval()


@pytest.mark.parametrize("skip", [False, True])
def test_spliced_transcoder_replaces_its_target_from_its_input(zoo_model, skip):
    """run_with_saes with a transcoder equals splicing, by hand, its output computed from the
    clean input activation; keyed by either hook; with the error term the clean logits."""
    sae = model_transcoder(zoo_model, skip)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        x = zoo_model.activations(tokens, [IN])[IN]
        y_hat = sae(x)
        by_hand = zoo_model.logits(tokens, {OUT: lambda act: y_hat})
        clean = zoo_model.logits(tokens)
        for key in (OUT, IN):
            torch.testing.assert_close(zoo_model.run_with_saes(tokens, {key: sae}), by_hand)
        assert not torch.allclose(by_hand, clean)
        torch.testing.assert_close(zoo_model.run_with_saes(tokens, {OUT: sae}, error_term=True), clean)
        # latents read the input hook, keyed either way
        torch.testing.assert_close(zoo_model.latents(tokens, {OUT: sae})[OUT].to_dense(),
                                   sae.encode(x).to_dense())
        with pytest.raises(SaelabError, match="was given for hook blocks.0.hook_resid_post"):
            zoo_model.run_with_saes(tokens, {"blocks.0.hook_resid_post": sae})


def test_splicing_refuses_a_target_reached_before_its_input(zoo_model):
    """Names the static order check does not know are checked as the forward pass runs."""
    cfg = SAEConfig(d_in=128, n_latents=64, k=8, target_hook="blocks.1.hook_resid_mid", d_out=128)
    object.__setattr__(cfg, "hook", "blocks.1.hook_mlp_out")  # past SAEConfig's name check
    sae = SAE(cfg).eval()
    with pytest.raises(SaelabError, match="ran before its input hook"):
        zoo_model.run_with_saes(torch.randint(0, 256, (1, 8)), {"blocks.1.hook_resid_mid": sae})
