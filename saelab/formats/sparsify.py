"""EleutherAI sparsify interop, and run directories (one dictionary per hook).

A sparsify dictionary directory holds `cfg.json` (its SparseCoderConfig fields plus `d_in`) and
`sae.safetensors` with `encoder.weight` (n, d), `encoder.bias` (n,), `W_dec` (n, d) and `b_dec`
(d,). Its SAE is TopK: `top_k(relu(encoder(x - b_dec)))`, `x_hat = acts @ W_dec[idx] + b_dec`,
which is saelab's topk with the same weights in the same orientation (saelab takes the top k of
pre and keeps relu of it: the same dense code). saelab's own dictionaries use the same two file
names, so the format is told by cfg.json's content: saelab's names `n_latents`, SAELens's
`d_sae`, sparsify's `num_latents` / `expansion_factor` beside `d_in`.

sparsify -> saelab (`import_sparsify`): topk with k; n = num_latents, or d_in * expansion_factor
when num_latents is 0 (sparsify's rule). Refused with a one-line reason: groupmax activation,
signed (no relu) SAEs of early versions, autoencoders with a skip connection. The hook comes
from the directory's name, which sparsify sets to the hookpoint, a module path of the Hugging
Face model: `layers.N` / `h.N` (a block's output) maps to `blocks.N.hook_resid_post`, `….mlp` to
`blocks.N.hook_mlp_out`, `….attn` / `self_attn` / `attention` to `blocks.N.hook_attn_out`; for
other names the hook is left unset. sparsify hooks the Hugging Face model itself, so an import
is recorded as trained on "raw" activations (`SAEConfig.processing`): it runs on
`load_model(spec, processing="raw")`, and splicing it into a folded model (saelab's default,
whose residual stream is the raw one minus its per-token mean) is refused
(tests/formats/test_sparsify_peer.py checks both facts against sparsify on the zoo model).

Transcoders (`transcode`, with or without `skip_connection`), both ways: sparsify's transcoder at
hookpoint P reads P's module input and predicts its output, with no b_dec on the input and
`sae_out += x @ W_skip.T`, which is saelab's transcoder with the same weights (W_skip (d, d));
its d_out is d_in. On import, `layers.N` / `h.N` (a block) reads blocks.N.hook_resid_pre and
replaces blocks.N.hook_resid_post; `….mlp` reads blocks.N.mlp.hook_in (the MLP module's input,
after ln_2's weight and bias: a transformer-lens 4.x hook; 3.x has no hook there, and its
ln2.hook_normalized lacks that affine map) and replaces blocks.N.hook_mlp_out. A transcoder at
any other hookpoint is refused (saelab could not tell which hooks it joins). Only TopK
transcoders of raw activations with d_out = d_in between one of those two hook pairs export.

saelab -> sparsify (`export_sparsify`): topk and gradient_topk (plain topk at inference) only;
the other allocators are not TopK and have no sparsify form (export them as SAELens). Only
dictionaries trained on raw activations export: sparsify runs them on the Hugging Face model's
own activations, and a folded dictionary would read uncentred inputs there with no warning
(no exact adaptation exists: its encoder could absorb the centring, but its reconstructions
would still lack each token's mean); train with `--processing raw` to export to sparsify. saelab's own config
rides along in cfg.json under "saelab" (sparsify drops unknown fields when loading), so
importing the export gives back the same dictionary.

A run directory (`sparsify` and multi-hook `saelab train` both write one) has no cfg.json and one
dictionary subdirectory per hook; `load_run` loads each (in any format `saelab.load` reads) and
returns {hook: SAE}, keyed by saelab hook name (by subdirectory name where a dictionary has no
hook or two share one). Subdirectories without a cfg.json (sparsify's `best/`, logs) are
skipped; a multi-seed sparsify run nests seeds one level down, so load `run/HOOKPOINT`, which is
itself a run directory ({seed name: SAE}).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from saelab import __version__, allocators
from saelab.errors import SaelabError
from saelab.models import DEFAULT_PROCESSING
from saelab.sae import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig
from saelab.storage.files import check_output_dir, read_safetensors, write_json, write_safetensors


def exportable() -> tuple[str, ...]:
    """Allocators with a sparsify form: per-token top-k at inference (`Allocator.inference_topk`)."""
    return tuple(name for name, kind in allocators.REGISTRY.items() if kind.inference_topk)


# sparsify hookpoint (a module path of the HF base model) -> saelab hook name
_HOOKPOINT = re.compile(r"^(?:h|layers)\.(\d+)(?:\.(mlp|attn|self_attn|attention))?$")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)$")
_SITE = {None: "resid_post", "mlp": "mlp_out", "attn": "attn_out", "self_attn": "attn_out",
         "attention": "attn_out"}
# a transcoder's hookpoint module -> the hooks of its input and its output (module docstring)
_TRANSCODER_SITES = {None: ("hook_resid_pre", "hook_resid_post"), "mlp": ("mlp.hook_in", "hook_mlp_out")}


def _read_cfg(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_sparsify_dir(path: str | Path) -> bool:
    """cfg.json names d_in and num_latents or expansion_factor, and neither saelab's nor SAELens's size."""
    cfg = _read_cfg(Path(path))
    return (cfg is not None and "d_in" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg)
            and "n_latents" not in cfg and "d_sae" not in cfg)


def _dictionary_subdirs(path: Path) -> list[Path]:
    if not path.is_dir() or (path / CONFIG_FILE).exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


def is_run_dir(path: str | Path) -> bool:
    """No cfg.json of its own, and at least one subdirectory with one."""
    return bool(_dictionary_subdirs(Path(path)))


def recognises(path: str | Path) -> bool:
    """Whether `load` reads `path`: a sparsify dictionary or a run directory."""
    return is_sparsify_dir(path) or is_run_dir(path)


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> SAE | dict[str, SAE]:
    """A sparsify dictionary as an SAE, or a run directory as {hook: SAE} (eval() mode)."""
    return (import_sparsify if is_sparsify_dir(path) else load_run)(path, device, dtype)


def hook_from_hookpoint(name: str) -> str | None:
    """saelab (TransformerLens) hook name of a sparsify hookpoint; None for other names."""
    m = _HOOKPOINT.match(name)
    return f"blocks.{m[1]}.hook_{_SITE[m[2]]}" if m else None


def transcoder_hooks_from_hookpoint(name: str) -> tuple[str, str] | None:
    """(input hook, target hook) of a sparsify transcoder at hookpoint `name`; None where saelab
    cannot tell (module docstring)."""
    m = _HOOKPOINT.match(name)
    if not m or m[2] not in _TRANSCODER_SITES:
        return None
    return tuple(f"blocks.{m[1]}.{site}" for site in _TRANSCODER_SITES[m[2]])  # type: ignore[return-value]


def _sparsify_pair(hook: str | None, target: str | None) -> bool:
    """(hook, target) is what a sparsify transcoder at some hookpoint reads and replaces."""
    m = re.match(r"^blocks\.(\d+)\.", hook or "")
    return m is not None and any((hook, target) == tuple(f"blocks.{m[1]}.{site}" for site in sites)
                                 for sites in _TRANSCODER_SITES.values())


def hookpoint_from_hook(hook: str) -> str:
    """The sparsify hookpoint (`layers.N[.mlp|.self_attn]`) of a saelab hook name, for run layouts."""
    m = _HOOK.match(hook)
    if not m:
        return hook
    return f"layers.{m[1]}" + {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}[m[2]]


def import_sparsify(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> SAE:
    """Read a sparsify dictionary directory into a saelab topk SAE, in eval() mode (mapping:
    module docstring). `dtype` casts the weights (default: as stored)."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not w_path.is_file():
        raise SaelabError(f"no sparsify dictionary at {path}: {WEIGHTS_FILE} is missing")
    cfg = _read_cfg(path)
    if cfg is None or not is_sparsify_dir(path):
        raise SaelabError(f"{cfg_path} is not a sparsify config (expected d_in, k and num_latents)")
    if cfg.get("signed"):
        raise SaelabError(f"{path}: cannot import this sparsify dictionary: it is signed (no relu), "
                          "which saelab SAEs have no form for")
    if cfg.get("skip_connection") and not cfg.get("transcode"):
        raise SaelabError(f"{path}: cannot import this sparsify dictionary: an autoencoder with a skip "
                          "connection, which saelab has no form for (its transcoders have one)")
    if cfg.get("activation", "topk") != "topk":
        raise SaelabError(f"{path}: sparsify activation {cfg['activation']!r} is not supported; "
                          "saelab imports topk")
    try:
        d_in, k = int(cfg["d_in"]), int(cfg.get("k", 32))  # 32: sparsify's default k
        n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    except (TypeError, ValueError) as e:
        raise SaelabError(f"{cfg_path} has a non-integer size ({e})") from None
    recorded = cfg.get("saelab")
    saved: dict = recorded if isinstance(recorded, dict) else {}
    allocator = saved.get("allocator") if saved.get("allocator") in exportable() else "topk"
    hookpoint = path.name if not re.fullmatch(r"seed\d+", path.name) else path.parent.name
    hooks = {"hook": saved.get("hook") or hook_from_hookpoint(hookpoint)}
    skip = bool(cfg.get("skip_connection"))
    if cfg.get("transcode"):
        pair = transcoder_hooks_from_hookpoint(hookpoint)
        if saved.get("target_hook"):
            hook = saved.get("hook") or (pair[0] if pair else None)
            pair = (hook, saved["target_hook"]) if hook else None
        if pair is None:
            raise SaelabError(f"{path}: a sparsify transcoder at hookpoint {hookpoint!r}, whose hooks saelab "
                              "cannot tell; it imports transcoders at layers.N and layers.N.mlp")
        hooks = {"hook": pair[0], "target_hook": pair[1], "d_out": d_in, "skip": skip}
    # sparsify trains on the raw model; a saelab export records its own (absent: written before
    # saelab recorded it, when every dictionary was folded)
    processing = saved.get("processing", DEFAULT_PROCESSING) if saved else "raw"
    sae_cfg = SAEConfig.from_dict({**saved, "d_in": d_in, "n_latents": n, "k": k, "allocator": allocator,
                                   **hooks, "processing": processing})

    state, _ = read_safetensors(w_path, what="sparsify dictionary", device=str(device))
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    expected |= {"W_skip": (d_in, d_in)} if skip else {}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise SaelabError(f"{w_path} holds {found}, but {cfg_path} implies {expected}")
    renames = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}
    return SAE.from_state(sae_cfg, {renames.get(k, k): t for k, t in state.items()}, str(w_path), dtype)


def export_sparsify(sae: SAE, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `sae` as a sparsify dictionary directory (loadable by `SparseCoder.load_from_disk`).

    For a sparsify run layout, export each hook into `RUN/<hookpoint>` (`hookpoint_from_hook`).
    An existing non-empty `out_dir` is only replaced with `overwrite`.
    """
    cfg = sae.cfg
    if not cfg.kind.inference_topk:
        raise SaelabError(f"a {cfg.allocator} dictionary is not TopK and has no sparsify form; "
                          "export it with --format saelens")
    if cfg.processing != "raw":
        raise SaelabError(f"this dictionary was trained on {cfg.processing} activations, but sparsify "
                          "runs dictionaries on the Hugging Face model's raw ones; train it with "
                          "--processing raw to export to sparsify, or export it with --format saelens")
    if cfg.transcoder and not _sparsify_pair(cfg.hook, cfg.target_hook):  # its hookpoint's in and out
        raise SaelabError(f"sparsify runs a transcoder on one module's input and output, and "
                          f"{cfg.hook} -> {cfg.target_hook} is no such pair (blocks.N.mlp.hook_in -> "
                          "blocks.N.hook_mlp_out or blocks.N.hook_resid_pre -> blocks.N.hook_resid_post); "
                          "export it with --format saelab")
    if cfg.out_dim != cfg.d_in:
        raise SaelabError(f"this transcoder maps width {cfg.d_in} to {cfg.out_dim}, but sparsify's "
                          "transcoders keep the width; export it with --format saelab")
    out = check_output_dir(Path(out_dir), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc,
                                        "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    write_safetensors(out / WEIGHTS_FILE, tensors | ({"W_skip": sae.W_skip} if cfg.skip else {}))
    write_json(out / CONFIG_FILE, {  # after the weights, like `SAE.save`
        "activation": "topk", "expansion_factor": max(1, cfg.n_latents // cfg.d_in),
        "normalize_decoder": True, "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False,
        "skip_connection": cfg.skip, "transcode": cfg.transcoder, "d_in": cfg.d_in,
        "exported_by": f"saelab {__version__}", "saelab": dataclasses.asdict(cfg),
    })
    return out


def load_run(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, SAE]:
    """{hook: SAE} for every dictionary subdirectory of a run directory (module docstring)."""
    from saelab.formats import open_dictionary

    subs = _dictionary_subdirs(Path(path))
    saes = []
    for sub in subs:
        sae = open_dictionary(sub, device=device, dtype=dtype)
        if not isinstance(sae, SAE):
            raise SaelabError(f"{sub} is itself a run directory; a run directory holds dictionaries")
        saes.append(sae)
    hooks = [sae.cfg.hook or "" for sae in saes]
    if "" in hooks or len(set(hooks)) < len(hooks):
        hooks = [sub.name for sub in subs]
    return dict(zip(hooks, saes, strict=True))


__all__ = ["export_sparsify", "hook_from_hookpoint", "hookpoint_from_hook", "import_sparsify",
           "is_run_dir", "is_sparsify_dir", "load", "load_run", "recognises",
           "transcoder_hooks_from_hookpoint"]
