"""The task models' training text holds what their recipes claim: tasks-4l's is unchanged,
tasks-4l-v2's has greater-than starts at 00 and 01, copy rows after the warm-up, and packed rows,
and tasks-4l-v3's greater-than end years lie just above the start, in half the task documents."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import re

import pytest
import torch

from saelab import tasks, zoo
from saelab.errors import SaelabError
from saelab.zoo import MODELS_DIR, RECIPES
from saelab.zoo import task_corpus as corpus

V2, V3 = RECIPES["tasks-4l-v2"], RECIPES["tasks-4l-v3"]
GT = re.compile(r"from the year (\d\d)(\d\d) to the year (\d\d)(\d\d)\.")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODELS_DIR / "tasks-4l")


def _spans(row: list[int], eot: int) -> list[list[int]]:
    """The EOT-separated spans of a row that are closed by an EOT."""
    cuts = [i for i, t in enumerate(row) if t == eot]
    return [row[a + 1:b] for a, b in itertools.pairwise(cuts) if b > a + 1]


def test_tasks_4l_text_is_what_the_shipped_model_saw(tokenizer):
    """Digest of the first task and copy rows, recorded from the code tasks-4l was built with:
    the v2 options default to off and change nothing of it."""
    h = hashlib.sha256()
    for r in itertools.islice(corpus._task_rows(tokenizer, 96, 0), 64):
        h.update(str(r).encode())
    for r in itertools.islice(corpus.copy_rows(tokenizer, 96, 0), 16):
        h.update(str(r).encode())
    assert h.hexdigest() == "4f82325de8535b3a3eda4d45b6e9a0b375e20e1479dc5fda4b339b87d974dd08"


def test_v2_text_is_what_the_shipped_model_saw(tokenizer):
    """Digest of v2's first task rows, recorded from the code tasks-4l-v2 was built with (before
    `gt_end_years` existed): its default, "uniform", changes nothing of it."""
    h = hashlib.sha256()
    for r in itertools.islice(corpus._task_rows(tokenizer, 96, 0, gt_all_starts=True,
                                                pack_rows=True), 64):
        h.update(str(r).encode())
    assert h.hexdigest() == "46a4e13a214f87d2e12e441826a1d85b42b7367142ae70b445feca0770cf3384"


def _greater_than_years(all_starts: bool, n: int = 3000) -> list[tuple[int, int]]:
    docs = itertools.islice(corpus.documents(0, list(tasks.WORDS), all_starts), 4 * n)
    years = []
    for doc in docs:
        m = GT.search(doc)
        if m:
            assert m[1] == m[3] and m[2] < m[4]  # same century, the end after the start
            years.append((int(m[2]), int(m[4])))
    return years


def test_v2_greater_than_starts_cover_the_counterfactuals():
    """The task's counterfactual starts at 01; v2's text starts at every year 00-98 (tasks-4l's
    only at 02-98), and after 01 every end year 02-99 occurs."""
    assert V2.gt_all_starts and not RECIPES["tasks-4l"].gt_all_starts
    old, new = _greater_than_years(False), _greater_than_years(True)
    assert {s for s, _ in old} <= set(range(2, 99))
    assert {s for s, _ in new} == set(range(99))
    rng = random.Random(0)
    docs = (corpus._doc_greater_than_any_start(rng) for _ in range(100_000))
    ends = {m[4] for m in map(GT.search, docs) if m[2] == "01"}
    assert ends == {f"{y:02d}" for y in range(2, 100)}


def test_v3_greater_than_ends_are_near_the_start():
    """v3's end year is the start plus a geometric gap (stop chance 0.2 a year, capped at 99):
    gap 1 in ~20% of documents, mean gap ~5 (less, from the cap at 99), every start 00-98; the
    v2 text is unchanged (`test_v2_text_is_what_the_shipped_model_saw`)."""
    assert (V3.gt_end_years, V2.gt_end_years) == ("near", "uniform") and V3.gt_all_starts
    docs = itertools.islice(corpus.documents(0, list(tasks.WORDS), True, "near"), 40_000)
    years = [(int(m[2]), int(m[4])) for m in map(GT.search, docs) if m]
    gaps = [e - s for s, e in years]
    assert {s for s, _ in years} == set(range(99)) and all(s < e <= 99 for s, e in years)
    assert abs(gaps.count(1) / len(gaps) - 0.2) < 0.02
    assert 4.0 < sum(gaps) / len(gaps) < 5.0
    # reference: the capped geometric's mean, computed over the starts drawn
    ref = sum(sum(min(k, 99 - s) * 0.2 * 0.8 ** (k - 1) for k in range(1, 400)) for s, _ in years)
    assert abs(sum(gaps) - ref) / ref < 0.03
    after_01 = [e for s, e in years if s == 1]
    assert max(after_01) < 60 and sum(e <= 11 for e in after_01) / len(after_01) > 0.8



@pytest.mark.parametrize("all_starts, ends", [(True, "far"), (False, "near")])
def test_greater_than_end_years_refused(all_starts, ends):
    """An unknown shape, or near ends without every start, is one clear error."""
    with pytest.raises(SaelabError, match="gt_end_years"):
        next(corpus.documents(0, list(tasks.WORDS), all_starts, ends))


def _kinds(docs) -> list[str]:
    """Each document's task, told apart by its text."""
    return ["gt" if GT.search(d) else "doc" if '"""' in d else "other"
            for d in docs]


def test_greater_than_weight_sets_its_share_of_documents():
    """Weight 3 puts greater-than in half the draws (3 of 6), docstring in a sixth; weight 1 is
    the old uniform draw document for document (v2's text digest checks that for v2 as well)."""
    assert (V3.gt_weight, V2.gt_weight) == (3, 1)
    n, words = 30_000, list(tasks.WORDS)
    heavy = _kinds(itertools.islice(corpus.documents(0, words, True, "near", 3), n))
    assert abs(heavy.count("gt") / n - 1 / 2) < 0.015
    assert abs(heavy.count("doc") / n - 1 / 6) < 0.015
    uniform = list(itertools.islice(corpus.documents(0, words, True, "near"), 2000))
    assert list(itertools.islice(corpus.documents(0, words, True, "near", 1), 2000)) == uniform
    assert abs(_kinds(uniform).count("gt") / 2000 - 1 / 4) < 0.04


@pytest.mark.parametrize("weight", [0, 1.5])
def test_greater_than_weight_refused(weight):
    """A weight that is not a whole number >= 1 is one clear error."""
    with pytest.raises(SaelabError, match="gt_weight"):
        next(corpus.documents(0, list(tasks.WORDS), True, "near", weight))


def test_v2_packed_rows_replace_padding_with_a_repeat(tokenizer):
    """Same documents as unpacked rows; the EOT padding becomes k random tokens twice."""
    assert V2.pack_rows
    eot = tokenizer.eos_token_id
    plain = corpus._task_rows(tokenizer, 96, 0, gt_all_starts=True)
    packed = corpus._task_rows(tokenizer, 96, 0, gt_all_starts=True, pack_rows=True)
    filled = 0
    for a, b in itertools.islice(zip(plain, packed, strict=True), 200):
        pad = len(a) - next(i for i in range(len(a) - 1, -1, -1) if a[i] != eot) - 2
        body = len(a) - pad
        assert b[:body] == a[:body] and len(b) == len(a) == 96
        k = pad // 2 if pad >= 4 else 0
        tail = b[body:]
        assert tail[:k] == tail[k:2 * k] and tail[2 * k:] == [eot] * (pad - 2 * k)
        assert eot not in tail[:2 * k]
        filled += 2 * k
    assert filled > 200 * 10  # the padding was a large share of the rows


def test_v2_keeps_copy_rows_after_the_warm_up(tokenizer):
    """After `copy_steps` batches, each batch is task rows, then round(copy_fraction * batch)
    copy rows (the copy stream continued), then stdlib rows."""
    n_copy, n_std = round(V2.copy_fraction * 32), round(V2.stdlib_fraction * 32)
    assert n_copy >= 4
    stream = corpus.batches(tokenizer, 32, 96, 0, V2.stdlib_fraction, copy_steps=1,
                            copy_fraction=V2.copy_fraction, pack_rows=True, gt_all_starts=True)
    copying = corpus.copy_rows(tokenizer, 96, 0)
    task = corpus._task_rows(tokenizer, 96, 0, gt_all_starts=True, pack_rows=True)
    assert next(stream).tolist() == [next(copying) for _ in range(32)]  # the warm-up
    for batch in itertools.islice(stream, 2):
        n_task = 32 - n_copy - n_std
        assert batch[:n_task].tolist() == [next(task) for _ in range(n_task)]
        assert batch[n_task:32 - n_std].tolist() == [next(copying) for _ in range(n_copy)]
        spans = _spans(batch[n_task].tolist(), tokenizer.eos_token_id)
        assert spans and all(s[:len(s) // 2] == s[len(s) // 2:] for s in spans)


def test_prob_diff_and_removed_share():
    """Hanna et al.'s metric against a hand computation; the removed share of a difference."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4]]))
    tok = tasks.TaskTokens(*(torch.zeros(2, 1, dtype=torch.long),) * 4,
                           answer=torch.tensor([[0, 1], [2, 2]]),
                           wrong=torch.tensor([[2, 3], [0, 1]]),
                           answer_mask=torch.tensor([[True, True], [True, False]]),
                           wrong_mask=torch.tensor([[True, True], [True, True]]))
    got = tasks.prob_diff(logits, tok)
    assert torch.allclose(got, torch.tensor([0.7 - 0.3, 0.4 - 0.2]))
    assert corpus._removed(4.0, 1.0) == 0.75 and corpus._removed(0.0, 1.0) is None


@pytest.mark.parametrize("recipe, later_fields",
                         [(V2, {"gt_end_years": "uniform", "gt_weight": 1}), (V3, {})])
def test_shipped_task_models_are_their_recipes(recipe, later_fields):
    """The shipped tasks-4l-v2 and v3 were built from their recipes as they stand (a recipe
    change needs a rebuild; fields added after a build hold their defaults), and each card holds
    the task numbers of 200 fresh prompts per task."""
    card = zoo.card(recipe.name)
    later = {f.name: f.default for f in dataclasses.fields(zoo.ZooRecipe)
             if f.name not in card["recipe"]}
    assert later == later_fields
    assert {**card["recipe"], **later} == dataclasses.asdict(recipe)
    assert set(card["tasks"]) == set(tasks.GENERATORS)
    assert all(t["prompts"] == corpus.EVAL_PROMPTS == 200 for t in card["tasks"].values())
