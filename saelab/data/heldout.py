"""Held-out text for a dictionary: the rows every eval reads, and the model, hook and data a
dictionary's cfg.json names (so `evaluate(path)` and the browser need nothing else)."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.data.activations import model_activations, positions_to_keep
from saelab.data.tokens import BUILTIN_STDLIB, TokenData
from saelab.errors import SaelabError
from saelab.formats import load_one
from saelab.models import DEFAULT_PROCESSING, HookedModel, load_model
from saelab.sae import SAE


def heldout_rows(tokenizer, data: TokenData, tokens: int) -> torch.Tensor:
    """The first whole rows of `data` holding at least `tokens` non-BOS/pad positions (R, T).

    Fewer when the split runs out: the report states the count actually used.
    """
    rows, kept = [], 0
    for row in data.rows(tokenizer, epochs=1):
        rows.append(row)
        kept += int(positions_to_keep(row, tokenizer).sum())
        if kept >= tokens:
            break
    if not rows:
        raise SaelabError(f"data {data.spec!r} has no rows in split {data.split!r}")
    return torch.stack(rows)


def resolve_dictionary(
    sae_or_path: SAE | str | Path, model: HookedModel | str | None, data: TokenData | str | None,
    context_length: int | None, device: str,
) -> tuple[SAE, str | None, HookedModel, TokenData]:
    """(sae, dictionary path or None, model, data) with the defaults filled in from cfg.json; a
    model spec loads with the dictionary's processing, a loaded model must have it."""
    path = None
    if isinstance(sae_or_path, (str, Path)):
        path = str(sae_or_path)
        sae_or_path = load_one(path, device)
    cfg = sae_or_path.cfg
    if cfg.hook is None:
        raise SaelabError("the SAE's cfg.json names no hook; set `hook` to the hook it was trained on")
    if model is None:
        if cfg.model is None:
            raise SaelabError("the SAE's cfg.json names no model; pass model= (a spec or a loaded model)")
        model = cfg.model
    if isinstance(model, str):  # loaded as the dictionary's activations were computed
        model = load_model(model, device, processing=getattr(cfg, "processing", DEFAULT_PROCESSING))
    model.check_dictionary(sae_or_path)
    target = getattr(cfg, "target_hook", None)
    hooks = [cfg.hook] + ([target] if target else [])
    model.check_hooks(hooks)
    widths = model.hook_dims(hooks)
    expected = {cfg.hook: ("d_in", cfg.d_in)} | ({target: ("d_out", cfg.out_dim)} if target else {})
    for hook, (name, want) in expected.items():
        if widths[hook] != want:
            raise SaelabError(
                f"the SAE expects {name}={want}, but {hook} of {model.spec} has width {widths[hook]}")
    if data is None or isinstance(data, str):
        if context_length is None and data is None:
            context_length = getattr(cfg, "context_length", None)
        spec = data or getattr(cfg, "data", None) or BUILTIN_STDLIB
        data = TokenData(spec, "heldout", model.check_context(context_length))
    model.check_context(data.context_length)
    if data.context_length < 3:
        raise SaelabError(
            f"context_length must be at least 3 to score predictions, got {data.context_length}"
        )
    return sae_or_path, path, model, data


def heldout_activations(model: HookedModel, data: TokenData, hook: str, tokens: int) -> torch.Tensor:
    """The first `tokens` activation rows of `data` (for evaluation; not shuffled)."""
    out, held = [], 0
    for acts in model_activations(model, data, [hook], batch_rows=32, epochs=1):
        out.append(acts[hook])
        held += out[-1].shape[0]
        if held >= tokens:
            break
    return torch.cat(out)[:tokens]
