"""SAELens interop: read and write SAELens's on-disk dictionaries (the sae-lens >= 6 layout).

A SAELens directory holds `cfg.json` and `sae_weights.safetensors`: W_enc (d_in, d_sae), W_dec
(d_sae, d_in), b_enc, b_dec, and for JumpReLU a per-latent `threshold`. Its maths is saelab's with
W_enc transposed: `pre = (x - b_dec) @ W_enc + b_enc`, `x_hat = z @ W_dec + b_dec`.

saelab -> SAELens (`export_saelens`):
- topk -> "topk" with k.
- relu -> "standard" (ReLU; SAELens trains it with the same L1 penalty on activation times
  decoder-row norm).
- jumprelu -> "jumprelu" with its thresholds.
- gradient_topk -> "topk": at inference it is plain topk; its gradient-steered selection is a
  training rule SAELens has no form for.
- mutual_choice -> "jumprelu" with saelab's thresholds and metadata training_architecture
  "batchtopk" with k, which is how SAELens saves its own BatchTopK SAEs ("batchtopk" is a
  training-only class there, not loadable by `SAE.load_from_disk`). SAELens's JumpReLU keeps
  relu(pre) where pre > threshold, exactly saelab's threshold mode, so inference is identical.
- feature_choice -> "jumprelu" likewise; its batch-mode allocation has no SAELens equivalent.
- matryoshka -> "jumprelu" with its thresholds and training_architecture "matryoshka_batchtopk"
  with k and matryoshka_widths, as SAELens saves its own Matryoshka BatchTopK SAEs.
- jumprelu trained by saelab -> "jumprelu" with its thresholds (SAELens's inference form).
saelab's own config rides along in metadata["saelab"], so importing the export gives back the
same allocator and settings. The model processing the dictionary was trained on
(`SAEConfig.processing`) is written as SAELens records it, metadata["model_from_pretrained_kwargs"],
which SAELens passes to HookedTransformer.from_pretrained_no_processing (all flags False) when it
loads the model for a dictionary: {} for raw, center_writing_weights True for centred, and
fold_ln, center_writing_weights, center_unembed and fold_value_biases True for folded.

SAELens -> saelab (`import_saelens`):
- "topk" -> topk.
- "standard" -> relu (k = 0: no budget).
- "batchtopk" (a SAELens training checkpoint) -> mutual_choice, its scalar topk_threshold (an EMA
  of the smallest selected activation) as every latent's threshold, as SAELens's own conversion
  to JumpReLU does; never a per-token topk, which would be a different dictionary.
- "jumprelu" whose metadata records a batch budget k (SAELens BatchTopK or Matryoshka BatchTopK,
  or a saelab export) -> mutual_choice (or the saelab allocator recorded, e.g. matryoshka with
  its widths), thresholds kept; a SAELens-trained Matryoshka reads as mutual_choice, which
  encodes exactly as it does (its prefixes only shaped training).
- a pre-6.0 cfg.json (no sae_lens_version >= 6) is first read as SAELens 6 reads it: no
  architecture means "standard", activation_fn "topk" with a k means "topk", `hook_point` is the
  hook name; an all-ones `scaling_factor` is dropped (a fine-tuned one is refused, as in SAELens 6).
- "jumprelu" trained as such (Gemma Scope-style, no k) -> jumprelu with its thresholds; an old
  checkpoint's `log_threshold` is exponentiated, as SAELens does when loading it. SAELens's
  inference JumpReLU keeps relu(pre) where pre > threshold, and so does saelab, also for a
  negative threshold (SAELens's training class keeps pre there, without the relu).
- processing, from `model_from_pretrained_kwargs` (metadata, or top level before 6.0) over
  from_pretrained_no_processing's defaults (all False), as SAELens 6 loads the model: fold_ln,
  center_writing_weights and fold_value_biases all True -> folded; only center_writing_weights
  -> centred; none (also when absent, and SAELens's trainer's default
  {"center_writing_weights": false}) -> raw; a model_class_name of AutoModelForCausalLM -> raw.
  center_unembed changes no activation and is ignored; other combinations are refused (saelab
  has no model that gives their activations). SAELens's registry can add kwargs when it loads a
  release by name (gpt2-small-res-jb: center_writing_weights); a directory read here has only
  what its cfg.json says.
Transcoders, both ways: SAELens has ReLU and JumpReLU transcoders, with and without skip
("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"): d_out, no
b_dec on the input (apply_b_dec_to_input false), W_dec (d_sae, d_out), W_skip (d_out, d_in), the
target in metadata["hook_name_out"]. A saelab relu transcoder exports as the first pair, a
jumprelu, mutual_choice or feature_choice one as the JumpReLU pair (thresholds, as for SAEs);
SAELens has no TopK transcoder, so topk and gradient_topk transcoders are refused (export them
as saelab, or as sparsify). Importing maps them back (a JumpReLU transcoder whose metadata
records a batch budget k -> mutual_choice, as for SAEs); one without hook_name_out is refused,
since saelab could not tell what it replaces.
Other architectures (gated, matching pursuit, ...) and normalize_activations other than "none"
are refused.
rescale_acts_by_decoder_norm is folded into the weights (as SAELens's fold_W_dec_norm does) and
apply_b_dec_to_input=False into b_enc; both give the same codes and reconstructions (up to
float rounding). Weights load as float32, like `SAE.load`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from saelab import __version__
from saelab.errors import SaelabError
from saelab.models import DEFAULT_PROCESSING, PROCESSINGS
from saelab.sae import CONFIG_FILE, SAE, SAEConfig
from saelab.storage.files import check_output_dir, read_safetensors, write_json, write_safetensors

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"  # the cfg.json layout written here is SAELens >= 6.0's
# which saelab allocators each SAELens architecture can stand for; the first is the default
ARCHITECTURES = {"topk": ("topk", "gradient_topk"), "batchtopk": ("mutual_choice",),
                 "jumprelu": ("jumprelu", "mutual_choice", "feature_choice", "matryoshka"),
                 "standard": ("relu",)}
# SAELens's transcoder architectures: (the SAE architecture whose selection it uses, skip)
TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def _transcoder_architecture(cfg: SAEConfig) -> str:
    """The SAELens architecture of a saelab transcoder (module docstring), or a one-line refusal."""
    arch = cfg.kind.saelens_architecture
    for name, (base, skip) in TRANSCODERS.items():
        if (base, skip) == (arch, cfg.skip):
            return name
    raise SaelabError(f"SAELens has no {cfg.allocator} transcoder (its transcoders are ReLU or "
                      "JumpReLU); export this one with --format saelab, or --format sparsify (TopK)")


def export_saelens(sae: SAE, out_dir: str | Path, context_size: int | None = None,
                   overwrite: bool = False) -> Path:
    """Write `sae` as a SAELens dictionary directory (architecture mapping: module docstring).

    `context_size` (tokens per training row) is recorded in the metadata for SAELens's evals.
    An existing non-empty `out_dir` is only replaced with `overwrite`.
    """
    cfg = sae.cfg
    if cfg.has_thresholds and torch.isnan(sae.threshold).any():
        raise SaelabError(f"this {cfg.allocator} SAE has no inference thresholds yet; train it first")
    arch = _transcoder_architecture(cfg) if cfg.transcoder else cfg.kind.saelens_architecture
    out = check_output_dir(Path(out_dir), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": SAELENS_FORMAT,
        "model_name": cfg.model, "hook_name": cfg.hook, "hook_head_index": None,
        "prepend_bos": True, "context_size": context_size, "exported_by": f"saelab {__version__}",
        "model_from_pretrained_kwargs": {k: v for k, v in PROCESSINGS[cfg.processing].items() if v},
        "saelab": dataclasses.asdict(cfg),
    }
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    extra: dict = {}
    if cfg.transcoder:
        metadata["hook_name_out"], extra["d_out"] = cfg.target_hook, cfg.out_dim
    if cfg.skip:
        tensors["W_skip"] = sae.W_skip
    if cfg.has_thresholds:
        tensors["threshold"] = sae.threshold
    if cfg.kind.saelens_training_architecture:
        metadata |= {"training_architecture": cfg.kind.saelens_training_architecture,
                     "training_architecture_details": cfg.kind.saelens_details(sae)}
    if arch == "topk":
        extra |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    write_safetensors(out / SAELENS_WEIGHTS_FILE, tensors)  # weights first, like `SAE.save`
    write_json(out / CONFIG_FILE, {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, **extra,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcoder, "normalize_activations": "none",
        "reshape_activations": "hook_z" if (cfg.hook or "").endswith("hook_z") else "none",
        "metadata": metadata,
    })
    return out


def is_saelens_dir(path: str | Path) -> bool:
    """A SAELens directory has its weights file, or a cfg.json speaking of d_sae (not n_latents)."""
    path = Path(path)
    if (path / SAELENS_WEIGHTS_FILE).is_file():
        return True
    try:
        return "d_sae" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def _upgrade_pre_6(lens: dict) -> dict:
    """A cfg.json written before SAELens 6.0 in the 6.0 layout, as SAELens converts it itself:
    `hook_point` -> hook_name, no architecture -> "standard", activation_fn "topk" with a k ->
    "topk", a boolean normalize_activations -> "none" / "expected_average_only_in"."""
    version = lens.get("sae_lens_version") or (lens.get("metadata") or {}).get("sae_lens_version")
    try:
        if version and int(str(version).split(".")[0]) >= 6:
            return lens
    except ValueError:
        return lens  # an unreadable version: leave the config as written
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    lens = {renames.get(key, key): value for key, value in lens.items()}
    lens.setdefault("architecture", "standard")
    top_k = (lens.get("activation_fn_kwargs") or {}).get("k")
    if lens.get("activation_fn") == "topk" and top_k is not None:
        lens["architecture"], lens["k"] = "topk", top_k
    norm = lens.get("normalize_activations")
    if norm is None or isinstance(norm, bool):
        lens["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return lens


def _processing(lens: dict, meta: dict, saved: dict, path: Path) -> str:
    """The model processing a SAELens dictionary was trained on (module docstring)."""
    if saved:  # a saelab export; without the field it predates it, when saelab only folded
        return saved.get("processing", DEFAULT_PROCESSING)
    if (meta.get("model_class_name") or lens.get("model_class_name")) == "AutoModelForCausalLM":
        return "raw"
    kwargs = meta.get("model_from_pretrained_kwargs", lens.get("model_from_pretrained_kwargs")) or {}
    if not isinstance(kwargs, dict):
        raise SaelabError(f"{path}: model_from_pretrained_kwargs must be a JSON object, got {kwargs!r}")
    flags = ("fold_ln", "center_writing_weights", "fold_value_biases")
    for name, tl in PROCESSINGS.items():
        if all(bool(kwargs.get(f, False)) == tl[f] for f in flags):
            return name
    raise SaelabError(
        f"{path}: trained on a model loaded with {kwargs}, whose activations saelab cannot give "
        f"(it loads {', '.join(PROCESSINGS)} models: {', '.join(flags)} all True, only "
        "center_writing_weights True, or none)")


def import_saelens(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Read a SAELens dictionary directory into a saelab SAE (mapping: module docstring)."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / SAELENS_WEIGHTS_FILE
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise SaelabError(f"no SAELens dictionary at {path}: {f.name} is missing")
    try:
        lens = _upgrade_pre_6(json.loads(cfg_path.read_text()))
        d_in, d_sae, arch = int(lens["d_in"]), int(lens["d_sae"]), lens["architecture"]
        arch, skip = TRANSCODERS.get(arch, (arch, None))  # skip is None for an SAE
        d_out = d_in if skip is None else int(lens["d_out"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise SaelabError(f"{cfg_path} is not a SAELens config ({type(e).__name__}: {e})") from None
    if arch not in ARCHITECTURES:
        raise SaelabError(
            f"{path}: SAELens architecture {arch!r} has no saelab equivalent; "
            f"saelab imports {', '.join(ARCHITECTURES)} and {', '.join(TRANSCODERS)}"
        )
    if lens.get("normalize_activations", "none") != "none":
        raise SaelabError(
            f"{path}: normalize_activations={lens['normalize_activations']!r} is not supported; "
            "saelab reads unnormalised activations"
        )
    meta = lens.get("metadata") or {}
    saved = meta.get("saelab") or {}
    target = meta.get("hook_name_out", lens.get("hook_name_out"))
    if skip is not None and not target:
        raise SaelabError(f"{path}: this SAELens transcoder names no hook_name_out (the hook it "
                          "replaces); add it to cfg.json's metadata to import it")
    k = lens.get("k", 0)
    if arch == "jumprelu":  # SAELens keeps a BatchTopK's k in the metadata of its JumpReLU form
        k = saved.get("k", (meta.get("training_architecture_details") or {}).get("k")) or 0
    if not isinstance(k, (int, float)) or k != int(k):
        raise SaelabError(f"{path}: k={k!r} must be a whole number for saelab")
    choices = ARCHITECTURES[arch]
    # a JumpReLU with a batch budget k stands for a batch allocator; without one it is itself
    default = choices[1] if arch == "jumprelu" and k else choices[0]
    allocator = saved.get("allocator") if saved.get("allocator") in choices else default
    cfg = SAEConfig.from_dict({
        **saved, "d_in": d_in, "n_latents": d_sae, "k": int(k), "allocator": allocator,
        "hook": meta.get("hook_name", lens.get("hook_name")),
        **({} if skip is None else {"target_hook": target, "d_out": d_out, "skip": skip}),
        "model": meta.get("model_name", lens.get("model_name")),
        "processing": _processing(lens, meta, saved, path),
    })

    state, _ = read_safetensors(w_path)
    if arch == "jumprelu" and "log_threshold" in state:  # older SAELens checkpoints
        state["threshold"] = state.pop("log_threshold").double().exp()
    scale = state.pop("scaling_factor", None)  # pre-6.0 saves; all ones unless fine-tuned
    if scale is not None and not torch.all(scale == 1):
        raise SaelabError(f"{w_path}: a fine-tuned scaling_factor is not supported (SAELens >= 6 "
                          "dropped it too); only all-ones scaling factors import")
    expected: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,),
                                            "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        expected["W_skip"] = (d_out, d_in)
    extra: dict[str, dict[str, tuple[int, ...]]] = {"jumprelu": {"threshold": (d_sae,)},
                                                     "batchtopk": {"topk_threshold": ()}}
    expected |= extra.get(arch, {})
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise SaelabError(f"{w_path} holds {found}, but {cfg_path} implies {expected}")
    state = {name: t.double() for name, t in state.items()}  # fold in float64, store float32
    if lens.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre by ||W_dec_j|| and divides codes by it: the same as unit decoder rows
        norm = state["W_dec"].norm(dim=1).clamp_min(1e-8)
        state["W_enc"], state["b_enc"], state["W_dec"] = (
            state["W_enc"] * norm, state["b_enc"] * norm, state["W_dec"] / norm[:, None])
    if skip is None and not lens.get("apply_b_dec_to_input", True):  # transcoders never apply it
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]  # x @ W == (x - b) @ W + b @ W

    state["W_enc"] = state["W_enc"].T  # saelab keeps a row per latent
    if arch == "batchtopk":
        state["threshold"] = state.pop("topk_threshold").expand(d_sae)
    sae = SAE(cfg, device=device)
    sae.load_state_dict(state)  # copies into saelab's float32 parameters
    return sae


__all__ = ["export_saelens", "import_saelens", "is_saelens_dir"]
