"""Circuit tasks: generators (text level and with the zoo task model's tokenizer), the task-file
loader's line-by-line errors, and the logit-difference metric against a hand computation."""

import json
import re

import pytest
import torch

from saelab import tasks
from saelab.errors import SaelabError

TASK_MODEL = "zoo:tasks-4l"


def _word_diffs(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = re.findall(r"\w+|[^\w\s]", a), re.findall(r"\w+|[^\w\s]", b)
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb, strict=True) if x != y]


def test_ioi_text():
    t = tasks.generate("ioi", 50, seed=3)
    assert len(t) == 50
    for p, c, (a,), (w,) in zip(t.prompts, t.counterfactuals, t.answers, t.wrongs, strict=True):
        io, s = a.strip(), w.strip()
        assert a.startswith(" ") and io in tasks.NAMES and s in tasks.NAMES and io != s
        assert p.count(s) == 2 and p.count(io) == 1  # S repeated, IO once
        (old, new), = _word_diffs(p, c)  # exactly one word differs: S2 -> a third name
        assert old == s and new in tasks.NAMES and new not in (io, s)
        assert c.count(s) == 1


def test_greater_than_text():
    t = tasks.generate("greater-than", 40, seed=1)
    for p, c, ans, wrong in zip(t.prompts, t.counterfactuals, t.answers, t.wrongs, strict=True):
        start = re.search(r"year (\d\d)(\d\d) to the year (\d\d)$", p)
        assert start and start.group(1) == start.group(3)
        yy = int(start.group(2))
        assert sorted(ans + wrong) == list(tasks.YEARS)  # a partition of 00..99
        assert all(int(a) > yy for a in ans) and all(int(w) <= yy for w in wrong)
        assert c == p.replace(f"year {start.group(1)}{start.group(2)} ", f"year {start.group(1)}01 ")
        assert c != p


def test_docstring_text():
    t = tasks.generate("docstring", 30, seed=2)
    for p, c, (a,), wrong in zip(t.prompts, t.counterfactuals, t.answers, t.wrongs, strict=True):
        args = re.match(r"def \w+\(self, ([^)]*)\):", p).group(1).split(", ")
        documented = re.findall(r":param (\w+):", p)
        assert args[:len(documented)] == documented and p.endswith(":param")
        assert a.strip() == args[len(documented)]
        assert {w.strip() for w in wrong} == set(args) - {a.strip()}
        # only the def line differs, and there only the argument names
        assert p.splitlines()[1:] == c.splitlines()[1:]
        diffs = _word_diffs(p.splitlines()[0], c.splitlines()[0])
        assert {old for old, _ in diffs} == set(args) and not set(args) & {new for _, new in diffs}


def test_induction_text():
    t = tasks.generate("induction", 30, seed=4)
    for p, c, (a,), (w,) in zip(t.prompts, t.counterfactuals, t.answers, t.wrongs, strict=True):
        words = p.split()
        (old, new), = _word_diffs(p, c)
        assert old == a.strip() and new == w.strip()
        # the prompt's last word occurred before, followed by the answer
        last = words[-1]
        first = words.index(last)
        assert words[first + 1] == a.strip()


def test_generators_seeded_and_unknown_task():
    assert tasks.generate("ioi", 5, seed=7) == tasks.generate("ioi", 5, seed=7)
    assert tasks.generate("ioi", 5, seed=7) != tasks.generate("ioi", 5, seed=8)
    with pytest.raises(SaelabError, match="unknown task 'ioj'.*ioi, greater-than"):
        tasks.generate("ioj", 5)
    with pytest.raises(SaelabError, match="positive"):
        tasks.generate("ioi", 0)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from saelab.zoo import model_dir

    return AutoTokenizer.from_pretrained(str(model_dir(TASK_MODEL)))


@pytest.mark.parametrize("name", list(tasks.GENERATORS))
def test_single_tokens_for_the_task_model(tokenizer, name):
    t = tasks.generate(name, 100, seed=5)
    tok = tasks.tokenize(t, tokenizer)  # raises if an answer is not a single token
    assert tok.answer_mask.sum() == sum(len(a) for a in t.answers)
    unk = tokenizer.unk_token_id
    assert not (tok.pos == unk).any() and not (tok.cf == unk).any()
    # counterfactuals differ minimally: same length, few differing tokens
    assert torch.equal(tok.pos_len, tok.cf_len)
    differ = (tok.pos != tok.cf).sum(1)
    assert differ.min() >= 1
    assert differ.max() <= (6 if name == "docstring" else 1)


def test_tokenize_rejects_multi_token_answers(tokenizer):
    t = tasks.Task("mine", ("a b",), ("a c",), ((" Mary John",),), ((" b",),))
    with pytest.raises(SaelabError, match="prompt 0: answer ' Mary John' is 2 tokens"):
        tasks.tokenize(t, tokenizer)


def test_logit_diff_and_correct_by_hand():
    t = tasks.Task("x", ("p", "q"), ("p", "q"), (("a",), ("a", "b")), (("b", "c"), ("c",)))
    tok = tasks.TaskTokens(
        pos=torch.zeros(2, 3, dtype=torch.long), cf=torch.zeros(2, 3, dtype=torch.long),
        pos_len=torch.tensor([3, 2]), cf_len=torch.tensor([3, 2]),
        answer=torch.tensor([[0, 0], [0, 1]]), wrong=torch.tensor([[1, 2], [2, 2]]),
        answer_mask=torch.tensor([[True, False], [True, True]]),
        wrong_mask=torch.tensor([[True, True], [True, False]]),
    )
    assert len(t) == 2
    logits = torch.randn(2, 3, 3)
    last = tasks.last_logits(logits, tok.pos_len)
    assert torch.equal(last, torch.stack([logits[0, 2], logits[1, 1]]))
    ld = tasks.logit_diff(last, tok)
    expect0 = last[0, 0] - (last[0, 1] + last[0, 2]) / 2
    expect1 = (last[1, 0] + last[1, 1]) / 2 - last[1, 2]
    assert torch.allclose(ld, torch.stack([expect0, expect1]))
    ok = tasks.correct(last, tok)
    assert ok[0] == (last[0, 0] > last[0, 1:].max()) and ok[1] == (last[1, :2].max() > last[1, 2])


def test_task_file(tmp_path):
    good = tmp_path / "mine.jsonl"
    rows = [{"prompt": "a b a", "counterfactual": "a c a", "answer": " b", "wrong": [" c", " d"]},
            {"prompt": "x y x", "counterfactual": "x z x", "answer": [" y"], "wrong": " z"}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = tasks.load_task_file(good)
    assert t.name == "mine" and t.prompts == ("a b a", "x y x")
    assert t.answers == ((" b",), (" y",)) and t.wrongs == ((" c", " d"), (" z",))


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2 is not valid JSON"),
    ('["a"]', "line 2: expected an object"),
    ('{"prompt": "a", "counterfactual": "b", "answer": " c"}', "line 2: missing wrong"),
    ('{"prompt": "", "counterfactual": "b", "answer": " c", "wrong": " d"}', "line 2: prompt must"),
    ('{"prompt": "a", "counterfactual": "b", "answer": [], "wrong": " d"}', "line 2: answer must"),
    ('{"prompt": "a", "counterfactual": "b", "answer": " c", "wrong": [" c"]}', "wrong share"),
])
def test_task_file_bad_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    ok = '{"prompt": "a", "counterfactual": "b", "answer": " c", "wrong": " d"}'
    f.write_text(ok + "\n" + line + "\n" + ok + "\n")
    with pytest.raises(SaelabError, match=message) as e:
        tasks.load_task_file(f)
    assert "\n" not in str(e.value)


def test_task_file_missing_or_empty(tmp_path):
    with pytest.raises(SaelabError, match="does not exist"):
        tasks.load_task_file(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(SaelabError, match="has no tasks"):
        tasks.load_task_file(tmp_path / "e.jsonl")


def test_task_model_copy_warmup_then_the_mix(tokenizer):
    from saelab.zoo import task_corpus as corpus

    stream = corpus.batches(tokenizer, 4, 48, seed=0, stdlib_fraction=0.25, copy_steps=2)
    eot = tokenizer.eos_token_id
    for _ in range(2):  # copy rows: no padding, each EOT-separated span is some words twice
        batch = next(stream)
        assert batch.shape == (4, 48) and (batch != tokenizer.unk_token_id).all()
        for row in batch.tolist():
            cuts = [i for i, t in enumerate(row) if t == eot]
            assert cuts[0] == 0 and len(cuts) >= 2
            for a, b in zip(cuts, cuts[1:], strict=False):  # whole spans between EOTs
                ids = row[a + 1:b]
                half = len(ids) // 2
                assert 10 <= len(ids) <= 40 and ids[:half] == ids[half:]
    mixed = next(stream)  # then the task mix: the stdlib row and padded task rows are back
    assert mixed.shape == (4, 48) and (mixed[:3] == eot).sum(1).min() >= 2


def test_prob_diff_by_hand():
    """Hanna et al.'s metric on a 5-token vocabulary: softmax mass on the answers minus mass on
    the wrong tokens, the softmax over the whole vocabulary (token 4 is neither)."""
    import math

    logits = [0.0, 1.0, 2.0, -1.0, 0.5]
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    tok = tasks.TaskTokens(
        pos=torch.zeros(2, 1, dtype=torch.long), cf=torch.zeros(2, 1, dtype=torch.long),
        pos_len=torch.tensor([1, 1]), cf_len=torch.tensor([1, 1]),
        answer=torch.tensor([[2, 3], [1, 1]]), wrong=torch.tensor([[0, 1], [0, 0]]),
        answer_mask=torch.tensor([[True, True], [True, False]]),
        wrong_mask=torch.tensor([[True, True], [True, False]]),
    )
    got = tasks.prob_diff(torch.tensor([logits, logits]), tok)
    assert got.tolist() == pytest.approx([p[2] + p[3] - p[0] - p[1], p[1] - p[0]], abs=1e-6)
    assert tasks.metric("prob-diff") is tasks.prob_diff and tasks.metric("logit-diff") is tasks.logit_diff
    assert tasks.default_metric("greater-than") == "prob-diff" and tasks.default_metric("ioi") == "logit-diff"
    with pytest.raises(SaelabError, match="unknown task metric 'kl'; use logit-diff or prob-diff"):
        tasks.metric("kl")


def test_distinct_texts_match_enumeration_on_small_word_lists(monkeypatch):
    """The counted numbers of distinct texts against the texts a generator actually makes, with
    word lists small enough that many draws see every text."""
    monkeypatch.setattr(tasks, "NAMES", ("Mary", "John", "Alice", "Bob"))
    monkeypatch.setattr(tasks, "IOI_TEMPLATES", tasks.IOI_TEMPLATES[:2])
    monkeypatch.setattr(tasks, "GT_NOUNS", ("war", "siege"))
    monkeypatch.setattr(tasks, "GT_CENTURIES", ("17",))
    for name, expect in (("ioi", (2 * 4 * 3 * 2, 2 * 4 * 3 * 2)), ("greater-than", (2 * 97, 2))):
        assert tasks.distinct_texts(name) == expect
        t = tasks.generate(name, 5000, seed=0)
        assert (len(set(t.prompts)), len(set(t.counterfactuals))) == expect
        assert tasks.capacity(name) == min(expect) and tasks.capacity(name, False) == expect[0]


def test_distinct_texts_of_the_real_generators():
    assert tasks.distinct_texts("greater-than") == (16 * 7 * 97, 16 * 7)  # 112 counterfactuals
    assert tasks.distinct_texts("ioi") == (10 * 40 * 39 * 2, 10 * 40 * 39 * 38)
    for name in ("docstring", "induction"):
        assert min(tasks.distinct_texts(name)) > 10**15
    with pytest.raises(SaelabError, match="unknown task 'ioj'"):
        tasks.distinct_texts("ioj")


@pytest.mark.parametrize("name", list(tasks.GENERATORS))
def test_draw_distinct_every_task(name):
    """Rows whose prompts and counterfactuals are all distinct texts, up to the capacity (all 112
    of greater-than's), and no prompt text is ever a counterfactual text."""
    n = min(tasks.capacity(name), 300)
    t = tasks.draw_distinct(name, n, seed=3)
    assert len(t) == n and len(set(t.prompts + t.counterfactuals)) == 2 * n
    assert t == tasks.draw_distinct(name, n, seed=3)
    many = tasks.generate(name, 2000, seed=1)
    assert not set(many.prompts) & set(many.counterfactuals)
    only_prompts = tasks.draw_distinct(name, 300, seed=3, counterfactuals=False)
    assert len(set(only_prompts.prompts)) == 300


def test_draw_distinct_refuses_more_than_the_capacity_in_one_line():
    with pytest.raises(SaelabError, match=r"task 'greater-than' can make only 112 rows whose prompts "
                       r"and counterfactuals are distinct texts; the rows asked for = 113") as e:
        tasks.draw_distinct("greater-than", 113, seed=0)
    assert "\n" not in str(e.value)
