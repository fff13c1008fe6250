"""Streaming browser statistics against a brute-force computation over the dense activations."""

import numpy as np
import pytest
import torch

from saelab.browse.stats import (
    MAX_EXP,
    MIN_EXP,
    FeatureStats,
    StatsConfig,
    hist_edges,
    quantile_bands,
    sample_key,
)


def _data(R=24, T=11, n=7, k=3, vocab=50, seed=0):
    """Random rows; column 0 and a few others are not encoded (BOS/pad); codes with unused
    slots (vals == 0) and distinct latents per token; one latent fires almost everywhere."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (R, T), generator=g)
    keep = torch.rand(R, T, generator=g) > 0.1
    keep[:, 0] = False
    N = int(keep.sum())
    perms = [torch.randperm(n, generator=g) for _ in range(N)]
    for p in perms[: N // 2]:  # latent 0 fires on half the tokens or more
        p[(p == 0).nonzero()[0, 0]], p[0] = p[0].item(), 0
    idx = torch.stack([p[:k] for p in perms])
    vals = torch.rand(N, k, generator=g) * 5 * (torch.rand(N, k, generator=g) > 0.3)
    vals[vals > 0] += 1e-3
    dense = torch.zeros(R, T, n)
    where = keep.nonzero()
    for q in range(N):
        for s in range(k):
            dense[where[q, 0], where[q, 1], idx[q, s]] += vals[q, s]
    return tokens, keep, idx, vals, dense


def _stream(tokens, keep, idx, vals, cfg, rows_per_batch, latents=None):
    stats = FeatureStats(int(idx.max()) + 1 if latents is None else 7, cfg, latents)
    code = 0
    for r0 in range(0, tokens.shape[0], rows_per_batch):
        kb = keep[r0:r0 + rows_per_batch]
        N = int(kb.sum())
        stats.update(tokens[r0:r0 + rows_per_batch], kb, idx[code:code + N], vals[code:code + N])
        code += N
    return stats


def _window(tokens, dense, r, c, j, cfg):
    T = tokens.shape[1]
    tok, act = [], []
    for cc in range(c - cfg.before, c + cfg.after + 1):
        inside = 0 <= cc < T
        tok.append(int(tokens[r, cc]) if inside else -1)
        act.append(float(dense[r, cc, j]) if inside else 0.0)
    return tok, act


@pytest.mark.parametrize("rows_per_batch", [1, 5, 24])
def test_streaming_matches_brute_force(rows_per_batch):
    tokens, keep, idx, vals, dense = _data()
    cfg = StatsConfig(top_k=4, samples=5, before=3, after=2)
    stats = _stream(tokens, keep, idx, vals, cfg, rows_per_batch)
    T, n = tokens.shape[1], dense.shape[2]
    assert stats.tokens == int(keep.sum())
    edges = hist_edges().numpy()
    for j in range(n):
        r, c = (dense[:, :, j] > 0).nonzero(as_tuple=True)
        acts = dense[r, c, j]
        pos = r * T + c  # row-major, so already sorted by position
        assert int(stats.count[j]) == len(acts)
        assert stats.sum[j].item() == pytest.approx(acts.double().sum().item())
        assert stats.max[j].item() == pytest.approx(acts.max().item())
        clipped = np.clip(acts.double().numpy(), 2.0**MIN_EXP, 2.0**MAX_EXP * 0.999)
        assert stats.histogram(j).tolist() == np.histogram(clipped, edges)[0].tolist()

        # top-k: largest activation first, earlier position on ties
        ranked = sorted(range(len(acts)), key=lambda i: (-acts[i].item(), pos[i].item()))[: cfg.top_k]
        assert stats.top.pos[j].tolist() == [int(pos[i]) for i in ranked]
        for s, i in enumerate(ranked):
            tok, act = _window(tokens, dense, int(r[i]), int(c[i]), j, cfg)
            assert stats.top.tokens[j, s].tolist() == tok
            assert stats.top.acts[j, s].tolist() == pytest.approx(act)
            assert stats.top.acts[j, s, cfg.before].item() == pytest.approx(acts[i].item())

        # sample: the smallest keys
        keys = sample_key(pos, torch.full_like(pos, j))
        chosen = torch.argsort(keys)[: cfg.samples]
        assert stats.sample.pos[j].tolist() == pos[chosen].tolist()
        for s, i in enumerate(chosen.tolist()):
            tok, act = _window(tokens, dense, int(r[i]), int(c[i]), j, cfg)
            assert stats.sample.tokens[j, s].tolist() == tok
            assert stats.sample.acts[j, s].tolist() == pytest.approx(act)


def test_subset_of_latents_and_never_firing():
    tokens, keep, idx, vals, dense = _data(n=7)
    cfg = StatsConfig(top_k=3, samples=2, before=1, after=1)
    full = _stream(tokens, keep, idx, vals, cfg, 4)
    part = _stream(tokens, keep, idx, vals, cfg, 4, latents=[5, 2])
    for slot, j in enumerate([5, 2]):
        assert part.count[slot] == full.count[j]
        assert part.top.pos[slot].tolist() == full.top.pos[j].tolist()
        assert part.sample.pos[slot].tolist() == full.sample.pos[j].tolist()
    silent = FeatureStats(9, cfg)
    silent.update(tokens, keep, idx, vals)  # latents 7 and 8 never fire
    assert silent.count[7:].tolist() == [0, 0]
    assert silent.max[7:].tolist() == [0.0, 0.0]
    assert (silent.top.pos[7:] == -1).all()


def test_sample_is_roughly_uniform_over_positions():
    """The hash keys do not favour early or late positions: the sample's mean position over
    many latents is near the middle."""
    pos = torch.arange(20_000)
    means = [pos[torch.argsort(sample_key(pos, torch.full_like(pos, j)))[:50]].float().mean().item()
             for j in range(20)]
    assert abs(np.mean(means) - 10_000) < 800


def test_quantile_bands():
    acts = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 6.0]
    bands = quantile_bands(acts, 3)
    assert [sorted(acts[i] for i in b) for b in bands] == [[0.5, 1.0], [2.0, 3.0], [4.0, 5.0, 6.0]]
    assert quantile_bands([], 2) == [[], []]


def test_linear_histogram_against_numpy():
    """Bars re-binned from the geometric histogram keep the total, and each is within the
    counts of values lying in geometric bins that straddle its edges."""
    from saelab.browse.card import linear_histogram
    from saelab.browse.stats import N_BINS, hist_bin

    vals = torch.rand(20_000, generator=torch.Generator().manual_seed(1)).pow(2) * 7 + 0.01
    fine = torch.bincount(hist_bin(vals), minlength=N_BINS)
    bars = linear_histogram(fine, vals.max().item(), bars=10)
    counts = [c for _, _, c in bars]
    assert sum(counts) == vals.numel() and min(counts) > 0
    exact = np.histogram(vals.numpy(), np.linspace(0, vals.max().item(), 11))[0]
    for (lo, hi, c), e in zip(bars, exact, strict=True):
        near = ((vals > lo / 1.1) & (vals < lo * 1.1)) | ((vals > hi / 1.1) & (vals < hi * 1.1))
        assert abs(c - e) <= int(near.sum()) + 1
