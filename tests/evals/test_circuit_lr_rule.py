"""The features-against-neurons study's lr rule (benchmarks/circuit_faithfulness.py): the dead
cap at the sites that can support it, no fallback to dead runs, the grid extended until the
chosen lr is bracketed -- against hand-built sweeps."""

import pytest

from benchmarks.circuit_faithfulness import HOOKS, capped, next_lr, pick


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")  # the script imports its sibling as `allocators`


def _row(lr: float, fvu: float, dead: tuple[float, float, float, float]) -> dict:
    return {"lr": lr, "fvu": fvu, "l0": 32.0, "dead_frac": max(dead),
            "sites": {h: {"dead_frac": d} for h, d in zip(HOOKS, dead, strict=True)}}


SITES = {"ever": dict(zip(HOOKS, (512, 148, 414, 500), strict=True))}


def test_the_cap_skips_a_site_where_few_neurons_ever_fire():
    assert capped(SITES) == [HOOKS[0], HOOKS[2], HOOKS[3]]


def test_dead_latents_at_the_uncapped_site_do_not_disqualify():
    rows = [_row(2e-3, 0.05, (0, 0.02, 0, 0)), _row(4e-3, 0.04, (0.01, 0.30, 0.02, 0)),
            _row(8e-3, 0.03, (0.10, 0.50, 0.04, 0))]
    sites = capped(SITES)
    assert pick(rows, sites) == 4e-3  # 8e-3 has 10% dead at blocks.0; blocks.1's 30% is ignored
    assert next_lr([2e-3, 4e-3, 8e-3], rows, sites) is None  # 4e-3 has a tried lr on each side
    assert pick(rows, list(HOOKS)) == 2e-3  # with blocks.1 capped only the lowest lr qualifies


def test_the_grid_grows_past_the_end_holding_the_choice_and_down_when_none_qualifies():
    grid, sites = [2e-3, 4e-3, 8e-3], capped(SITES)
    rising = [_row(lr, f, (0, 0, 0, 0)) for lr, f in zip(grid, (0.05, 0.04, 0.03), strict=True)]
    assert next_lr(grid, rising, sites) == pytest.approx(1.6e-2)
    falling = [_row(lr, f, (0, 0, 0, 0)) for lr, f in zip(grid, (0.03, 0.04, 0.05), strict=True)]
    assert next_lr(grid, falling, sites) == pytest.approx(1e-3)
    all_dead = [_row(lr, 0.01, (0.2, 0, 0, 0)) for lr in grid]
    assert pick(all_dead, sites) is None  # no fallback to the lowest FVU of dead runs
    assert next_lr(grid, all_dead, sites) == pytest.approx(1e-3)
