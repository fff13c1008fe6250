"""Per-latent statistics in one streaming pass with bounded memory.

What a feature page needs, gathered batch by batch from sparse codes (idx, vals), never holding
all activations:

- count (firing tokens), sum and max of the nonzero activations;
- a histogram of the nonzero activations on fixed geometric bins (`BINS_PER_OCTAVE` bins per
  factor of 2 between 2^MIN_EXP and 2^MAX_EXP; values outside fall into the end bins), exact
  counts whatever the latent's scale;
- the `top_k` entries of largest activation (ties: the earlier position), each with its context
  window: `before` tokens, the token itself and `after` tokens of the same row, and the latent's
  activation at every one of them;
- a uniform random sample of `samples` entries (bottom-k sampling: the entries with the smallest
  `sample_key(position, latent)`, a fixed hash, so the same data gives the same sample; each
  batch merges exactly like a reservoir), with context windows too. Pages split it at its own
  quantiles (`quantile_bands`), so a reader sees the whole range of activations, not only the top.

Memory: O(n_latents * (top_k + samples) * window) for the contexts plus O(n_latents * bins) for
the histograms, independent of the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS_PER_OCTAVE = 8
MIN_EXP, MAX_EXP = -20, 16
N_BINS = (MAX_EXP - MIN_EXP) * BINS_PER_OCTAVE
_MASK = 2**31 - 1  # keys are 31-bit
_CHUNK = 65536  # entries whose windows are read at once (bounds the (chunk, window) temps)


def hist_edges() -> torch.Tensor:
    """The N_BINS + 1 edges of the activation histogram (float64)."""
    e = torch.arange(MIN_EXP * BINS_PER_OCTAVE, MAX_EXP * BINS_PER_OCTAVE + 1, dtype=torch.float64)
    return torch.exp2(e / BINS_PER_OCTAVE)


def hist_bin(vals: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each positive value; below/above the range: the first/last bin."""
    b = torch.floor(torch.log2(vals.double()) * BINS_PER_OCTAVE).long() - MIN_EXP * BINS_PER_OCTAVE
    return b.clamp_(0, N_BINS - 1)


def sample_key(pos: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random key in [0, 2^31) per (position, latent): the sample keeps the
    smallest keys. Multiply-xorshift rounds on 31-bit values, every product below 2^63 (no
    overflow), so it is the same on every machine."""
    h = ((pos & _MASK) * 1103515245 + (lat & _MASK) * 40503 + 12345) & _MASK
    for mult in (2654435761, 1540483477):
        h ^= h >> 15
        h = (h * mult) & _MASK
    return h ^ (h >> 13)


@dataclass(frozen=True)
class StatsConfig:
    """What is kept per latent.

    Fields:
        top_k: top-activating contexts kept.
        samples: size of the uniform sample of activations (shown split at its quantiles).
        before, after: tokens of context kept before and after the activating token.
    """

    top_k: int = 12
    samples: int = 16
    before: int = 15
    after: int = 4

    @property
    def width(self) -> int:
        return self.before + 1 + self.after


@dataclass
class Contexts:
    """Per latent, `size` kept entries, best first; empty slots have pos == -1.

    Fields (L latents tracked, S slots, W window):
        score: (L, S) float64, what is maximised (activation, or minus the sample key).
        pos: (L, S) global position (row * context_length + column) of the entry.
        act: (L, S) the latent's activation there.
        tokens: (L, S, W) token ids of the window (-1 beyond the row).
        acts: (L, S, W) the latent's activation at each window token.
    """

    score: torch.Tensor
    pos: torch.Tensor
    act: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor

    @classmethod
    def empty(cls, n: int, size: int, width: int) -> Contexts:
        return cls(torch.full((n, size), -torch.inf, dtype=torch.float64),
                   torch.full((n, size), -1, dtype=torch.long), torch.zeros(n, size),
                   torch.full((n, size, width), -1, dtype=torch.int32), torch.zeros(n, size, width))

    def offer(self, slot: torch.Tensor, score: torch.Tensor, batch: _Batch, entry: torch.Tensor) -> None:
        """Merge a batch's candidate entries (latent slot, score, entry index into `batch`)."""
        size = self.score.shape[1]
        last = self.score[:, -1].contiguous()
        better = score > last[slot]  # ties keep the earlier position already held
        slot, score, entry = slot[better], score[better], entry[better]
        if slot.numel() == 0:
            return
        # group by slot, best score first, earlier entry first on ties (both sorts are stable)
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(slot[order], stable=True).indices]
        slot, score, entry = slot[order], score[order], entry[order]
        rows, counts = torch.unique_consecutive(slot, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        rank = torch.arange(slot.numel()) - starts[group]
        first = rank < size
        group, rank, score, entry = group[first], rank[first], score[first], entry[first]

        # merge by score first (the held entries before the batch's on ties); windows are looked
        # up only for the entries that get in
        cand = torch.full((rows.numel(), size), -torch.inf, dtype=torch.float64)
        cand[group, rank] = score
        src = torch.zeros((rows.numel(), size), dtype=torch.long)
        src[group, rank] = entry
        scores = torch.cat([self.score[rows], cand], 1)
        pick = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :size]
        is_new = pick >= size
        held = pick.clamp(max=size - 1)
        u, s = is_new.nonzero(as_tuple=True)
        e = src[u, pick[u, s] - size]
        tok, acts = batch.windows(e, rows[u])
        for f, fresh in (("pos", batch.pos[e]), ("act", batch.act[e]), ("tokens", tok), ("acts", acts)):
            t = getattr(self, f)[rows]
            t = t.gather(1, held if t.dim() == 2 else held.unsqueeze(2).expand(-1, -1, t.shape[2]))
            t[u, s] = fresh.to(t.dtype)
            getattr(self, f)[rows] = t
        self.score[rows] = scores.gather(1, pick)


class _Batch:
    """One batch's active entries (latent, activation, position) and what windows need."""

    def __init__(self, tokens: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                 row0: int, cfg: StatsConfig):
        R, T = tokens.shape
        self.tokens, self.cfg = tokens, cfg
        self.dense: torch.Tensor | None = None  # (codes, tracked latents), set by FeatureStats
        where = keep.nonzero()  # (N, 2): row, column of each encoded position, row-major
        self.code_of = torch.full((R, T), -1, dtype=torch.long)  # position -> row of idx/vals
        self.code_of[where[:, 0], where[:, 1]] = torch.arange(where.shape[0])
        on = vals > 0
        if bool(on.all()):  # topk codes: no unused slot, and masking is the slow part
            code = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])
            self.code, self.lat, self.act = code, idx.flatten(), vals.flatten()
        else:
            code = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[on]
            self.code, self.lat, self.act = code, idx[on], vals[on]
        self.row, self.col = where[code, 0], where[code, 1]
        self.pos = (self.row + row0) * T + self.col

    def windows(self, entry: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (E, W) around each entry and the activation (E, W) of the latent tracked in
        `slot` at each, read from the batch's dense code map."""
        assert self.dense is not None, "FeatureStats sets the dense map before reading windows"
        cfg, T = self.cfg, self.tokens.shape[1]
        offsets = torch.arange(-cfg.before, cfg.after + 1)
        toks, acts = [], []
        for e, j in zip(entry.split(_CHUNK), slot.split(_CHUNK), strict=True):
            r = self.row[e].unsqueeze(1).expand(-1, offsets.numel())
            c = self.col[e].unsqueeze(1) + offsets
            inside = (c >= 0) & (c < T)
            c = c.clamp(0, T - 1)
            toks.append(torch.where(inside, self.tokens[r, c], -1).to(torch.int32))
            code = torch.where(inside, self.code_of[r, c], -1)
            a = self.dense.view(-1)[code.clamp_min(0) * self.dense.shape[1] + j.unsqueeze(1)]
            acts.append(torch.where(code >= 0, a, 0.0))
        return torch.cat(toks), torch.cat(acts)


class FeatureStats:
    """Accumulates `StatsConfig`'s statistics for `latents` (default: all n) batch by batch."""

    def __init__(self, n_latents: int, cfg: StatsConfig = StatsConfig(),
                 latents: list[int] | None = None):
        self.cfg = cfg
        self.latents = list(range(n_latents)) if latents is None else list(latents)
        L = len(self.latents)
        self.slot_of = torch.full((n_latents,), -1, dtype=torch.long)
        self.slot_of[torch.tensor(self.latents, dtype=torch.long)] = torch.arange(L)
        self.all_latents = self.latents == list(range(n_latents))
        self.tokens = 0
        self.rows = 0
        self.count = torch.zeros(L, dtype=torch.long)
        self.sum = torch.zeros(L, dtype=torch.float64)
        self.hist = torch.zeros(L * N_BINS, dtype=torch.long)
        self.top = Contexts.empty(L, cfg.top_k, cfg.width)
        self.sample = Contexts.empty(L, cfg.samples, cfg.width)
        self._dense: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Add one batch: `tokens` (R, T) rows, `keep` (R, T) the positions that were encoded
        (row-major order), `idx`/`vals` (N, k) their codes (vals == 0: unused slot)."""
        tokens, keep, idx, vals = tokens.cpu(), keep.cpu(), idx.cpu(), vals.detach().float().cpu()
        b = _Batch(tokens, keep, idx, vals, self.rows, self.cfg)
        self.rows += tokens.shape[0]
        self.tokens += idx.shape[0]
        if self.all_latents:
            slot, entry, act = b.lat, torch.arange(b.lat.numel()), b.act
        else:
            slot = self.slot_of[b.lat]
            entry = (slot >= 0).nonzero().squeeze(1)
            slot, act = slot[entry], b.act[entry]
        b.dense = self._dense_map(idx.shape[0])
        flat = b.code[entry] * len(self.latents) + slot
        b.dense.view(-1)[flat] = act
        L = len(self.latents)
        self.count += torch.bincount(slot, minlength=L)
        self.sum.index_add_(0, slot, act.double())
        self.hist.index_add_(0, slot * N_BINS + hist_bin(act), torch.ones_like(slot))
        self.top.offer(slot, act.double(), b, entry)
        self.sample.offer(slot, -sample_key(b.pos[entry], b.lat[entry]).double(), b, entry)
        b.dense.view(-1)[flat] = 0.0  # cleared where written: no full memset per batch

    def _dense_map(self, codes: int) -> torch.Tensor:
        """A zero (codes, tracked latents) buffer, kept across batches (window look-ups read
        any latent's activation at any position in O(1)); its size is the largest batch's."""
        if self._dense is None or self._dense.shape[0] < codes:
            self._dense = torch.zeros(codes, len(self.latents))
        return self._dense

    @property
    def max(self) -> torch.Tensor:
        """Largest activation per tracked latent (0 for a latent that never fired)."""
        return torch.where(self.count > 0, self.top.act[:, 0], 0.0)

    @property
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.tokens, 1)

    def histogram(self, slot: int) -> torch.Tensor:
        """Counts of latent slot `slot`'s nonzero activations per `hist_edges()` bin."""
        return self.hist[slot * N_BINS:(slot + 1) * N_BINS]


def quantile_bands(acts: list[float], bands: int) -> list[list[int]]:
    """Indices of a sample's entries split into `bands` groups of rising activation
    (its quantile ranges 0..1/bands, ...); groups differ in size by at most one."""
    order = sorted(range(len(acts)), key=lambda i: acts[i])
    n = len(order)
    return [order[b * n // bands:(b + 1) * n // bands] for b in range(bands)]
