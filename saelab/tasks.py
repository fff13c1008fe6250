"""Circuit tasks: positive prompts, minimally changed counterfactuals, answers, and a metric.

A task holds, per prompt, the text the model should complete, a counterfactual that differs by
as little as possible yet takes away what the model needs, the answer token(s) and the wrong
token(s). Its metric, read at the last prompt token, is one of `METRICS`:
- logit-diff: mean logit of the answer tokens minus mean logit of the wrong ones (one token each
  for IOI, docstring and induction; for greater-than every year above YY against every year up
  to YY);
- prob-diff: probability mass (softmax over the whole vocabulary) on the answer tokens minus
  mass on the wrong ones; for greater-than this is Hanna et al.'s metric, p(years > YY) -
  p(years <= YY), and it is that task's default (`default_metric`).

Every generator can say how many distinct prompt and counterfactual texts it can make
(`distinct_texts`, counted from its word lists and templates), and `draw_distinct` draws rows
whose texts are all distinct, so a trial's training and held-out sets never share a text.

The generators write text in GPT-2's convention (a word's leading space belongs to it, " Mary"),
after the published setups:
- ioi (Wang et al. 2022): "When Mary and John went to the store, John gave a drink to" -> " Mary",
  wrong " John"; counterfactual: the repeated subject replaced by a third name (their ABC
  distribution), so nothing says which of the first two names is the indirect object.
- greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> any of
  "33".."99", wrong "00".."32" (GPT-2 splits "1732" into "17" "32", so no leading space);
  counterfactual: YY = 01.
- docstring (Heimersheim & Janiak 2023, as for attn-only-4l): a def with six arguments and a
  docstring whose ":param" lines follow the def's order; the answer is the next argument,
  wrong answers the other arguments; counterfactual: the def's arguments renamed.
- induction: a random word sequence repeated; the answer is the word that followed the current
  word in the first copy, wrong the word that replaces it in the counterfactual's first copy.

`--task-file F.jsonl` brings a user's own task: one {"prompt", "counterfactual", "answer",
"wrong"} object a line (answer / wrong: a string or a list of strings), validated line by line.
"""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from saelab.errors import SaelabError

T = TypeVar("T")

NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael",
    "Anna", "Robert", "Kate", "Thomas", "Lisa", "Daniel", "Rachel", "Paul", "Julia", "Mark",
    "Susan", "Peter", "Helen", "George", "Grace", "Henry", "Claire", "Jack", "Emily", "Steven",
    "Karen", "Brian", "Nancy", "Kevin", "Linda", "Jason", "Amy", "Eric", "Sophie", "Adam",
)
# IOI templates in the shape of Wang et al.'s: [A] and [B] introduced, [S] (one of them) acts,
# the other is the indirect object. Written here, not copied.
IOI_TEMPLATES = (
    "When [A] and [B] went to the store, [S] gave a drink to",
    "When [A] and [B] went to the park, [S] gave a ball to",
    "After [A] and [B] went to the office, [S] handed a letter to",
    "Then, [A] and [B] had a long argument, and afterwards [S] said to",
    "While [A] and [B] were working at the school, [S] gave a book to",
    "Friends [A] and [B] found a ring at the house. [S] gave it to",
    "The local big hospital [A] and [B] went to had a bed. [S] offered the bed to",
    "When [A] and [B] got a snack at the restaurant, [S] decided to give it to",
    "After the lunch, [A] and [B] went to the garden. [S] gave a flower to",
    "Then, [A] and [B] were thinking about going to the station. [S] wanted to give a ticket to",
)
GT_NOUNS = (
    "war", "expedition", "project", "journey", "voyage", "reign", "dynasty", "campaign",
    "rebellion", "siege", "contract", "pilgrimage", "occupation", "struggle", "tour", "trial",
)
GT_CENTURIES = tuple(str(c) for c in range(11, 18))
YEARS = tuple(f"{y:02d}" for y in range(100))
# docstring words: argument names and docstring filler, each a single lowercase word
WORDS: tuple[str, ...] = (
    "load", "size", "files", "last", "page", "names", "read", "first", "value", "item",
    "state", "order", "count", "user", "key", "node", "path", "text", "data", "token",
    "group", "block", "field", "index", "label", "model", "image", "shape", "score", "table",
    "query", "result", "source", "target", "limit", "offset", "frame", "width", "height", "color",
    "oil", "column", "piece", "crime", "population", "unit", "dark", "message", "tree", "detail",
    "mine", "sector", "gap", "river", "stone", "paper", "light", "sound", "field", "glass",
)
WORDS = tuple(dict.fromkeys(WORDS))  # de-duplicated, order kept
FUNC_NAMES = ("port", "run", "check", "update", "build", "parse", "render", "fetch", "apply", "merge")


def _take(items: tuple[T, ...], index: list[int]) -> tuple[T, ...]:
    return tuple(items[i] for i in index)


@dataclass(frozen=True)
class Task:
    """A task's prompts, counterfactuals and answers (text, tokenised per model by `tokenize`).

    Fields:
        name: task name (ioi, greater-than, docstring, induction, or the task file's name).
        prompts: positive prompts; the model can predict the answer.
        counterfactuals: one per prompt, minimally changed so that it cannot.
        answers: per prompt, the token string(s) whose logits count for the answer.
        wrongs: per prompt, the token string(s) whose logits count against it.
    """

    name: str
    prompts: tuple[str, ...]
    counterfactuals: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    wrongs: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not n or {len(self.counterfactuals), len(self.answers), len(self.wrongs)} != {n}:
            raise SaelabError(
                f"task {self.name!r} needs equal, non-zero numbers of prompts, counterfactuals, "
                f"answers and wrong answers (got {n}, {len(self.counterfactuals)}, "
                f"{len(self.answers)}, {len(self.wrongs)})"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index) -> Task:
        """The task restricted to the prompts at `index` (a sequence of ints)."""
        index = list(index)
        return Task(self.name, _take(self.prompts, index), _take(self.counterfactuals, index),
                    _take(self.answers, index), _take(self.wrongs, index))


@dataclass
class TaskTokens:
    """A task tokenised for one model; rows are right-padded, so positions stay absolute.

    Fields:
        pos, cf: (P, T) token ids of the prompts and the counterfactuals (BOS first if any).
        pos_len, cf_len: (P,) real lengths; the metric reads the logits at length - 1.
        answer, wrong: (P, A) / (P, W) token ids, padded by repeating the first id.
        answer_mask, wrong_mask: (P, A) / (P, W) bool, True on real entries.
    """

    pos: torch.Tensor
    cf: torch.Tensor
    pos_len: torch.Tensor
    cf_len: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    answer_mask: torch.Tensor
    wrong_mask: torch.Tensor

    def __len__(self) -> int:
        return self.pos.shape[0]

    def rows(self, index: torch.Tensor) -> TaskTokens:
        return TaskTokens(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def _pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return out, mask


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(task: Task, tokenizer, max_length: int | None = None) -> TaskTokens:
    """Token ids of a task for `tokenizer`; every answer and wrong answer must be one token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pos = [bos + _ids(tokenizer, t) for t in task.prompts]
    cf = [bos + _ids(tokenizer, t) for t in task.counterfactuals]
    for kind, rows in (("prompt", pos), ("counterfactual", cf)):
        for i, r in enumerate(rows):
            if len(r) < 1 or (max_length is not None and len(r) > max_length):
                raise SaelabError(
                    f"task {task.name!r} {kind} {i} is {len(r)} tokens; it must be 1.."
                    f"{max_length} tokens for this model"
                )

    def single(words: tuple[str, ...], i: int, kind: str) -> list[int]:
        out = []
        for w in words:
            ids = _ids(tokenizer, w)
            if len(ids) != 1:
                raise SaelabError(
                    f"task {task.name!r} prompt {i}: {kind} {w!r} is {len(ids)} tokens for this "
                    "model's tokenizer; answers and wrong answers must be single tokens"
                )
            out.append(ids[0])
        return out

    answers = [single(a, i, "answer") for i, a in enumerate(task.answers)]
    wrongs = [single(w, i, "wrong answer") for i, w in enumerate(task.wrongs)]
    pos_t, pos_m = _pad(pos, pad)
    cf_t, cf_m = _pad(cf, pad)
    ans_t, ans_m = _pad([a for a in answers], -1)
    wr_t, wr_m = _pad([w for w in wrongs], -1)
    ans_t = torch.where(ans_m, ans_t, ans_t[:, :1])
    wr_t = torch.where(wr_m, wr_t, wr_t[:, :1])
    return TaskTokens(pos_t, cf_t, pos_m.sum(1), cf_m.sum(1), ans_t, wr_t, ans_m, wr_m)


def last_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(P, V) logits at each row's last real position."""
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths.to(logits.device) - 1]


def logit_diff(last: torch.Tensor, tokens: TaskTokens) -> torch.Tensor:
    """(P,) mean answer logit minus mean wrong logit, from (P, V) last-position logits."""
    last = last.float()
    a = (last.gather(1, tokens.answer) * tokens.answer_mask).sum(1) / tokens.answer_mask.sum(1)
    w = (last.gather(1, tokens.wrong) * tokens.wrong_mask).sum(1) / tokens.wrong_mask.sum(1)
    return a - w


def prob_diff(last: torch.Tensor, tokens: TaskTokens) -> torch.Tensor:
    """(P,) probability on the answer tokens minus probability on the wrong ones, from (P, V)
    last-position logits (softmax over the whole vocabulary: Hanna et al.'s metric)."""
    p = last.float().softmax(-1)
    a = (p.gather(1, tokens.answer) * tokens.answer_mask).sum(1)
    w = (p.gather(1, tokens.wrong) * tokens.wrong_mask).sum(1)
    return a - w


METRICS: dict[str, Callable[[torch.Tensor, TaskTokens], torch.Tensor]] = {
    "logit-diff": logit_diff, "prob-diff": prob_diff,
}
# greater-than: on zoo:tasks-4l's 200 card prompts the 01 counterfactual removes 55% of the
# probability difference and 41% of the logit difference (README, "Circuit identification")
TASK_METRICS = {"greater-than": "prob-diff"}


def default_metric(name: str) -> str:
    """The metric a task is scored by unless one is asked for."""
    return TASK_METRICS.get(name, "logit-diff")


def metric(kind: str) -> Callable[[torch.Tensor, TaskTokens], torch.Tensor]:
    """The (P, V) last logits -> (P,) metric function named `kind`."""
    if kind not in METRICS:
        raise SaelabError(f"unknown task metric {kind!r}; use {' or '.join(METRICS)}")
    return METRICS[kind]


def correct(last: torch.Tensor, tokens: TaskTokens) -> torch.Tensor:
    """(P,) bool: the best answer token's logit beats every wrong token's."""
    neg = torch.finfo(last.dtype).min
    a = last.gather(1, tokens.answer).masked_fill(~tokens.answer_mask, neg).amax(1)
    w = last.gather(1, tokens.wrong).masked_fill(~tokens.wrong_mask, neg).amax(1)
    return a > w


# ---- generators ---------------------------------------------------------------------------


def ioi(n: int, seed: int = 0) -> Task:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(IOI_TEMPLATES)
        io, s, c = rng.sample(NAMES, 3)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA and BABA orders
        base = t.replace("[A]", a).replace("[B]", b)
        rows.append((base.replace("[S]", s), base.replace("[S]", c), (" " + io,), (" " + s,)))
    return _task("ioi", rows)


def greater_than(n: int, seed: int = 0) -> Task:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun, cc, yy = rng.choice(GT_NOUNS), rng.choice(GT_CENTURIES), rng.randint(2, 98)
        text = "The {} lasted from the year {}{} to the year {}"
        rows.append((text.format(noun, cc, f"{yy:02d}", cc), text.format(noun, cc, "01", cc),
                     YEARS[yy + 1:], YEARS[:yy + 1]))
    return _task("greater-than", rows)


def docstring_text(func: str, args: list[str], doc: list[str], params: list[tuple[str, str]],
                   open_line: bool = True) -> str:
    """A def with `args` and a docstring with one ':param name: words' line per `params` entry,
    ending (if `open_line`) with an open ':param' line: the prompt form."""
    lines = [f"def {func}(self, {', '.join(args)}):", f'    """{" ".join(doc)}', ""]
    lines += [f"    :param {a}: {w}" for a, w in params]
    return "\n".join(lines + (["    :param"] if open_line else []))


def docstring(n: int, seed: int = 0) -> Task:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 15)
        args, other = words[:6], words[6:12]
        m = rng.randint(2, 4)  # params already documented before the open line
        doc, fill = words[12:15], [" ".join(rng.sample(WORDS, 2)) for _ in range(m)]
        func = rng.choice(FUNC_NAMES)
        params = list(zip(args[:m], fill, strict=True))
        prompt = docstring_text(func, args, doc, params)
        counterfactual = docstring_text(func, other, doc, params)  # the def's args renamed
        wrong = tuple(" " + a for a in args if a != args[m])
        rows.append((prompt, counterfactual, (" " + args[m],), wrong))
    return _task("docstring", rows)


def induction(n: int, seed: int = 0, length: int = 10) -> Task:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = rng.sample(WORDS, length)
        m = rng.randint(length // 2, length - 1)
        replacement = rng.choice([w for w in WORDS if w not in seq])
        changed = seq[:m] + [replacement] + seq[m + 1:]
        prompt = " ".join(seq + seq[:m])
        counterfactual = " ".join(changed + seq[:m])
        rows.append((prompt, counterfactual, (" " + seq[m],), (" " + replacement,)))
    return _task("induction", rows)


def _task(name: str, rows: list[tuple]) -> Task:
    return Task(name, *(tuple(col) for col in zip(*rows, strict=True)))


# ---- how many distinct texts each generator makes ------------------------------------------
# Counted from the generators' choices: each choice below changes the text (the word lists hold
# distinct words, and words are delimited), and prompt texts never equal counterfactual texts
# (IOI's counterfactual has three different names, greater-than's YY is 01, the docstring's def
# arguments differ from its :param names, induction's first copy differs from its second).


def _ioi_texts() -> tuple[int, int]:
    t, n = len(IOI_TEMPLATES), len(NAMES)
    return t * math.perm(n, 2) * 2, t * math.perm(n, 3)  # (IO, S) x ABBA/BABA; (A, B, C)


def _greater_than_texts() -> tuple[int, int]:
    frames = len(GT_NOUNS) * len(GT_CENTURIES)
    return frames * len(range(2, 99)), frames  # the counterfactual keeps only noun and century


def _docstring_texts() -> tuple[int, int]:
    w, f, fills = len(WORDS), len(FUNC_NAMES), len(WORDS) * (len(WORDS) - 1)
    head = f * math.perm(w, 6) * math.perm(w - 6, 3)  # def's arguments, docstring words
    prompts = head * sum(fills ** m for m in range(2, 5))
    cfs = head * sum(math.perm(w - 9, m) * fills ** m for m in range(2, 5))  # + the :param names
    return prompts, cfs


def _induction_texts(length: int = 10) -> tuple[int, int]:
    n = math.perm(len(WORDS), length) * (length - length // 2)  # the sequence, where it stops
    return n, n


DISTINCT: dict[str, Callable[[], tuple[int, int]]] = {
    "ioi": _ioi_texts, "greater-than": _greater_than_texts, "docstring": _docstring_texts,
    "induction": _induction_texts,
}


GENERATORS: dict[str, Callable[..., Task]] = {
    "ioi": ioi, "greater-than": greater_than, "docstring": docstring, "induction": induction,
}


def generate(name: str, n: int, seed: int = 0) -> Task:
    """`n` prompts of a named task, seeded."""
    if name not in GENERATORS:
        raise SaelabError(f"unknown task {name!r}; available: {', '.join(GENERATORS)}, or "
                          "--task-file F.jsonl")
    if n < 1:
        raise SaelabError(f"the number of prompts must be positive, got {n}")
    return GENERATORS[name](n, seed)


def distinct_texts(name: str) -> tuple[int, int]:
    """(distinct prompts, distinct counterfactuals) the generator of task `name` can make."""
    generate(name, 1)  # an unknown name fails as generate's error
    return DISTINCT[name]()


def capacity(source: str | Task, counterfactuals: bool = True) -> int:
    """Rows `draw_distinct` can return: rows whose prompts (and, with `counterfactuals`, also
    counterfactuals) are all distinct texts. A task file's rows are taken in file order, a row
    whose text occurred before left out."""
    if isinstance(source, Task):
        return len(_distinct_rows(source, counterfactuals))
    prompts, cfs = distinct_texts(source)
    return min(prompts, cfs) if counterfactuals else prompts


def check_capacity(source: str | Task, n: int, sizes: str, counterfactuals: bool = True) -> None:
    """One line, before any work, when `n` rows with distinct texts (`sizes` says what adds up
    to `n`) are more than the task can make."""
    cap = capacity(source, counterfactuals)
    if n > cap:
        name, can = (source.name, "has") if isinstance(source, Task) else (source, "can make")
        what = "prompts and counterfactuals" if counterfactuals else "prompts"
        raise SaelabError(
            f"task {name!r} {can} only {cap:,} rows whose {what} are distinct texts; "
            f"{sizes} = {n:,} must not exceed it (no text may repeat across the sets)"
        )


def _distinct_rows(task: Task, counterfactuals: bool, order: Iterator[int] | None = None,
                   n: int | None = None) -> list[int]:
    """Indices (in `order`, default file order) of the rows whose texts have not occurred yet,
    up to `n`: a prompt is never another row's prompt or counterfactual, and likewise."""
    seen: set[str] = set()
    keep = []
    for i in order if order is not None else range(len(task)):
        texts = {task.prompts[i], task.counterfactuals[i]} if counterfactuals else {task.prompts[i]}
        if texts & seen:
            continue
        seen |= texts
        keep.append(i)
        if n is not None and len(keep) == n:
            break
    return keep


def draw_distinct(source: str | Task, n: int, seed: int, counterfactuals: bool = True) -> Task:
    """`n` rows of a generated task (or of a task file, in a seeded order) whose prompts (and,
    with `counterfactuals`, counterfactuals) are all distinct texts, so any split of them into
    training and held-out sets shares no text. Refuses, in one line, more than `capacity`."""
    check_capacity(source, n, "the rows asked for", counterfactuals)
    if isinstance(source, Task):
        pool = _distinct_rows(source, counterfactuals)
        g = torch.Generator().manual_seed(seed)
        return source.subset([pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()])
    draws = 2 * n + 16
    while True:  # a generator's rows for one seed are a prefix of its rows for more: extend them
        task = generate(source, draws, seed)
        keep = _distinct_rows(task, counterfactuals, n=n)
        if len(keep) == n:
            return task.subset(keep)
        if draws > 64 * n + 4096:  # far past the coupon collector's n log n: a generator bug
            raise SaelabError(f"task {source!r}: only {len(keep)} distinct rows in {draws:,} "
                              f"draws, {n} asked for")
        draws *= 2


def prompt_bytes(name: str, sample: int = 64) -> float:
    """Python memory one generated prompt of task `name` takes (its four fields), measured on a
    `sample`: what a prompt count costs before any model is loaded."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        task = generate(name, sample)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        if not tracing:
            tracemalloc.stop()
    del task
    return used / sample


def load_task_file(path: str | Path) -> Task:
    """A user task from JSONL: one {"prompt", "counterfactual", "answer", "wrong"} a line."""
    path = Path(path)
    if not path.is_file():
        raise SaelabError(f"task file {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"task file {path} line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SaelabError(f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SaelabError(f"{where}: expected an object with prompt, counterfactual, answer, wrong")
        missing = [k for k in ("prompt", "counterfactual", "answer", "wrong") if k not in obj]
        if missing:
            raise SaelabError(f"{where}: missing {', '.join(missing)}")
        for k in ("prompt", "counterfactual"):
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise SaelabError(f"{where}: {k} must be a non-empty string")
        tokens = []
        for k in ("answer", "wrong"):
            v = [obj[k]] if isinstance(obj[k], str) else obj[k]
            if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
                raise SaelabError(f"{where}: {k} must be a non-empty string or list of strings")
            tokens.append(tuple(v))
        if set(tokens[0]) & set(tokens[1]):
            raise SaelabError(f"{where}: answer and wrong share {sorted(set(tokens[0]) & set(tokens[1]))}")
        rows.append((obj["prompt"], obj["counterfactual"], *tokens))
    if not rows:
        raise SaelabError(f"task file {path} has no tasks (one JSON object a line)")
    return _task(path.stem, rows)
