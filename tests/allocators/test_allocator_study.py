"""The allocator study's pure helpers (benchmarks/allocators.py): the lr pick, interpolation at
a matched L0 and the probe families' means, against hand-computed cases."""

import math

import pytest

from benchmarks.allocators import (
    FULL,
    _at_l0,
    _at_study_lr,
    _family_means,
    _matched,
    _with_letters,
    bracket_l1,
    l1_for_l0,
    next_lr,
    per_k_lrs,
    pick_lr,
)


def _row(lr: float, fvu: float, l0: float, dead: float = 0.0, k: int = 32) -> dict:
    return {"lr": lr, "fvu": fvu, "l0": l0, "dead_frac": dead, "k": k}


def test_pick_lr_skips_runs_off_their_target_l0_or_too_dead():
    rows = [_row(1e-3, 0.030, 32.5), _row(2e-3, 0.020, 40.0), _row(4e-3, 0.025, 30.0),
            _row(8e-3, 0.010, 32.0, dead=0.3)]
    # 2e-3 overshoots L0 by 25%, 8e-3 leaves 30% dead: 4e-3 is the best of the rest
    assert pick_lr(rows, max_dead=0.05, l0_tolerance=0.1) == 4e-3
    assert pick_lr(rows, max_dead=0.05, l0_tolerance=0.3) == 2e-3
    # nothing eligible: the lowest FVU of all
    assert pick_lr([_row(1e-3, 0.03, 50.0), _row(2e-3, 0.02, 50.0)], 0.05, 0.1) == 2e-3


def test_at_l0_is_exact_for_a_power_law_and_refuses_to_extrapolate():
    law = lambda l0: 2.0 * l0 ** -1.5  # noqa: E731  (log-log linear: interpolation is exact)
    cells = [(l0, law(l0), sd) for l0, sd in ((8.0, 0.1), (16.0, 0.2), (32.0, 0.4))]
    mean, sd = _at_l0(cells, 20.0)
    assert mean == pytest.approx(law(20.0), rel=1e-12)
    t = math.log(20 / 16) / math.log(2)
    assert sd == pytest.approx((1 - t) * 0.2 + t * 0.4)
    assert _at_l0(cells, 8.0)[0] == pytest.approx(law(8.0))
    assert _at_l0(cells, 7.9) is None and _at_l0(cells, 33.0) is None


def test_matched_moves_to_the_references_l0_when_the_kind_is_beyond_its_range():
    ref_law = lambda l0: 1.0 * l0 ** -1.0  # noqa: E731
    kind_law = lambda l0: 0.5 * l0 ** -1.0  # noqa: E731
    ref = [(l0, ref_law(l0), 0.01) for l0 in (8.0, 16.0, 32.0, 64.0)]
    kind = [(l0, kind_law(l0), 0.02) for l0 in (8.5, 17.0, 34.0, 72.0)]
    # inside the reference's range: the reference interpolated to the kind's L0
    at = _matched(kind[1], kind, ref)
    assert at[:3] == kind[1] and at[3] == pytest.approx(ref_law(17.0)) and at[4] == pytest.approx(0.01)
    # L0 72 is beyond the reference's 64: both at 64, the kind interpolated there, not extrapolated
    l0, mine, mine_sd, theirs, theirs_sd = _matched(kind[3], kind, ref)
    assert (l0, theirs, theirs_sd) == (64.0, ref_law(64.0), 0.01)
    assert mine == pytest.approx(kind_law(64.0)) and mine_sd == pytest.approx(0.02)
    # the kind's own cells do not reach the reference's nearest L0 either: nothing to compare
    assert _matched((100.0, 0.005, 0.001), [(80.0, 0.006, 0.001), (100.0, 0.005, 0.001)], ref) is None
    assert _matched((20.0, 0.05, 0.01), [(20.0, 0.05, 0.01)], []) is None  # no reference cells yet


def test_family_means_average_each_family_at_k1_k5_and_the_ceiling():
    def label(family, k1, k5, ceiling):
        return {"family": family, "ceiling": {"accuracy": ceiling},
                "sparse": {"1": {"accuracy": k1}, "2": {"accuracy": 0.0}, "5": {"accuracy": k5}}}

    got = _family_means([label("word", 0.6, 0.8, 0.9), label("word", 0.8, 1.0, 1.0),
                         label("first letter", 0.5, 0.7, 0.75)])
    assert got == pytest.approx({"word_k1": 0.7, "word_k5": 0.9, "word_ceiling": 0.95,
                                 "first letter_k1": 0.5, "first letter_k5": 0.7,
                                 "first letter_ceiling": 0.75})


def test_quality_rows_take_first_letter_columns_from_their_letters_row():
    old = {"id": "probes:probe_seed=0,a=1", "token type_k1": 0.7, "absorption": 0.03, "first letter_k1": 0.72}
    new = {"id": "probes:probe_seed=0,a=2", "absorption": 0.05, "first letter_k1": 0.6,
           "letter_negatives": "identifiers of other letters"}
    bare = {"id": "probes:probe_seed=0,a=3", "absorption": 0.02, "first letter_k1": 0.7}
    again = {"id": "letters:probe_seed=0,a=1", "absorption": 0.04, "first letter_k1": 0.65}
    got = _with_letters([old, new, bare], {again["id"]: again})
    assert (got[0]["token type_k1"], got[0]["absorption"], got[0]["first letter_k1"]) == (0.7, 0.04, 0.65)
    assert (got[1]["absorption"], got[1]["first letter_k1"]) == (0.05, 0.6)  # probed with the new negatives
    assert got[2]["absorption"] is None and got[2]["first letter_k1"] is None  # old negatives: not shown


def test_l1_for_l0_inverts_a_power_law_and_keeps_the_nearest_outside():
    """L0 = 10 / sqrt(L1): log-log interpolation between bracketing coefficients is exact, so
    L0 = 50 needs L1 = (10 / 50)^2 = 0.04; a target beyond every tried L0 takes the nearest."""
    rows = [{"l1_coefficient": v, "l0": 10 / math.sqrt(v)} for v in (0.01, 0.1, 1.0)]
    assert l1_for_l0(rows, 50) == pytest.approx(0.04, abs=1e-4)
    assert l1_for_l0(rows, 500) == 0.01


def test_bracket_l1_steps_out_until_l0_k_is_bracketed_then_interpolates():
    """L0 = 10 / sqrt(L1): from (0.01, 0.02) (L0 100 and 71) L0 = 25 needs L1 0.16, three x2
    steps up; from (0.5,) alone two steps down; `extend` bounds the steps (then the nearest)."""
    tried: list[list[float]] = []

    def run(l1s):
        tried.append(list(l1s))
        return [{"l1_coefficient": v, "l0": 10 / math.sqrt(v)} for v in l1s]

    l1, rows = bracket_l1(run, [0.01, 0.02], 25, 3)
    assert l1 == pytest.approx(0.16, abs=1e-4) and tried[-1] == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert [r["l1_coefficient"] for r in rows] == tried[-1]
    assert bracket_l1(run, [0.5], 25, 3)[0] == pytest.approx(0.16, abs=1e-4)
    assert tried[-1] == [0.125, 0.25, 0.5]
    assert bracket_l1(run, [0.01, 0.02], 25, 1)[0] == 0.04  # one step allowed: the nearest tried


def _cell(allocator: str, hook: str, k: int, lr: float, fvu: float, l0: float, dead: float = 0.0,
          seed: int = 0, **extra) -> dict:
    """A fully evaluated grid row of the study's size and budget (FULL)."""
    return {"id": f"eval:{allocator},{hook},{k},{lr},{seed},{extra}", "allocator": allocator, "hook": hook,
            "k": k, "lr": lr, "seed": seed, "aux": "auxk", "n_latents": 512, "tokens": 2_000_000,
            "fvu": fvu, "l0": l0, "dead_frac": dead, **extra}


def test_per_k_lrs_picks_each_tuned_cell_and_leaves_untuned_cells_to_the_k32_lr():
    rows = [
        # jumprelu k = 8: 3.2e-2 leaves 32% dead, 8e-3 overshoots L0 by 25%: 1.6e-2 wins
        _cell("jumprelu", "b1", 8, 3.2e-2, 0.078, 8.2, dead=0.32),
        _cell("jumprelu", "b1", 8, 1.6e-2, 0.080, 8.1),
        _cell("jumprelu", "b1", 8, 8e-3, 0.070, 10.0), _cell("jumprelu", "b1", 8, 4e-3, 0.095, 8.0),
        # the other seeds, the variants and an n = 2048 run never vote, even with a lower FVU
        _cell("jumprelu", "b1", 8, 4e-3, 0.010, 8.0, seed=1),
        _cell("jumprelu", "b1", 8, 2e-3, 0.010, 8.0, aux="aux_zipf"),
        _cell("jumprelu", "b1", 8, 2e-3, 0.010, 8.0, n_latents=2048),
        # one lr only (the study at the k = 32 lr): not a tuned cell
        _cell("jumprelu", "b1", 16, 3.2e-2, 0.045, 16.3, dead=0.11),
        _cell("jumprelu", "b1", 16, 1.6e-2, 0.030, 16.0, seed=1),
        # the same kind and k on another hook is its own cell
        _cell("jumprelu", "b3", 8, 3.2e-2, 0.128, 8.1, dead=0.02),
        _cell("jumprelu", "b3", 8, 1.6e-2, 0.131, 8.0),
        _cell("mutual_choice", "b1", 8, 3.2e-2, 0.072, 8.1, dead=0.18),
        _cell("mutual_choice", "b1", 8, 1.6e-2, 0.074, 8.0, dead=0.06),
        {"id": "fvu:sweep", "allocator": "topk", "k": 8, "lr": 1.0, "fvu": 0.0, "l0": 8.0, "dead_frac": 0.0},
    ]
    # mutual_choice has no eligible lr: pick_lr's fallback (lowest FVU of all), and next_lr goes down
    assert per_k_lrs(rows, FULL) == {("jumprelu", "b1", 8): 1.6e-2, ("jumprelu", "b3", 8): 3.2e-2,
                                     ("mutual_choice", "b1", 8): 3.2e-2}


def test_next_lr_extends_past_the_edge_holding_the_choice_and_down_when_none_is_eligible():
    grid = [1.6e-2, 3.2e-2]
    lower_wins = [_row(1.6e-2, 0.080, 8.1, k=8), _row(3.2e-2, 0.078, 8.2, dead=0.32, k=8)]
    assert next_lr(grid, lower_wins, 0.05, 0.1) == 8e-3
    upper_wins = [_row(1.6e-2, 0.080, 8.1, k=8), _row(3.2e-2, 0.070, 8.2, dead=0.02, k=8)]
    assert next_lr(grid, upper_wins, 0.05, 0.1) == 6.4e-2
    # none within the caps: down (the fallback pick would be 3.2e-2, the top edge: not up)
    dead = [_row(1.6e-2, 0.080, 8.1, dead=0.2, k=8), _row(3.2e-2, 0.078, 8.2, dead=0.32, k=8)]
    assert next_lr(grid, dead, 0.05, 0.1) == 8e-3
    inside = [_row(8e-3, 0.09, 8.0, k=8), *lower_wins]
    assert next_lr([8e-3, *grid], inside, 0.05, 0.1) is None


def test_report_keeps_the_chosen_lr_of_a_tuned_cell_and_every_lr_elsewhere():
    per_k = {("jumprelu", "b1", 8): 1.6e-2}
    row = {"allocator": "jumprelu", "hook": "b1", "k": 8, "lr": 3.2e-2, "variant": "auxk"}
    assert not _at_study_lr(row, per_k)
    assert _at_study_lr({**row, "lr": 1.6e-2}, per_k)
    assert _at_study_lr({**row, "k": 16}, per_k) and _at_study_lr({**row, "hook": "b3"}, per_k)
    assert _at_study_lr({**row, "variant": "aux_zipf"}, per_k)
