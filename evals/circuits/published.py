"""Published head-level ground truths (GPT-2 small IOI and greater-than, attn-only-4l docstring).

Shipped as data (`published.json`) with sources and the places where published lists differ,
so results on those models can be scored against the literature as well as against patching.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from saelab.errors import SaelabError

DATA = Path(__file__).with_name("published.json")
MODEL_ALIASES = {"gpt2": "gpt2", "gpt2-small": "gpt2", "openai-community/gpt2": "gpt2",
                 "attn-only-4l": "attn-only-4l", "NeelNanda/attn-only-4l": "attn-only-4l"}


@cache
def circuits() -> dict[str, dict]:
    """Every published circuit, keyed "MODEL/TASK"."""
    return json.loads(DATA.read_text())


def lookup(model_spec: str, task: str) -> dict | None:
    """The published circuit for a model spec and task, if there is one."""
    name = MODEL_ALIASES.get(model_spec)
    return circuits().get(f"{name}/{task}") if name else None


def head_mask(entry: dict, n_layers: int, n_heads: int) -> torch.Tensor:
    """(n_layers * n_heads,) bool of the entry's heads on a model's head grid."""
    if (entry["n_layers"], entry["n_heads"]) != (n_layers, n_heads):
        raise SaelabError(
            f"published circuit for {entry['model']} is on a {entry['n_layers']}x{entry['n_heads']} "
            f"head grid, not this model's {n_layers}x{n_heads}"
        )
    mask = torch.zeros(n_layers * n_heads, dtype=torch.bool)
    for h in entry["heads"]:
        layer, head = map(int, h.split("."))
        mask[layer * n_heads + head] = True
    return mask
