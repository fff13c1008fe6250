"""The features-against-neurons study's L1 steering for relu (benchmarks/circuit_faithfulness.py
`steered`, `steered_sweep`): each lr and budget gets the L1 that brings held-out L0 to K, and
relu's lr is chosen by the same rule as the budget allocators' -- against a fake trainer whose L0
falls as a known power of L1."""

import math
from argparse import Namespace

import pytest

import benchmarks.circuit_faithfulness as cf


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")  # the script imports its sibling as `allocators`


def _l0(lr: float, l1: float, tokens: int) -> float:
    """L0 = c / sqrt(L1), c shrinking with the budget (relu's L0 drifts down as it trains on)."""
    return 6.4 * math.sqrt(cf.TOKENS / tokens) / math.sqrt(l1) * (lr / 4e-3) ** 0.1


def _fvu(lr: float) -> float:
    return 0.05 + (math.log2(lr / 4e-3)) ** 2 * 0.01  # best at 4e-3


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A study whose trainings are the power law above (dead latents only past lr 1e-2)."""
    args = Namespace(results=tmp_path / "results.jsonl", work=tmp_path, workers=1)
    trained: list[dict] = []

    def run_jobs(a, jobs):
        for j in jobs:
            if j["id"] not in cf.done(a.results):
                dead = 0.2 if j["lr"] > 1e-2 else 0.0
                sites = {h: {"fvu": _fvu(j["lr"]), "l0": 32.0, "dead_frac": dead} for h in cf.HOOKS}
                row = {**j, "dir": "d", "sites": sites, "fvu": _fvu(j["lr"]),
                       "l0": round(_l0(j["lr"], j["l1"], j["tokens"]), 2), "dead_frac": dead}
                cf.append(a.results, row)
                trained.append(row)
        return cf.done(a.results)

    monkeypatch.setattr(cf, "run_jobs", run_jobs)
    return args, trained


def test_each_lr_and_budget_gets_the_l1_for_l0_k(fake):
    args, trained = fake
    row = cf.steered(args, "relu", 4e-3, cf.TOKENS, "study")
    # L0 = 6.4 / sqrt(L1) = 32 at L1 = 0.04, bracketed by the first two tries (0.025, 0.05)
    assert row["l1"] == pytest.approx(0.04, abs=2e-4) and abs(row["l0"] / cf.K - 1) < 0.01
    assert [r["l1"] for r in trained] == [0.025, 0.05, row["l1"]]
    assert all(r["id"].startswith("study:") for r in trained)
    longer = cf.steered(args, "relu", 4e-3, 4 * cf.TOKENS, "plateau")  # L0 halves: L1 0.01
    assert longer["l1"] == pytest.approx(0.01, abs=1e-4) and longer["tokens"] == 4 * cf.TOKENS
    assert cf.steered(args, "relu", 4e-3, cf.TOKENS, "study") == row  # on K already: nothing trains
    assert len(trained) == 3 + len(cf.runs_at(cf.done(args.results), "relu", 4e-3, 4 * cf.TOKENS))


def test_a_run_already_near_k_is_kept_and_one_off_k_brackets_from_its_l1(fake):
    args, trained = fake
    cf.run_jobs(args, [cf.train_job("plateau", "relu", 4e-3, 0.04, 0, cf.HOOKS, 2 * cf.TOKENS)])
    row = cf.steered(args, "relu", 4e-3, 2 * cf.TOKENS, "plateau")  # L0 22.6: off K by 29%
    assert trained[1]["l1"] == 0.02  # bracketed from the tried L1 by one x2 step down
    assert abs(row["l0"] / cf.K - 1) < 0.01 and row["l1"] == pytest.approx(0.02, abs=1e-4)


def test_relu_lr_is_chosen_by_the_same_rule(fake):
    args, _ = fake
    sites = list(cf.HOOKS)
    lr, l1, tried = cf.steered_sweep(args, sites, "relu")
    assert lr == 4e-3 and [r["lr"] for r in tried] == list(cf.LRS)  # bracketed by the first grid
    assert all(abs(r["l0"] / cf.K - 1) <= cf.L0_TOLERANCE for r in tried)
    assert l1 == next(r["l1"] for r in tried if r["lr"] == 4e-3)


def test_the_report_takes_each_lr_and_budget_at_its_own_l1(fake):
    """The sweep shows relu's run at each lr's chosen L1, not its bracketing runs; the budget
    table takes each budget's run nearest L0 = K; the CPRs are that run's circuits."""
    args, _ = fake
    lr, l1, tried = cf.steered_sweep(args, list(cf.HOOKS), "relu")
    choice = {"allocator": "relu", "lr": lr, "l1": l1, "l1s": [[r["lr"], r["l1"]] for r in tried]}
    rows = list(cf.done(args.results).values())
    assert [(r["lr"], r["l1"]) for r in cf.sweep_rows(rows, choice)] == [(r["lr"], r["l1"]) for r in tried]
    assert len(rows) > len(tried)  # the bracketing runs are in the results but not in the sweep
    far = cf.steered(args, "relu", lr, 4 * cf.TOKENS, "plateau", (l1,))
    rows = list(cf.done(args.results).values())
    runs = cf.by_budget(rows, choice)
    assert sorted(runs) == [cf.TOKENS, 4 * cf.TOKENS] and runs[4 * cf.TOKENS] == far
    assert len(cf.runs_at(cf.done(args.results), "relu", lr, 4 * cf.TOKENS)) > 1  # bracketed: L0 halved
    assert abs(far["l0"] / cf.K - 1) <= cf.L0_TOLERANCE
    circuit = {"id": "c", "stage": "circuit", "basis": "relu", "seed": 0, "lr": lr, "l1": far["l1"],
               "tokens": far["tokens"], "task": "ioi", "cpr": 0.9}
    assert cf.budget_cpr([*rows, circuit], far) == {"ioi": 0.9}
    assert cf.budget_cpr([*rows, circuit], runs[cf.TOKENS]) == {}


def test_a_first_try_near_k_is_kept_without_bracketing(fake):
    """From one start L1 whose L0 is within the tolerance (6.4 / sqrt(0.042) = 31.2), nothing
    else trains: a bracket around it would only buy the last few percent of L0."""
    args, trained = fake
    row = cf.steered(args, "relu", 4e-3, cf.TOKENS, "study", (0.042,))
    assert [r["l1"] for r in trained] == [0.042] and row["l1"] == 0.042
