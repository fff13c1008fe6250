"""Where a model, dictionary or dataset comes from: explicit prefixes, never a guess.

A spec is a local path, `zoo:NAME` (shipped with saelab), or `hf:NAME` (the Hugging Face hub).
A bare name that is not a local path is an error rather than a hub lookup: a typo then fails at
once with a clear message instead of after a network timeout.
"""

from __future__ import annotations

HUB = "hf:"
ZOO = "zoo:"


def hub_name(spec: str) -> str | None:
    """The hub name of an `hf:NAME` spec, else None."""
    return spec.removeprefix(HUB) if spec.startswith(HUB) else None
