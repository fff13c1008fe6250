"""The transcoder study's helpers (benchmarks/transcoders.py): the matched-L0 table against
power laws (where log-log interpolation is exact) and the dead-latent split on a hand-built
dictionary."""

import importlib
import math

import pytest
import torch

from saelab.sae import SAE, SAEConfig


@pytest.fixture
def tc(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")  # the script imports its sibling as `allocators`
    return importlib.import_module("benchmarks.transcoders")


def _cell(l0: float, law, sd: float) -> list[dict]:
    """Three seeds at one k: every metric's mean is law(l0), its std sd, the L0 exact."""
    return [{"l0": l0, **{key: law(l0) + d * sd for key in ("fvu", "kl_sae", "ce_loss_recovered")}}
            for d in (-1.0, 0.0, 1.0)]


def _numbers(cell: str) -> tuple[float, float]:
    mean, sd = cell.split(" +- ")
    return float(mean), float(sd)


def test_matched_rows_interpolate_the_sae_or_move_to_its_lowest_l0(tc):
    sae_law = lambda l0: 0.8 * l0 ** -1.0  # noqa: E731
    tc_law = lambda l0: 0.4 * l0 ** -1.0  # noqa: E731
    cells = {(1, 16, "sae"): _cell(16.0, sae_law, 0.001), (1, 24, "sae"): _cell(24.0, sae_law, 0.002),
             (1, 32, "sae"): _cell(32.0, sae_law, 0.003),
             (1, 16, "transcoder"): _cell(12.0, tc_law, 0.001),
             (1, 32, "transcoder"): _cell(20.0, tc_law, 0.001)}
    rows = {int(r[2]): r for r in tc.matched_rows(cells)}
    assert set(rows) == {16, 32}
    # L0 20 lies inside the SAE's 16..32: the SAE interpolated there, its std weighted likewise
    r = rows[32]
    assert r[:5] == ["1", "transcoder", "32", "20.0", "20.0"]
    t = math.log(20 / 16) / math.log(24 / 16)
    sae_sd = (1 - t) * 0.001 + t * 0.002
    assert _numbers(r[5]) == pytest.approx((tc_law(20.0), 0.001), abs=1e-4)
    assert _numbers(r[6]) == pytest.approx((sae_law(20.0), sae_sd), abs=1e-4)
    assert float(r[7]) == pytest.approx((tc_law(20.0) - sae_law(20.0)) / math.hypot(0.001, sae_sd), abs=0.05)
    # L0 12 lies below the SAE's lowest, 16: both at 16, the transcoder interpolated along its curve
    r = rows[16]
    assert r[3:5] == ["12.0", "16.0"]
    assert _numbers(r[5])[0] == pytest.approx(tc_law(16.0), abs=1e-4)
    assert _numbers(r[6]) == pytest.approx((sae_law(16.0), 0.001), abs=1e-4)


def test_matched_rows_skip_a_cell_neither_curve_reaches(tc):
    law = lambda l0: 1.0 / l0  # noqa: E731
    cells = {(3, 16, "sae"): _cell(16.0, law, 0.001), (3, 32, "sae"): _cell(32.0, law, 0.001),
             (3, 32, "transcoder"): _cell(8.0, law, 0.001)}  # one cell, far below the SAE's range
    assert tc.matched_rows(cells) == []


def test_dead_split_separates_sub_threshold_latents_from_never_positive_ones(tc):
    cfg = SAEConfig(d_in=2, n_latents=4, k=1, allocator="topk", hook="blocks.0.hook_mlp_out")
    sae = SAE(cfg).double()
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, -5.0], dtype=torch.float64))
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.5]], dtype=torch.float64)
    # pre-activations per token: latent 0: 1, 2, 3 (every top 1); latent 1: 0.5, 1, 1.5 (positive,
    # never the top); latent 2: -1, -2, -3; latent 3: -5, -4, -4.5 (never positive)
    dead, never_positive = tc.dead_split(sae, x)
    assert dead == pytest.approx(3 / 4)
    assert never_positive.tolist() == [False, False, True, True]


def test_matched_rows_give_no_gap_for_single_seeds(tc):
    law = lambda l0: 1.0 / l0  # noqa: E731
    one = lambda l0: [{"l0": l0, "fvu": law(l0), "kl_sae": law(l0), "ce_loss_recovered": law(l0)}]  # noqa: E731
    cells = {(1, 16, "sae"): one(16.0), (1, 32, "sae"): one(32.0), (1, 32, "transcoder"): one(20.0)}
    (row,) = tc.matched_rows(cells)
    assert row[7] == row[10] == row[13] == "one seed"
    assert _numbers(row[6])[0] == pytest.approx(law(20.0), abs=1e-4)
