"""A latent's card: everything its page shows, as plain data (and inline HTML in a notebook)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saelab.browse import collect
from saelab.browse.stats import Contexts, FeatureStats, hist_edges, quantile_bands
from saelab.browse.text import Piece, byte_text, display_pieces, token_bytes
from saelab.sae import WEIGHTS_FILE

HIST_BARS = 30
SNIPPET_BEFORE = 8  # tokens of left context in a one-line summary


@dataclass(frozen=True)
class Context:
    """One context window of a latent.

    Fields:
        tokens: display text of each token alone (`text.byte_text`: a byte that is part of a
            character shows as its `\\xNN` escape).
        acts: the latent's activation at each token.
        center: index of the token the context was chosen for.
        activation: the latent's activation there.
        position: row * context_length + column of that token in the held-out rows.
        pieces: how the tokens are shown together (`text.display_pieces`: bytes of one
            character joined); None: one piece per token.
    """

    tokens: list[str]
    acts: list[float]
    center: int
    activation: float
    position: int
    pieces: list[Piece] | None = None

    def shown(self) -> list[Piece]:
        """The display pieces, in order."""
        if self.pieces is not None:
            return self.pieces
        return [Piece(t, i, i + 1) for i, t in enumerate(self.tokens)]

    def snippet(self, before: int = SNIPPET_BEFORE) -> str:
        """The text up to and including the centre token (and the rest of its character)."""
        lo = max(0, self.center - before)
        return "".join(p.text for p in self.shown() if p.stop > lo and p.start <= self.center)


@dataclass(frozen=True)
class CircuitMark:
    """A latent's place in the smallest circuit with faithfulness >= 0.8 that `saelab eval DICT
    --task T` measured (EVAL_FILE's "circuit" entry).

    Fields:
        task, method: the task and the attribution method that scored the nodes.
        rank: 1 for the node with the largest |score|; size: nodes in the circuit.
        score: the latent's attribution score (estimated share of the task effect).
        cpr: the dictionary's CPR on the task.
        report: the eval report (EVAL_MD) that lists the circuit.
    """

    task: str
    method: str
    rank: int
    size: int
    score: float
    cpr: float
    report: str


@dataclass(frozen=True)
class LatentCard:
    """One latent over a window of held-out tokens.

    Fields:
        latent: its index in the dictionary.
        hook: the dictionary's hook; a transcoder's "input -> target" (contexts are where it
            reads, effects where it writes).
        window: held-out tokens the statistics cover.
        count: tokens on which it was active (value > 0).
        max, mean: largest and mean nonzero activation (0 if dead).
        histogram: (low, high, count) bars of its nonzero activations over (0, max]. Counts
            come from geometric bins 9% wide, spread uniformly within each (`linear_histogram`),
            so a bar can be off only by values within 9% of its edges.
        top: its top-activating contexts, highest first.
        bands: (label, contexts): a uniform sample of its activations split at the sample's
            quantiles, lowest band first.
        promoted, suppressed: (token, logit effect) of the next tokens its decoder direction
            raises / lowers most, or None when the hook has no linear path to the logits.
        effect_note: how those were computed (or why there are none).
        neighbours: (latent, cosine) of the nearest decoder directions.
        label: (label, F1) of the exact Python label its firing predicts best, when
            `saelab eval --probes` wrote PROBES_FILE beside the dictionary; else None.
        circuit: its place in the task circuit `saelab eval --task` found (`circuit_marks`),
            when the latent is in it; else None.
    """

    latent: int
    hook: str
    window: int
    count: int
    max: float
    mean: float
    histogram: list[tuple[float, float, int]]
    top: list[Context]
    bands: list[tuple[str, list[Context]]]
    promoted: list[tuple[str, float]] | None
    suppressed: list[tuple[str, float]] | None
    effect_note: str
    neighbours: list[tuple[int, float]]
    label: tuple[str, float] | None = None
    circuit: CircuitMark | None = None

    @property
    def density(self) -> float:
        return self.count / max(self.window, 1)

    @property
    def dead(self) -> bool:
        return self.count == 0

    def top_tokens(self, n: int = 5) -> list[tuple[str, int]]:
        """The most frequent tokens at the top contexts' activating positions."""
        return Counter(c.tokens[c.center] for c in self.top).most_common(n)

    @property
    def table(self) -> list[dict]:
        """Its contexts as rows (kind, rank, activation, position, tokens, acts, center), top
        contexts first, then the quantile samples: `pandas.DataFrame(card.table)` works."""
        rows = [("top", i, c) for i, c in enumerate(self.top)]
        rows += [(label, i, c) for label, cs in self.bands for i, c in enumerate(cs)]
        return [{"kind": kind, "rank": i, "activation": c.activation, "position": c.position,
                 "text": "".join(p.text for p in c.shown()), "tokens": c.tokens, "acts": c.acts,
                 "center": c.center}
                for kind, i, c in rows]

    def _repr_html_(self) -> str:
        from saelab.browse.html import card_html, notebook_html

        return notebook_html(card_html(self))


def linear_histogram(fine: torch.Tensor, vmax: float,
                     bars: int = HIST_BARS) -> list[tuple[float, float, int]]:
    """Re-bin the geometric histogram into `bars` equal bars over (0, vmax]: each geometric
    bin's count is spread uniformly over its range (a piecewise-linear CDF), so no bar is left
    empty where geometric bins are wider than bars. Counts are rounded; the total is kept."""
    if vmax <= 0:
        return []
    edges = hist_edges().numpy()
    cdf = np.concatenate([[0.0], np.cumsum(fine.numpy())])
    bar_edges = np.linspace(0.0, vmax, bars + 1)
    at = np.interp(bar_edges, edges, cdf)
    at[-1] = cdf[-1]  # vmax lies inside its geometric bin: the rest of that bin is the top bar's
    counts = np.diff(np.round(at)).astype(int)
    pairs = zip(bar_edges[:-1], bar_edges[1:], counts, strict=True)
    return [(float(lo), float(hi), int(c)) for lo, hi, c in pairs]


def _contexts(part: Contexts, slot: int, before: int, raw: dict[int, bytes],
              text: dict[int, str]) -> list[Context]:
    """The filled slots of one latent as `Context`s, padding beyond the row trimmed; `raw` and
    `text` give each token id's bytes and its display text alone."""
    out = []
    for s in range(part.pos.shape[1]):
        if part.pos[slot, s] < 0:
            break
        toks, acts = part.tokens[slot, s].tolist(), part.acts[slot, s].tolist()
        real = [i for i, t in enumerate(toks) if t >= 0]
        lo, hi = real[0], real[-1] + 1
        out.append(Context([text[t] for t in toks[lo:hi]], acts[lo:hi], before - lo,
                           float(part.act[slot, s]), int(part.pos[slot, s]),
                           display_pieces([raw[t] for t in toks[lo:hi]])))
    return out


def build_cards(stats: FeatureStats, sae, model, bands: int = 4, effects: int = 10,
                neighbours: int = 8) -> list[LatentCard]:
    """Cards of every latent `stats` tracked, in its order."""
    hook, latents = sae.cfg.hook, stats.latents
    # a transcoder's contexts are where it reads (its input hook), its effects where it writes
    out_hook = getattr(sae.cfg, "target_hook", None) or hook
    label = hook if out_hook == hook else f"{hook} -> {out_hook}"
    W_dec = sae.W_dec.detach().cpu()
    eff = collect.logit_effects(model, out_hook, W_dec, latents, effects)
    nb_ids, nb_cos = collect.decoder_neighbours(W_dec, latents, neighbours)
    ids = torch.cat([stats.top.tokens.flatten(), stats.sample.tokens.flatten()]).unique()
    if eff is not None:
        ids = torch.cat([ids, eff[0].flatten(), eff[2].flatten()]).unique()
    raw = token_bytes(model.tokenizer, ids.tolist())
    text = {i: byte_text(b) for i, b in raw.items()}
    cards = []
    for slot, j in enumerate(latents):
        count, vmax = int(stats.count[slot]), float(stats.max[slot])
        sample = _contexts(stats.sample, slot, stats.cfg.before, raw, text)
        split = quantile_bands([c.activation for c in sample], bands)
        band_list = [(f"quantile {100 * b // bands}-{100 * (b + 1) // bands}%", [sample[i] for i in grp])
                     for b, grp in enumerate(split)]
        promoted = suppressed = None
        if eff is not None:
            promoted = [(text[int(t)], float(v)) for t, v in zip(eff[0][slot], eff[1][slot], strict=True)]
            suppressed = [(text[int(t)], float(v)) for t, v in zip(eff[2][slot], eff[3][slot], strict=True)]
        cards.append(LatentCard(
            latent=j, hook=label, window=stats.tokens, count=count, max=vmax,
            mean=float(stats.sum[slot]) / count if count else 0.0,
            histogram=linear_histogram(stats.histogram(slot), vmax),
            top=_contexts(stats.top, slot, stats.cfg.before, raw, text), bands=band_list,
            promoted=promoted, suppressed=suppressed, effect_note=collect.effect_note(out_hook),
            neighbours=[(int(i), float(c)) for i, c in zip(nb_ids[slot], nb_cos[slot], strict=True)],
        ))
    return cards


PROBES_FILE = "probing.json"  # written by saelab.evals.probes beside the dictionary


def probe_labels(dictionary: Path) -> dict[int, tuple[str, float]]:
    """Each latent's best label and its F1 from the dictionary's PROBES_FILE; empty when there
    is none, it does not parse, or it is older than the weights (probed before a retrain)."""
    path, weights = dictionary / PROBES_FILE, dictionary / WEIGHTS_FILE
    if not path.is_file() or (weights.is_file() and path.stat().st_mtime < weights.stat().st_mtime):
        return {}
    try:
        got = json.loads(path.read_text())["latent_labels"]
        names, best, f1 = got["names"], got["best"], got["f1"]
        return {j: (names[b], float(v)) for j, (b, v) in enumerate(zip(best, f1, strict=True)) if v > 0}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}


EVAL_FILE, EVAL_MD = "eval.json", "eval.md"  # written by `saelab eval` beside the dictionary


def circuit_marks(dictionary: Path) -> dict[int, CircuitMark]:
    """The latents in the circuit `saelab eval --task` stored in the dictionary's EVAL_FILE;
    empty when there is none, it has no circuit, does not parse, or is older than the weights."""
    path, weights = dictionary / EVAL_FILE, dictionary / WEIGHTS_FILE
    if not path.is_file() or (weights.is_file() and path.stat().st_mtime < weights.stat().st_mtime):
        return {}
    try:
        c = json.loads(path.read_text()).get("circuit") or {}
        nodes = c.get("circuit_nodes") or []
        report = str((dictionary / EVAL_MD).resolve())
        return {int(name.rsplit("/", 1)[1]): CircuitMark(c["task"], c["method"], rank, len(nodes),
                                                         float(score), float(c["cpr"]), report)
                for rank, (name, score) in enumerate(nodes, 1) if name.rsplit("/", 1)[1].isdigit()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}
