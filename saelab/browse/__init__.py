"""The feature browser: what each latent responds to and what it does.

    saelab browse runs/sae --out runs/sae/browse        # a static site; open index.html

    from saelab.browse import top_contexts
    card = top_contexts(sae, 123)     # renders inline in Jupyter
    card.table                        # rows: kind, rank, activation, tokens, acts, ...

Built in one streaming pass over held-out tokens with bounded memory (`saelab.browse.stats`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from saelab.browse.card import CircuitMark, Context, LatentCard, build_cards, circuit_marks, probe_labels
from saelab.browse.collect import collect, load_dictionaries
from saelab.browse.site import BrowseConfig, build_site
from saelab.browse.stats import FeatureStats, StatsConfig
from saelab.data.tokens import TokenData
from saelab.models import HookedModel


def top_contexts(sae, latent: int, tokens: int = 65_536, n: int = 12, samples: int = 16,
                 model: HookedModel | str | None = None, data: TokenData | str | None = None,
                 device: str = "cpu", progress: bool = True) -> LatentCard:
    """One latent's card over `tokens` held-out tokens: its `n` top contexts (`card.top`,
    `card.table`), a sample across its activations, histogram, logit effects and neighbours.

    `sae`: an SAE or a dictionary directory (its probe label and task-circuit place, when
    `saelab eval` stored them beside it, are on the card); `model`: a loaded `HookedModel` (saves reloading)
    or a spec (default: the one cfg.json names); `data`: default the held-out split of the data
    cfg.json names (else builtin:stdlib).
    """
    sae = str(sae) if isinstance(sae, Path) else sae
    cfg = StatsConfig(top_k=n, samples=samples)
    dicts, model, data = load_dictionaries([sae], [int(latent)], cfg, model, data, device)
    collect(dicts, model, data, tokens, progress=progress)
    card = build_cards(dicts[0].stats, dicts[0].sae, model)[0]
    if isinstance(sae, str) and Path(sae).is_dir():  # what `saelab eval` wrote beside it
        card = replace(card, label=probe_labels(Path(sae)).get(card.latent),
                       circuit=circuit_marks(Path(sae)).get(card.latent))
    return card


__all__ = ["BrowseConfig", "CircuitMark", "Context", "FeatureStats", "LatentCard", "StatsConfig",
           "build_site", "top_contexts"]
