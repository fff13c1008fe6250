"""Activations computed from a model as it runs (no cache): per-batch extraction with BOS/pad
positions dropped, and `ModelStream`, shuffled training batches of the same form as
`saelab.data.cache.CacheStream`'s."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from saelab.data.tokens import TokenData
from saelab.models import HookedModel, grad_key

HookBatch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # x, or (x, grad) with gradients
Batch = HookBatch | dict[str, HookBatch]  # one hook's, or {hook: ...} for a list of hooks


def positions_to_keep(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Boolean mask (B, T) of positions that are not BOS or pad tokens."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for special in {tokenizer.bos_token_id, tokenizer.pad_token_id} - {None}:
        keep &= tokens != special
    return keep


def model_activations(
    model: HookedModel, data: TokenData, hooks: list[str], batch_rows: int,
    epochs: int | None = None, with_grads: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {hook: (rows, d)} per token batch, with BOS/pad positions dropped.

    With `with_grads`, also `{hook}:grad` (see `HookedModel.activations`).
    """
    for tokens in data.batches(model.tokenizer, batch_rows, epochs):
        tokens = tokens.to(model.device)
        acts = model.activations(tokens, hooks, with_grads)
        keep = positions_to_keep(tokens, model.tokenizer)
        yield {h: a[keep] for h, a in acts.items()}


class Layout:
    """How the tensors of several hooks (and their gradients) sit side by side in one row.

    Streams shuffle one (rows, total width) tensor so every hook sees the same token order;
    a batch is handed out per hook as x, or (x, grad) with gradients, and as a dict
    {hook: ...} when the stream was asked for a list of hooks.
    """

    def __init__(self, hooks: str | list[str], with_grads: bool):
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        self.with_grads = with_grads
        self.keys = [k for h in self.hooks for k in ([h, grad_key(h)] if with_grads else [h])]

    def split(self, rows: torch.Tensor, widths: list[int]) -> Batch:
        parts = dict(zip(self.keys, rows.split(widths, dim=1), strict=True))
        out: dict[str, HookBatch] = {
            h: (parts[h], parts[grad_key(h)]) if self.with_grads else parts[h] for h in self.hooks
        }
        return out[self.hooks[0]] if self.single else out


class ModelStream:
    """Shuffled (B, d) batches computed on the fly, mixed in a buffer of tokens.

    One forward pass serves every hook; batches have the same form as `CacheStream`'s (x, or
    (x, grad) with `with_grads`, where the model runs forward and backward; a dict for a list
    of hooks).
    Its position is the number of batches served; resuming replays the (seeded) stream up to
    it, which recomputes activations but restores the exact same batches.
    """

    def __init__(
        self,
        model: HookedModel,
        data: TokenData,
        hook: str | list[str],
        batch_size: int,
        buffer_tokens: int = 2**17,
        batch_rows: int = 32,
        seed: int = 0,
        with_grads: bool = False,
    ):
        self.layout = Layout(hook, with_grads)
        model.check_hooks(self.layout.hooks)
        self.model, self.data = model, data
        self.batch_size, self.buffer_tokens, self.batch_rows = batch_size, buffer_tokens, batch_rows
        self.seed, self.served = seed, 0

    def state_dict(self) -> dict:
        return {"batches": self.served, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.served, self.seed = state["batches"], state["seed"]

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed)
        skip, self.served = self.served, 0
        buf: list[torch.Tensor] = []
        held = 0
        lay = self.layout
        for acts in model_activations(self.model, self.data, lay.hooks, self.batch_rows,
                                         with_grads=lay.with_grads):
            widths = [acts[key].shape[1] for key in lay.keys]
            buf.append(torch.cat([acts[key] for key in lay.keys], dim=1))
            held += buf[-1].shape[0]
            if held < self.buffer_tokens:
                continue
            x = torch.cat(buf)
            x = x[torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)]
            full = x.shape[0] // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                self.served += 1
                if self.served > skip:
                    yield lay.split(x[b : b + self.batch_size], widths)
            buf, held = [x[full:]], x.shape[0] - full
