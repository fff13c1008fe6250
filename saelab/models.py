"""Hooked models: one adapter over transformer-lens 4.x (TransformerBridge) and 3.x (HookedTransformer).

Everything else in saelab speaks classic hook names (`blocks.3.hook_resid_post`,
`blocks.2.attn.hook_z`, `blocks.1.mlp.hook_post`) and calls `HookedModel.activations`; which
transformer-lens line is installed only matters here.

Weight processing (`PROCESSINGS`) decides what the hooks read, and both lines apply it alike:
- "folded" (the default, HookedTransformer.from_pretrained's): LayerNorm weights folded into
  the next layer, writing weights centred (embeddings, attention and MLP outputs), value biases
  folded into the output bias. The residual stream and every output that writes to it (resid_*,
  attn_out, mlp_out, attn.hook_result) are the Hugging Face model's minus their per-token mean;
  attn.hook_z lacks the value bias; mlp.hook_pre/hook_post are unchanged.
- "centred": writing weights centred only (SAELens's `center_writing_weights: true`, e.g. its
  gpt2-small-res-jb release): the residual stream, attn_out and mlp_out are folded's (centred),
  attn.hook_z is raw's.
- "raw": no processing (from_pretrained_no_processing, SAELens's trainer's model, sparsify's
  hooks): every hook reads the Hugging Face model's own activations, e.g.
  `blocks.L.hook_resid_post` is `hidden_states[L + 1]`.
Logits differ between them by a per-token constant at most, so losses do not. A dictionary
records the processing it was trained on (`SAEConfig.processing`); splicing it into, or
encoding it on, a model of another processing is an error naming the fix.

Model specs (`saelab.data.specs`): `zoo:NAME` (shipped with saelab), a local Hugging Face directory,
or `hf:NAME` on the hub.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from saelab.data.specs import ZOO, hub_name
from saelab.errors import SaelabError, first_line
from saelab.zoo import DEFAULT_MODEL

if TYPE_CHECKING:
    from saelab.sae import SparseCode

TL_VERSION = version("transformer-lens")
Splice = Callable[[torch.Tensor], torch.Tensor]  # an SAE, or any function of the activation
DEFAULT_CONTEXT = 128
TL_MAJOR = int(TL_VERSION.split(".")[0])
DEFAULT_PROCESSING = "folded"
# processing name -> transformer-lens weight-processing flags (module docstring)
PROCESSINGS = {
    "folded": {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
               "fold_value_biases": True},
    "centred": {"fold_ln": False, "center_writing_weights": True, "center_unembed": False,
                "fold_value_biases": False},
    "raw": {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
            "fold_value_biases": False},
}


# the hooks of a transformer-lens block in the order a forward pass reaches them
_BLOCK_ORDER = ("hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "hook_q_input",
                "hook_k_input", "hook_v_input", "hook_attn_in", "attn.hook_q", "attn.hook_k",
                "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores",
                "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out",
                "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "hook_mlp_in",
                "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def hook_position(hook: str) -> tuple[float, int] | None:
    """Where a forward pass reaches `hook`: (block, place in the block); the embeddings come
    before block 0 and the final LayerNorm after every block. None for a name not listed."""
    if hook in ("hook_embed", "hook_pos_embed"):
        return (-1, 0)
    if hook.startswith("ln_final."):
        return (float("inf"), 0)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m is None or m[2] not in _BLOCK_ORDER:
        return None
    return (int(m[1]), _BLOCK_ORDER.index(m[2]))


def check_hook_order(hook: str, target: str) -> None:
    """A transcoder reads `hook` and replaces `target` in the same forward pass, so `target`
    must come after `hook` (checked for transformer-lens's standard names; for others, splicing
    refuses a target reached before its input)."""
    at, to = hook_position(hook), hook_position(target)
    if hook == target or (at is not None and to is not None and to <= at):
        raise SaelabError(
            f"target hook {target!r} does not come after input hook {hook!r}; a transcoder "
            "reconstructs a later hook from an earlier one, e.g. --hook blocks.1.ln2.hook_normalized "
            "--target-hook blocks.1.hook_mlp_out")


def check_processing(processing: str) -> str:
    """`processing` if saelab can load a model that way, else a one-line error."""
    if not isinstance(processing, str) or processing not in PROCESSINGS:
        raise SaelabError(f"unknown activation processing {processing!r}; use one of "
                          f"{', '.join(PROCESSINGS)}")
    return processing


def resolve_spec(spec: str) -> str:
    """What transformers should load for a model spec: a local directory or a hub name.

    Checked before any loading: a bare name that is no local directory fails at once."""
    repo = hub_name(spec)
    if repo is not None:
        return repo
    if spec.startswith(ZOO):
        from saelab.zoo import model_dir

        return str(model_dir(spec))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SaelabError(
            f"{spec!r} is not a Hugging Face model directory: no such directory; for the Hugging "
            f"Face hub write hf:{spec}, for a shipped model zoo:NAME (`saelab zoo list`)"
        )
    if not (path / "config.json").exists():
        raise SaelabError(f"{spec} is not a Hugging Face model directory (it has no config.json)")
    return str(path)


# the files in which transformers looks for `auto_map`, the pointer to code shipped with a model
CODE_POINTERS = ("config.json", "tokenizer_config.json", "processor_config.json",
                 "preprocessor_config.json")


def check_no_custom_code(path: Path, what: str | None = None) -> None:
    """A model whose configs point to its own Python (`auto_map`) is refused: saelab never runs
    code shipped with a model. Checked up front, and passing trust_remote_code=False is the
    second line (transformer-lens 3.x forces it to True for some hub names)."""
    for name in CODE_POINTERS:
        try:
            auto_map = json.loads((path / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: transformers reports an unreadable config itself
        if auto_map:
            targets = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            code = sorted({str(t) for v in targets for t in (v if isinstance(v, list) else [v]) if t})
            raise SaelabError(
                f"{what or path} ships custom code (auto_map in {name}: {', '.join(code)}); saelab "
                "never runs code shipped with a model: use one whose architecture transformers has "
                "built in"
            )


def _load_hf(spec: str, device: str, dtype: torch.dtype):
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from saelab.formats import hub

    hf_logging.disable_progress_bar()  # saelab shows its own progress; a load bar is noise
    name, from_hub = resolve_spec(spec), hub_name(spec) is not None
    if not from_hub:
        check_no_custom_code(Path(name))
    offline = hub.unreachable() if from_hub else None  # then only the local cache, no retries
    safe = {"trust_remote_code": False, "local_files_only": offline is not None}
    try:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager", **safe)
        tokenizer = AutoTokenizer.from_pretrained(name, **safe)
    except (OSError, ValueError) as e:  # ValueError: custom code refused, unknown model_type
        if not from_hub:
            raise SaelabError(f"could not load model directory {name}: {first_line(e)}") from None
        if offline:
            raise SaelabError(
                f"could not load model {spec!r}: {offline}, and it is not in the local cache; "
                f"download it elsewhere and pass its local directory, or use a zoo model such as "
                f"{DEFAULT_MODEL}"
            ) from None
        raise SaelabError(
            f"could not load model {spec!r} from the Hugging Face hub: {first_line(e)}"
        ) from None
    if from_hub:  # its files are in the cache now; transformers may have ignored an auto_map
        config = try_to_load_from_cache(name, "config.json")
        if isinstance(config, str):
            check_no_custom_code(Path(config).parent, f"model {spec!r}")
    # transformers decorates PreTrainedModel.to with functools.wraps, whose stub leaves it unbound
    return name, hf.to(device).eval(), tokenizer  # type: ignore[arg-type]


def _load_tl4(name: str, hf, tokenizer, device: str, processing: str):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=device,
                                                  trust_remote_code=False)
    flags = PROCESSINGS[processing]
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not any(flags.values()),
                                     **flags)
    return bridge


def _load_tl3(name: str, hf, tokenizer, device: str, processing: str):
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    flags = PROCESSINGS[processing]
    cfg = loading.get_pretrained_model_config(name, device=device, fold_ln=flags["fold_ln"],
                                              trust_remote_code=False)
    state = loading.get_pretrained_state_dict(name, cfg, hf_model=hf)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(state, **flags)
    return model.to(device).eval()


class TransformerLensModel(Protocol):
    """What saelab uses of a transformer-lens model: the surface TransformerBridge (4.x) and
    HookedTransformer (3.x) share. Only one line is installed at a time and their config and
    block classes differ, so `cfg` (n_layers, n_ctx, d_model, act_fn, ...) and `blocks` are Any."""

    @property
    def cfg(self) -> Any: ...
    @property
    def blocks(self) -> Any: ...
    @property
    def W_U(self) -> torch.Tensor: ...
    @property
    def W_O(self) -> torch.Tensor: ...
    @property
    def W_out(self) -> torch.Tensor: ...
    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...
    def hooks(self, *args: Any, **kwargs: Any) -> AbstractContextManager[Any]: ...
    def set_use_attn_result(self, use_attn_result: bool) -> None: ...
    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...


class _StopForward(Exception):
    """Raised from the last needed hook to skip the rest of the forward pass."""


def grad_key(hook: str) -> str:
    """Shard key of the loss gradient stored beside a hook's activations."""
    return f"{hook}:grad"


@dataclass
class HookedModel:
    """A loaded transformer with classic hook names, whichever transformer-lens runs it.

    Fields:
        spec: the model spec it was loaded from (recorded in caches and dictionaries).
        model: the transformer-lens model (TransformerBridge or HookedTransformer).
        tokenizer: its Hugging Face tokenizer.
        processing: its weight processing (`PROCESSINGS`), which dictionaries must match.
    """

    spec: str
    model: TransformerLensModel
    tokenizer: object
    processing: str = DEFAULT_PROCESSING

    @property
    def backend(self) -> str:
        kind = "TransformerBridge" if TL_MAJOR >= 4 else "HookedTransformer"
        return f"transformer-lens {TL_VERSION} ({kind})"

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def context_length(self) -> int:
        return self.model.cfg.n_ctx

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def default_hook(self) -> str:
        """The residual stream after the middle block: saelab's default place for an SAE."""
        return f"blocks.{self.n_layers // 2}.hook_resid_post"

    def check_context(self, context_length: int | None) -> int:
        """Rows of `context_length` tokens (default: min(model context, 128)), or a clear error."""
        if context_length is None:
            return min(self.context_length, DEFAULT_CONTEXT)
        if not 2 <= context_length <= self.context_length:
            raise SaelabError(
                f"context length {context_length} does not fit model {self.spec} "
                f"(2..{self.context_length} tokens)"
            )
        return context_length

    def check_dictionary(self, sae, hook: str | None = None) -> None:
        """Refuse, in one line naming the fix, a dictionary trained on activations of another
        processing than this model's (objects without a `cfg.processing`, such as plain
        functions, pass)."""
        trained = getattr(getattr(sae, "cfg", None), "processing", None)
        if trained is None or trained == self.processing:
            return
        where = hook or getattr(sae.cfg, "hook", None) or "its hook"
        raise SaelabError(
            f"the dictionary at {where} was trained on {trained} activations, but model {self.spec} "
            f"is loaded {self.processing}; load it with load_model({self.spec!r}, "
            f"processing={trained!r})"
        )

    @cached_property
    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def check_hooks(self, hooks: list[str]) -> None:
        for h in hooks:
            if h not in self.model.hook_dict:
                raise SaelabError(
                    f"unknown hook {h!r} for model {self.spec}; valid names look like "
                    f"blocks.0.hook_resid_post (blocks 0..{self.n_layers - 1}); "
                    f"`saelab info {self.spec}` lists them all"
                )
        if any(h.endswith("attn.hook_result") for h in hooks):
            self.model.set_use_attn_result(True)

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        """Width of each hook's activation (trailing dims flattened), from a one-token probe."""
        acts = self.activations(torch.tensor([[0, 0]], device=self.device), hooks)
        return {h: a.shape[-1] for h, a in acts.items()}

    def activations(
        self, tokens: torch.Tensor, hooks: list[str], with_grads: bool = False,
        loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Activations (B, T, d) at `hooks` for one batch, per-head dims flattened into d.

        With `with_grads`, also returns `"{hook}:grad"`: the gradient of the summed next-token
        loss (or of `loss(logits)`, a scalar, e.g. a circuit task's metric) with respect to
        each activation (what gradient-TopK needs).
        """
        self.check_hooks(hooks)
        acts: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def fn(x: torch.Tensor, hook) -> torch.Tensor:
                if with_grads:
                    x.retain_grad()
                    acts[name] = x
                    return x
                acts[name] = x.detach()
                if len(acts) == len(hooks):
                    raise _StopForward
                return x

            return fn

        fwd = [(h, capture(h)) for h in hooks]
        if with_grads:
            # weights are frozen, so make the embedding a leaf that needs grad: the graph then
            # reaches every later activation without computing any weight gradient
            fwd.insert(0, ("hook_embed", lambda x, hook: x.detach().requires_grad_(True)))
            with torch.enable_grad():
                logits = self.model.run_with_hooks(tokens, fwd_hooks=fwd, return_type="logits")
                value = loss(logits) if loss is not None else torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
                )
                value.backward()
            out = {h: a.detach().flatten(2) for h, a in acts.items()}
            for h, a in acts.items():
                # retain_grad() above, and every hooked activation lies on the loss's graph
                assert a.grad is not None, f"no loss gradient reached {h}"
                out[grad_key(h)] = a.grad.flatten(2)
            return out
        with torch.no_grad():
            try:
                self.model.run_with_hooks(tokens, fwd_hooks=fwd, return_type=None)
            except _StopForward:
                pass
        return {h: a.flatten(2) for h, a in acts.items()}


    @contextmanager
    def spliced(self, replace: Mapping[str, Splice], error_term: bool = False) -> Iterator[HookedModel]:
        """Within the block, every forward pass runs with each hook's activation replaced.

        `replace` maps hook names to SAEs or functions: either gets the activation as
        `activations` returns it, (B, T, d) with per-head dims flattened, and returns its
        replacement (an SAE: its reconstruction). With `error_term`, the SAE's error
        x - x_hat is added back as a constant: the forward pass is the clean one (to float
        rounding) while gradients flow through the SAE's latents, as attribution needs.

        A transcoder (keyed by its target hook or its input hook) replaces its target with its
        output computed from its input hook's activation in the same pass (after any splice at
        the input hook, so upstream replacements reach it); its error term is the target's.
        """
        inputs = {h: input_hook(h, fn) for h, fn in replace.items()}
        targets = {h: _target_hook(h, fn) for h, fn in replace.items()}
        self.check_hooks(list(inputs.values()) + list(targets.values()))
        for hook, fn in replace.items():
            self.check_dictionary(fn, hook)

        def splice(fn: Splice, source: dict[str, torch.Tensor] | None, name: str):
            def hook_fn(x: torch.Tensor, hook) -> torch.Tensor:
                flat = x.flatten(2)
                if source is not None and "x" not in source:
                    raise SaelabError(f"the transcoder's target {name} ran before its input hook; "
                                      "its target must come after its input")
                out = fn(flat if source is None else source.pop("x")).to(x.dtype)
                if error_term:
                    out = out + (flat - out).detach()
                return out.reshape(x.shape)

            return hook_fn

        def record(store: dict[str, torch.Tensor]):
            def hook_fn(x: torch.Tensor, hook) -> torch.Tensor:
                store["x"] = x.flatten(2)
                return x

            return hook_fn

        fwd, recorders = [], []
        for h, fn in replace.items():
            store: dict[str, torch.Tensor] | None = None
            if targets[h] != inputs[h]:
                store = {}
                recorders.append((inputs[h], record(store)))
            fwd.append((targets[h], splice(fn, store, targets[h])))
        with self.model.hooks(fwd_hooks=fwd + recorders):
            yield self

    def logits(self, tokens: torch.Tensor, replace: Mapping[str, Splice] | None = None,
               error_term: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) of one forward pass, spliced as `spliced(replace, error_term)`.

        A function that returns its input unchanged is a probe: that is how evals read an
        activation and score the same pass."""
        with self.spliced(replace or {}, error_term):
            return self.model(tokens, return_type="logits")

    def run_with_saes(self, tokens: torch.Tensor, saes: Mapping[str, Splice],
                      error_term: bool = False) -> torch.Tensor:
        """Logits with SAEs spliced in at their hooks (SAELens's name for `logits`)."""
        return self.logits(tokens, saes, error_term)

    @torch.no_grad()
    def latents(self, tokens: torch.Tensor, saes) -> SparseCode | dict[str, SparseCode]:
        """Latent activations per token: an SAE gives its `SparseCode` (B, T, k_max); a mapping
        {hook: SAE} gives one per hook. Activations are read from this forward pass, so
        inside `spliced(...)` a later hook sees the upstream reconstructions."""
        single = not isinstance(saes, Mapping)
        saes = {saes.cfg.hook: saes} if single else dict(saes)
        for hook, sae in saes.items():
            self.check_dictionary(sae, hook)
        reads = {h: input_hook(h, sae) for h, sae in saes.items()}  # a transcoder reads its input
        acts = self.activations(tokens, sorted(set(reads.values())))
        codes = {h: sae.encode(acts[reads[h]]) for h, sae in saes.items()}
        return next(iter(codes.values())) if single else codes


def _transcoder_hooks(key: str, fn) -> tuple[str, str] | None:
    """(input hook, target hook) of a transcoder given under `key`, None for anything else; a
    key that is neither of its hooks is refused."""
    cfg: Any = getattr(fn, "cfg", None)
    target = getattr(cfg, "target_hook", None)
    if target is None:
        return None
    if key not in (cfg.hook, target):
        raise SaelabError(f"a transcoder from {cfg.hook} to {target} was given for hook {key}; key it "
                          f"by its target {target} (which it replaces) or its input {cfg.hook}")
    return cfg.hook, target


def input_hook(key: str, fn) -> str:
    """The hook whose activation `fn` reads when given under `key`: a transcoder's input hook,
    else `key` itself."""
    hooks = _transcoder_hooks(key, fn)
    return key if hooks is None else hooks[0]


def _target_hook(key: str, fn) -> str:
    """The hook `fn` replaces when spliced under `key`: a transcoder's target, else `key`."""
    hooks = _transcoder_hooks(key, fn)
    return key if hooks is None else hooks[1]


def check_model_dir(path: Path) -> None:
    """A local directory given as a model must look like a Hugging Face causal LM saved with
    safetensors weights, else one clear line (an empty directory, a cache or dictionary
    directory, pickled `pytorch_model.bin` weights, which saelab never unpickles)."""
    config = path / "config.json"
    try:
        ok = isinstance(json.loads(config.read_text()).get("model_type"), str)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise SaelabError(f"{path} is not a Hugging Face model directory (no config.json with a "
                          "model_type); pass a model directory or zoo:NAME")
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (path / f).exists()]
        why = f"it holds only {pickled[0]} (pickle, which saelab does not load); convert it to safetensors" \
            if pickled else "no model.safetensors"
        raise SaelabError(f"model directory {path} has no safetensors weights: {why}")


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               processing: str = DEFAULT_PROCESSING) -> HookedModel:
    """Load a model spec (`zoo:NAME`, a local HF directory, or `hf:NAME`) with hooks.

    `processing`: "folded" (HookedTransformer's default), "centred" or "raw" (the
    Hugging Face model's own activations); what each changes: module docstring."""
    from saelab.checks import check_device

    check_device(device)
    check_processing(processing)
    if Path(spec).expanduser().is_dir():
        check_model_dir(Path(spec).expanduser())
    name, hf, tokenizer = _load_hf(spec, device, dtype)
    loader = _load_tl4 if TL_MAJOR >= 4 else _load_tl3
    model = loader(name, hf, tokenizer, device, processing)
    model.requires_grad_(False)
    return HookedModel(spec, model, tokenizer, processing)
