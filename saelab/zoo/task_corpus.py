"""The task corpus and word-level tokenizer of the zoo's circuit-task models.

A task model learns IOI, greater-than, docstring and induction from synthetic text mixed with
ordinary text (the standard library's source), so that circuit evals have a model with known
behaviour and enough heads to rank. Its tokenizer is word-level: every name, two-digit year
group, argument name and Python word is one token (as names and years are in GPT-2), pieces
are cut by `PIECE` (words, two-digit groups, newlines, indentation runs, single punctuation
marks; single spaces dropped), and words outside the vocabulary become [UNK].

Synthetic documents (one per draw, the task chosen uniformly unless `gt_weight` says otherwise):
- ioi: an IOI prompt completed with its indirect object and a full stop;
- greater-than: a year-range sentence completed with an end year after the start year;
- docstring: a def with 4-6 arguments and a docstring documenting each, in order;
- induction: 5-20 words drawn from the whole vocabulary, then the same words again.

Options (recipe fields; their defaults give tasks-4l's text, unchanged):
- `gt_all_starts`: greater-than documents start at any year 00-98 with the end year uniform
  above it, instead of the task's start years 02-98. The task's counterfactual starts at 01:
  without this the model never saw that start, and what it predicts after it is not "any
  year above 01" but a guess (tasks-4l keeps 59% of the clean logit difference there).
- `copy_fraction`: a share of every task-mix batch stays copy rows, so the induction that
  forms in the copy warm-up is still trained afterwards (tasks-4l, without it, ends the mix
  predicting the second copy of a random 10-word sequence top-1 at 0-3% of positions).
- `pack_rows`: the tail of a task row that no whole document fits is filled with a short
  random sequence and its repeat (more induction, no EOT padding) instead of EOT.
- `gt_end_years` "near" (with `gt_all_starts`): the end year is the start year plus a
  geometric gap (`GT_NEAR_STOP`; mean 5 years, as in real spans like 1732-1738) instead of
  uniform above the start. With uniform ends, knowing the start is worth little for small
  starts (the prior over end years already rises towards 99; 0.32 nats of KL at starts 00-50,
  against 2.15 with near ends), and tasks-4l-v2 predicts that same rising curve for every start
  up to ~50, the 01 counterfactual's included. Under the 01 counterfactual the ideal
  predictor's removal of the probability difference is 100% only on average over YY (below
  100% for every YY under 50, above it over 50); with near ends it is 192% on average and at
  least 100% on every prompt with YY >= 05 (`tasks.prob_diff`; counterfactual and metric are
  unchanged, the text is what makes the 01 start mean "a year just after 01"). Alone it did
  not work: the first tasks-4l-v3 build (12M tokens, uniform task draw) ignored the start year
  altogether (the same end-year curve after 1701 and 1730) and its counterfactual removed
  nothing. A 2-layer model trained
  on near-end greater-than text alone conditions on the start after ~77k documents, not after
  ~38k; that first v3's mix held ~31k (README, "Circuit identification").
- `gt_weight`: greater-than is drawn this many times as often as each other task (default 1,
  uniform). tasks-4l-v3 uses 3 (half the task documents are greater-than: ~100k near-end
  greater-than documents in 15M tokens), and its counterfactual then removes 206% of the
  probability difference (ideal 192%).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from saelab import tasks
from saelab.data.tokens import BUILTIN_STDLIB, TokenData, stdlib_texts
from saelab.errors import SaelabError

EOT, UNK = "<|endoftext|>", "[UNK]"
PIECE = r"\d\d|\d|[A-Za-z_]+|\n| {2,}|[^\sA-Za-z_\d]"
STDLIB_WORDS = 1000  # most frequent standard-library pieces kept in the vocabulary
EVAL_SEED = 1_000_003  # seed of the prompts the card's accuracies are measured on
EVAL_PROMPTS = 200
GT_END_YEARS = ("uniform", "near")  # greater-than end-year shapes (module docstring)
GT_NEAR_STOP = 0.2  # "near": chance the span stops at each further year (gap mean 1/0.2 = 5)


def _doc_ioi(rng: random.Random) -> str:
    t = tasks.ioi(1, rng.randrange(2**31))
    return t.prompts[0] + t.answers[0][0] + "."


def _doc_greater_than(rng: random.Random) -> str:
    t = tasks.greater_than(1, rng.randrange(2**31))
    return t.prompts[0] + rng.choice(t.answers[0]) + "."


def _doc_docstring(rng: random.Random) -> str:
    n = rng.randint(4, 6)
    words = rng.sample(tasks.WORDS, n + 3)
    args, doc = words[:n], words[n:]
    params = [(a, " ".join(rng.sample(tasks.WORDS, 2))) for a in args]
    return tasks.docstring_text(rng.choice(tasks.FUNC_NAMES), args, doc, params, open_line=False)


def _doc_induction(rng: random.Random, vocab: list[str]) -> str:
    seq = rng.sample(vocab, rng.randint(5, 20))
    return " ".join(seq + seq)


def _end_uniform(rng: random.Random, yy: int) -> int:
    return rng.randint(yy + 1, 99)


def _end_near(rng: random.Random, yy: int) -> int:
    """yy + a geometric gap (stop chance `GT_NEAR_STOP` per year), at most 99."""
    end = yy + 1
    while end < 99 and rng.random() >= GT_NEAR_STOP:
        end += 1
    return end


def _doc_greater_than_any_start(rng: random.Random, end_year=_end_uniform) -> str:
    cc, yy = rng.choice(tasks.GT_CENTURIES), rng.randint(0, 98)
    return (f"The {rng.choice(tasks.GT_NOUNS)} lasted from the year {cc}{yy:02d} to the year "
            f"{cc}{end_year(rng, yy):02d}.")


def _greater_than_maker(all_starts: bool, end_years: str):
    if end_years not in GT_END_YEARS:
        raise SaelabError(f"unknown gt_end_years {end_years!r}; use {' or '.join(GT_END_YEARS)}")
    if not all_starts:
        if end_years != "uniform":
            raise SaelabError(f"gt_end_years {end_years!r} needs gt_all_starts")
        return _doc_greater_than
    end = _end_near if end_years == "near" else _end_uniform
    return lambda rng: _doc_greater_than_any_start(rng, end)


def documents(seed: int, vocab: list[str], gt_all_starts: bool = False,
              gt_end_years: str = "uniform", gt_weight: int = 1) -> Iterator[str]:
    """An endless seeded stream of synthetic task documents; `vocab` feeds induction.

    Greater-than is drawn `gt_weight` times as often as each other task (it sits in the draw's
    list that many times, so weight 1 draws exactly the old uniform sequence)."""
    if not isinstance(gt_weight, int) or gt_weight < 1:
        raise SaelabError(f"gt_weight must be a whole number >= 1, got {gt_weight!r}")
    rng = random.Random(seed)
    makers = [_doc_ioi, *[_greater_than_maker(gt_all_starts, gt_end_years)] * gt_weight,
              _doc_docstring, lambda r: _doc_induction(r, vocab)]
    while True:
        yield rng.choice(makers)(rng)


def word_tokenizer(directory: Path):
    """Write and return the word-level tokenizer: task words, then frequent stdlib pieces."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    piece = re.compile(PIECE)
    task_words: dict[str, None] = {}
    for doc, _ in zip(documents(0, list(tasks.WORDS)), range(4000), strict=False):
        task_words.update(dict.fromkeys(piece.findall(doc)))
    for w in (*tasks.NAMES, *tasks.YEARS, *tasks.WORDS, *tasks.FUNC_NAMES, *tasks.GT_NOUNS):
        task_words[w] = None
    counts = Counter(p for text in stdlib_texts("train") for p in piece.findall(text))
    common = [w for w, _ in counts.most_common() if w not in task_words][:STDLIB_WORDS]
    vocab = {w: i for i, w in enumerate([EOT, UNK, *task_words, *common])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="removed", invert=True)
    tok.save(str(directory / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                   bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=UNK)
    fast.save_pretrained(str(directory))
    return fast


def _task_rows(tokenizer, context_length: int, seed: int, gt_all_starts: bool = False,
               pack_rows: bool = False, gt_end_years: str = "uniform",
               gt_weight: int = 1) -> Iterator[list[int]]:
    """BOS-led rows of whole synthetic documents separated by EOT, padded with EOT (or, with
    `pack_rows`, ended by a random sequence and its repeat).

    A document is never cut across rows (one longer than a row is dropped), so every row shows
    complete IOI sentences and complete docstrings, as the task prompts do."""
    vocab = [w for w in tokenizer.get_vocab() if w not in (EOT, UNK) and w.strip()]
    vocab.sort(key=tokenizer.get_vocab().get)
    eot, row = tokenizer.eos_token_id, [tokenizer.eos_token_id]
    fill = _filler(tokenizer, random.Random(f"{seed}:fill")) if pack_rows else None
    for doc in documents(seed, vocab, gt_all_starts, gt_end_years, gt_weight):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eot]
        if len(ids) >= context_length:
            continue
        if len(row) + len(ids) > context_length:
            free = context_length - len(row)
            yield row + (fill(free) if fill else [eot] * free)
            row = [eot]
        row += ids


def _filler(tokenizer, rng: random.Random):
    """`fill(n)`: n tokens of row tail, k random vocabulary tokens twice (k = n // 2 if at least
    2, else none), then EOT padding; the repeat trains induction on what would be padding."""
    ids = sorted(i for w, i in tokenizer.get_vocab().items() if w not in (EOT, UNK) and w.strip())
    eot = tokenizer.eos_token_id

    def fill(n: int) -> list[int]:
        k = n // 2 if n >= 4 else 0
        seq = rng.sample(ids, k)
        return seq + seq + [eot] * (n - 2 * k)
    return fill


def copy_rows(tokenizer, context_length: int, seed: int) -> Iterator[list[int]]:
    """Rows of pure copying, packed without padding: 5-20 single-token task words (names, words,
    years), the same words again, EOT. Copying (what IOI, docstring and induction need) forms
    on these in ~1,000-1,500 steps, and not within thousands of steps of the task mix."""
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"]
           for w in dict.fromkeys((*tasks.NAMES, *tasks.WORDS, *tasks.YEARS))]
    words = [i[0] for i in ids if len(i) == 1]
    rng, eot = random.Random(seed), tokenizer.eos_token_id
    while True:
        row = [eot]
        while len(row) < context_length:
            seq = rng.sample(words, rng.randint(5, 20))
            row += seq + seq + [eot]
        yield row[:context_length]


def batches(tokenizer, batch_size: int, context_length: int, seed: int,
            stdlib_fraction: float, copy_steps: int = 0, *, copy_fraction: float = 0.0,
            gt_all_starts: bool = False, pack_rows: bool = False,
            gt_end_years: str = "uniform", gt_weight: int = 1) -> Iterator[torch.Tensor]:
    """Endless (batch_size, context_length) batches: `copy_steps` batches of `copy_rows` first,
    then task rows mixed with stdlib rows (round(stdlib_fraction * batch_size) of each batch)
    and copy rows (round(copy_fraction * batch_size)); the options are the module docstring's."""
    copying = copy_rows(tokenizer, context_length, seed)
    for _ in range(copy_steps):
        yield torch.tensor([next(copying) for _ in range(batch_size)])
    n_std, n_copy = round(stdlib_fraction * batch_size), round(copy_fraction * batch_size)
    std = TokenData(BUILTIN_STDLIB, "train", context_length, seed).rows(tokenizer)
    task = _task_rows(tokenizer, context_length, seed, gt_all_starts, pack_rows, gt_end_years,
                      gt_weight)
    while True:
        rows = [torch.tensor(next(task)) for _ in range(batch_size - n_std - n_copy)]
        rows += [torch.tensor(next(copying)) for _ in range(n_copy)]
        rows += [next(std) for _ in range(n_std)]
        yield torch.stack(rows)


def _removed(clean: float, counterfactual: float) -> float | None:
    """Share of the clean difference the counterfactual takes away (None if there is none)."""
    return round(1 - counterfactual / clean, 4) if clean > 0 else None


@torch.no_grad()
def task_scores(model, tokenizer, n: int = EVAL_PROMPTS, seed: int = EVAL_SEED) -> dict[str, dict]:
    """Accuracy, and mean logit and probability differences (positive and counterfactual, and
    the share the counterfactual removes), of a Hugging Face causal LM on `n` fresh prompts of
    each task."""
    out = {}
    for name in tasks.GENERATORS:
        tok = tasks.tokenize(tasks.generate(name, n, seed), tokenizer)
        pos = tasks.last_logits(model(tok.pos).logits, tok.pos_len)
        cf = tasks.last_logits(model(tok.cf).logits, tok.cf_len)
        ld, cf_ld = tasks.logit_diff(pos, tok).mean().item(), tasks.logit_diff(cf, tok).mean().item()
        pd, cf_pd = tasks.prob_diff(pos, tok).mean().item(), tasks.prob_diff(cf, tok).mean().item()
        out[name] = {
            "accuracy": round(tasks.correct(pos, tok).float().mean().item(), 4),
            "logit_diff": round(ld, 4),
            "counterfactual_logit_diff": round(cf_ld, 4),
            "logit_diff_removed": _removed(ld, cf_ld),
            "prob_diff": round(pd, 4),
            "counterfactual_prob_diff": round(cf_pd, 4),
            "prob_diff_removed": _removed(pd, cf_pd),
            "prompts": n,
        }
    return out
