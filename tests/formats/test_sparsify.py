"""sparsify interop and run directories: import, export, `saelab.load` format detection, checked
against sparsify's maths written densely here from its files (sparsify/sparse_coder.py and
fused_encoder.py, 1.3)."""

import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_saelens import D, K, N, dense_code, random_sae  # tests/ is on sys.path

import saelab
from saelab.errors import SaelabError
from saelab.formats.sparsify import (
    export_sparsify,
    hook_from_hookpoint,
    hookpoint_from_hook,
    import_sparsify,
)

SPARSIFY_CFG = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N,
                "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}


def sparsify_reference(cfg: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's encode/decode: top k of relu(encoder(x - b_dec)), then acts @ W_dec + b_dec."""
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return z, z @ w["W_dec"] + w["b_dec"]


def write_sparsify(path, cfg: dict | None = None, seed: int = 1, extra: dict | None = None):
    """A hand-written sparsify dictionary directory; returns its (cfg, weights)."""
    torch.manual_seed(seed)
    c = SPARSIFY_CFG | (cfg or {})
    n = c["num_latents"] or c["d_in"] * c["expansion_factor"]
    w = {"encoder.weight": torch.randn(n, D), "encoder.bias": 0.1 * torch.randn(n),
         "W_dec": torch.randn(n, D), "b_dec": torch.randn(D), **(extra or {})}
    path.mkdir(parents=True)
    save_file(w, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(c))
    return c, w


@pytest.mark.parametrize("cfg", [{}, {"num_latents": 0, "expansion_factor": 3}, {"activation": None}],
                         ids=["num_latents", "expansion_factor", "pre-activation-field"])
def test_import_handwritten_sparsify_dir(tmp_path, cfg):
    if cfg.get("activation", "topk") is None:  # sparsify before its activation field: no such key
        cfg = {}
        c, w = write_sparsify(tmp_path / "layers.2")
        del c["activation"]
        (tmp_path / "layers.2" / "cfg.json").write_text(json.dumps(c))
    else:
        c, w = write_sparsify(tmp_path / "layers.2", cfg)
    sae = saelab.load(str(tmp_path / "layers.2"))
    n = c["num_latents"] or D * c["expansion_factor"]
    assert (sae.cfg.allocator, sae.cfg.k, sae.cfg.d_in, sae.cfg.n_latents) == ("topk", K, D, n)
    assert sae.cfg.hook == "blocks.2.hook_resid_post"  # from the hookpoint the directory is named for
    x = torch.randn(64, D)
    z, x_hat = sparsify_reference(c, w, x)
    assert (z != 0).any()
    torch.testing.assert_close(dense_code(sae, x), z)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat)


@pytest.mark.parametrize("allocator", ["topk", "gradient_topk"])
def test_export_follows_sparsify_maths_and_round_trips(tmp_path, allocator):
    sae = random_sae(allocator, processing="raw")  # sparsify runs on the raw model
    out = export_sparsify(sae, tmp_path / "sp")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg, w = json.loads((out / "cfg.json").read_text()), load_file(str(out / "sae.safetensors"))
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D, N, K, "topk")
    assert not (cfg["transcode"] or cfg["skip_connection"])
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
    x = torch.randn(64, D)
    z, x_hat = sparsify_reference(cfg, w, x)
    torch.testing.assert_close(dense_code(sae, x), z)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat)
    back = saelab.load(out)
    assert back.cfg == sae.cfg  # saelab's config rides along, so gradient_topk stays itself
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_load_dtype_and_mode(tmp_path):
    """As stored (sparsify may save bfloat16), or cast by dtype=; eval() mode like every load."""
    c, w = write_sparsify(tmp_path / "run" / "layers.1")
    save_file({k: v.bfloat16() for k, v in w.items()}, str(tmp_path / "run" / "layers.1" / "sae.safetensors"))
    sae = saelab.load(tmp_path / "run" / "layers.1")
    assert sae.dtype == torch.bfloat16 and not sae.training
    assert torch.equal(sae.W_enc, w["encoder.weight"].bfloat16())
    run = saelab.load(tmp_path / "run", dtype=torch.float64)
    assert [(s.dtype, s.training) for s in run.values()] == [(torch.float64, False)]
    x = torch.randn(8, D, dtype=torch.float64)
    ref = {k: v.bfloat16().double() for k, v in w.items()}
    z = sparsify_reference(c, ref, x)[0]
    torch.testing.assert_close(dense_code(run["blocks.1.hook_resid_post"], x), z)


def test_hookpoint_names():
    pairs = {"layers.3": "blocks.3.hook_resid_post", "h.0": "blocks.0.hook_resid_post",
             "layers.11.mlp": "blocks.11.hook_mlp_out", "h.2.attn": "blocks.2.hook_attn_out",
             "layers.2.self_attn": "blocks.2.hook_attn_out", "layers.5.attention": "blocks.5.hook_attn_out"}
    for hookpoint, hook in pairs.items():
        assert hook_from_hookpoint(hookpoint) == hook
    for name in ("embed_tokens", "layers.3.mlp.act_fn", "sae"):
        assert hook_from_hookpoint(name) is None
    for hook in ("blocks.3.hook_resid_post", "blocks.11.hook_mlp_out", "blocks.2.hook_attn_out"):
        assert hook_from_hookpoint(hookpoint_from_hook(hook)) == hook
    assert hookpoint_from_hook("blocks.2.attn.hook_z") == "blocks.2.attn.hook_z"


def test_run_directory_loads_every_hook(tmp_path):
    """sparsify's run layout: one subdirectory per hookpoint beside training state and best/."""
    run = tmp_path / "run"
    refs = {hp: write_sparsify(run / hp, seed=i) for i, hp in enumerate(["layers.0", "layers.1.mlp"])}
    (run / "config.json").write_text("{}")
    (run / "state.pt").write_bytes(b"not a dictionary")
    write_sparsify(run / "best" / "layers.0")  # nested run, skipped at the top level
    saes = saelab.load(run)
    assert set(saes) == {"blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"}
    x = torch.randn(16, D)
    for hp, (c, w) in refs.items():
        sae = saes[hook_from_hookpoint(hp)]
        torch.testing.assert_close(dense_code(sae, x), sparsify_reference(c, w, x)[0])
    # seeds nest one level down; a hookpoint's directory is then a run of its seeds
    write_sparsify(run / "layers.3" / "seed0", seed=5)
    write_sparsify(run / "layers.3" / "seed1", seed=6)
    seeds = saelab.load(run / "layers.3")
    assert set(seeds) == {"seed0", "seed1"}
    assert {s.cfg.hook for s in seeds.values()} == {"blocks.3.hook_resid_post"}
    # a multi-hook saelab run (OUT/HOOK) loads the same way, keyed by hook
    for i, hook in enumerate(["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]):
        s = random_sae(seed=i)
        s.cfg = dataclasses.replace(s.cfg, hook=hook)
        s.save(tmp_path / "saelab-run" / hook)
    assert set(saelab.load(tmp_path / "saelab-run")) == {"blocks.0.hook_resid_post",
                                                          "blocks.2.hook_resid_post"}


def test_import_errors_are_clear(tmp_path):
    cases = {
        "transcoder": ({"transcode": True}, None, "hookpoint .transcoder., whose hooks saelab cannot tell"),
        "skip": ({"skip_connection": True}, {"W_skip": torch.zeros(D, D)}, "skip connection"),
        "groupmax": ({"activation": "groupmax"}, None, "activation 'groupmax' is not supported"),
        "signed": ({"signed": True}, None, "is signed"),
        "shapes": ({"num_latents": N + 1}, None, r"holds .* but .* implies"),
    }
    for name, (cfg, extra, message) in cases.items():
        c, _ = write_sparsify(tmp_path / name, cfg, extra=extra)
        if name == "shapes":
            w = {"encoder.weight": torch.zeros(N, D), "encoder.bias": torch.zeros(N),
                 "W_dec": torch.zeros(N, D), "b_dec": torch.zeros(D)}
            save_file(w, str(tmp_path / name / "sae.safetensors"))
        with pytest.raises(SaelabError, match=message) as e:
            saelab.load(tmp_path / name)
        assert "\n" not in str(e.value)
    write_sparsify(tmp_path / "noweights")
    (tmp_path / "noweights" / "sae.safetensors").unlink()
    with pytest.raises(SaelabError, match="sae.safetensors is missing"):
        saelab.load(tmp_path / "noweights")
    w = tmp_path / "corrupt" / "sae.safetensors"
    write_sparsify(tmp_path / "corrupt")
    w.write_bytes(w.read_bytes()[:40])
    with pytest.raises(SaelabError, match="truncated or corrupt"):
        import_sparsify(tmp_path / "corrupt")


def test_unrecognised_directories_are_one_line_errors(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps({"width": 3}))
    (tmp_path / "odd" / "sae.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for name, message in {"odd": "is not a saelab, SAELens or sparsify dictionary config",
                          "empty": "no saelab dictionary at .* also reads SAELens and sparsify"}.items():
        with pytest.raises(SaelabError, match=message) as e:
            saelab.load(tmp_path / name)
        assert "\n" not in str(e.value)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(SaelabError, match="mutual_choice dictionary is not TopK"):
        export_sparsify(random_sae("mutual_choice"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export_sparsify(random_sae(processing="raw"), tmp_path / "y")
    with pytest.raises(SaelabError, match="is not empty"):
        export_sparsify(random_sae(seed=1, processing="raw"), tmp_path / "y")


def test_export_cli_sparsify(tmp_path, monkeypatch, capsys):
    from saelab.cli.app import main

    sae = random_sae(processing="raw")
    sae.save(tmp_path / "d")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["saelab", "export", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code

    assert run(tmp_path / "d", tmp_path / "sp", "--format", "sparsify") in (0, None)
    assert json.loads((tmp_path / "sp" / "cfg.json").read_text())["num_latents"] == N
    assert run(tmp_path / "sp", tmp_path / "back", "--format", "saelab") in (0, None)
    back = saelab.load(tmp_path / "back")
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    random_sae("mutual_choice").save(tmp_path / "mc")
    assert run(tmp_path / "mc", tmp_path / "nope", "--format", "sparsify") == 2
    assert "has no sparsify form" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_info_describes_a_run_directory(tmp_path, monkeypatch, capsys):
    """sparsify writes its training config as config.json beside the hooks: still a run, not a model."""
    from saelab.cli.app import main

    for i, hp in enumerate(["layers.0", "layers.1.mlp"]):
        write_sparsify(tmp_path / "run" / hp, seed=i)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"sae": {"k": K}, "batch_size": 32}))
    monkeypatch.setattr(sys, "argv", ["saelab", "info", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"blocks.0.hook_resid_post  topk, {N} x {D}, k={K}" in out
    assert f"blocks.1.hook_mlp_out     topk, {N} x {D}, k={K}" in out
