"""Circuit tasks: positive prompts, minimally changed counterfactuals, answers, and a metric.

A task holds, per prompt, the text the model should complete, a counterfactual that differs by
as little as possible yet takes away what the model needs, the answer token(s) and the wrong
token(s). Its metric is the logit difference at the last prompt token: mean logit of the answer
tokens minus mean logit of the wrong ones (one token each for IOI, docstring and induction; for
greater-than every year above YY against every year up to YY, as in Hanna et al.).

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
import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import SaelabError

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
WORDS = (
    "load", "size", "files", "last", "page", "names", "read", "first", "value", "item",
    "state", "order", "count", "user", "key", "node", "path", "text", "data", "token",
    "group", "block", "field", "index", "label", "model", "image", "shape", "score", "table",
    "query", "result", "source", "target", "limit", "offset", "frame", "width", "height", "color",
    "oil", "column", "piece", "crime", "population", "unit", "dark", "message", "tree", "detail",
    "mine", "sector", "gap", "river", "stone", "paper", "light", "sound", "field", "glass",
)
WORDS = tuple(dict.fromkeys(WORDS))  # de-duplicated, order kept
FUNC_NAMES = ("port", "run", "check", "update", "build", "parse", "render", "fetch", "apply", "merge")


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
        return Task(self.name, *(tuple(f[i] for i in index) for f in
                                 (self.prompts, self.counterfactuals, self.answers, self.wrongs)))


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
