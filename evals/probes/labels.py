"""Exact labels for Python source from Python's own `tokenize`, aligned to a model's tokens.

Every character of a file gets: its token type (NAME, KEYWORD, STRING, COMMENT, NUMBER, OP or
none for whitespace and newlines), the common word it belongs to (`WORDS`), the first letter of
the identifier it is inside (not for the identifier's first character, which the model reads
directly: what is labelled is the letter the model must remember while spelling the rest),
whether it is in a docstring or an f-string, and the indentation and bracket depth. A model
token takes the labels of the character its offset mapping starts at, so byte-level tokenizers
(several tokens for one non-ASCII character) and word tokenizers align alike.

Binary labels (`LABELS`) are predicates on these fields, grouped in families for the report.
A label may have a scope, the positions where it is defined: a first-letter label is defined on
the identifier characters that carry a letter, so its negatives are identifiers spelled from
another letter (SAEBench's first-letter task contrasts a letter with the others), not commas or
keywords. A rare label is one whose positives come in long runs from few places (one f-string is
a dozen positions of one occurrence): the probes draw extra rows for it (`collect`).
"""

from __future__ import annotations

import io
import keyword
import string
import tokenize
from collections.abc import Callable
from dataclasses import dataclass

import torch

TYPES = ("NAME", "KEYWORD", "STRING", "COMMENT", "NUMBER", "OP")
WORDS = ("def", "return", "self", "import", "from", "if", "else", "for", "in", "not", "None",
         "class", "raise", "is", "and", "len", "isinstance", "True", "try", "except")
LETTERS = string.ascii_lowercase
FIELDS = ("type", "word", "letter", "docstring", "fstring", "indent", "bracket")
NONE = -1  # the field's value where it does not apply (no type, no word, no letter)
_OPEN, _CLOSE = "([{", ")]}"
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)
_FSTRING_PARTS = {t for t in (_FSTRING_START, getattr(tokenize, "FSTRING_MIDDLE", None), _FSTRING_END)
                  if t is not None}


@dataclass(frozen=True)
class Label:
    """One binary label: its name, its family in the report, the predicate on a (positions,
    fields) LongTensor of per-position field values (columns in `FIELDS` order), and where it
    is defined (its scope; None: everywhere): positions outside are neither class. `rare`:
    the budget's rows hold too few occurrences to probe it, so extra rows are drawn for it."""

    name: str
    family: str
    test: Callable[[torch.Tensor], torch.Tensor]
    scope: Callable[[torch.Tensor], torch.Tensor] | None = None
    rare: bool = False


def _col(field: str) -> int:
    return FIELDS.index(field)


def _is(field: str, value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda f: f[:, _col(field)] == value


def _at_least(field: str, value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda f: f[:, _col(field)] >= value


LETTER_FAMILY = "first letter"
LABELS: tuple[Label, ...] = (
    *(Label(t, "token type", _is("type", i)) for i, t in enumerate(TYPES)),
    *(Label(f"word:{w}", "word", _is("word", i)) for i, w in enumerate(WORDS)),
    Label("docstring", "context", _is("docstring", 1)),
    Label("f-string", "context", _is("fstring", 1), rare=True),
    *(Label(f"indent>={d}", "depth", _at_least("indent", d)) for d in (1, 2, 3)),
    *(Label(f"bracket>={d}", "depth", _at_least("bracket", d)) for d in (1, 2)),
    *(Label(f"letter:{c}", LETTER_FAMILY, _is("letter", i), _at_least("letter", 0))
      for i, c in enumerate(LETTERS)),
)
LETTER_LABELS = tuple(lab for lab in LABELS if lab.family == LETTER_FAMILY)
LETTER_NEGATIVES = "identifiers of other letters"  # what a first-letter label contrasts with (reports say)


def _line_starts(source: str) -> list[int]:
    """Character offset of each line as tokenize's readline sees them (split after "\\n")."""
    starts, pos = [0, 0], 0  # tokenize's rows count from 1
    for line in io.StringIO(source):
        pos += len(line)
        starts.append(pos)
    return starts


def _is_fstring(tok: tokenize.TokenInfo) -> bool:
    prefix = tok.string[: min(i for i in (tok.string.find("'"), tok.string.find('"')) if i >= 0)]
    return "f" in prefix.lower()


def char_labels(source: str) -> torch.Tensor | None:
    """(len(source), len(FIELDS)) LongTensor of per-character fields; None when the source does
    not tokenize as Python (the caller skips and counts it).

    Characters no token covers (spaces, the leading whitespace of a line) take the depths of
    the next token; a bracket itself sits at the depth outside it.
    """
    starts = _line_starts(source)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    spans: list[tuple[int, int]] = []
    rows: list[list[int]] = []  # one row of FIELDS values per span
    indent = bracket = fdepth = 0
    expect_doc, header = True, None  # module docstring first; a def/class body's after INDENT
    line_first: str | None = None
    for tok in tokens:
        kind = tok.type
        if kind == tokenize.INDENT:
            indent += 1
            expect_doc = header in ("def", "class")
            continue
        if kind == tokenize.DEDENT:
            indent -= 1
            continue
        if kind == tokenize.NEWLINE:
            header, line_first = line_first, None
            continue
        if kind in (tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        span = (starts[tok.start[0]] + tok.start[1], starts[tok.end[0]] + tok.end[1])
        if kind == tokenize.COMMENT:
            spans.append(span)
            rows.append([TYPES.index("COMMENT"), NONE, NONE, 0, 0, indent, bracket])
            continue
        if line_first is None:
            line_first = "def" if tok.string == "async" else tok.string
        bracket -= kind == tokenize.OP and tok.string in _CLOSE and bracket > 0
        if _FSTRING_START is not None and kind == _FSTRING_START:
            fdepth += 1
        fstring = bool(fdepth) or (kind == tokenize.STRING and _is_fstring(tok))
        doc = kind == tokenize.STRING and expect_doc
        spans.append(span)
        rows.append([*_type_word_letter(tok), int(doc), int(fstring), indent, bracket])
        if _FSTRING_END is not None and kind == _FSTRING_END:
            fdepth -= 1
        bracket += kind == tokenize.OP and tok.string in _OPEN
        expect_doc = False
    return _expand(len(source), spans, rows)


def _type_word_letter(tok: tokenize.TokenInfo) -> tuple[int, int, int]:
    """A token's type, common word and first letter (NONE where they do not apply)."""
    kind = tok.type
    if kind == tokenize.NAME:
        kw = keyword.iskeyword(tok.string)
        first = tok.string[0].lower()
        return (TYPES.index("KEYWORD" if kw else "NAME"),
                WORDS.index(tok.string) if tok.string in WORDS else NONE,
                LETTERS.index(first) if not kw and first in LETTERS else NONE)
    if kind in (tokenize.STRING, *_FSTRING_PARTS):
        return TYPES.index("STRING"), NONE, NONE
    if kind == tokenize.NUMBER:
        return TYPES.index("NUMBER"), NONE, NONE
    if kind == tokenize.OP:
        return TYPES.index("OP"), NONE, NONE
    return NONE, NONE, NONE


def _expand(n: int, spans: list[tuple[int, int]], rows: list[list[int]]) -> torch.Tensor:
    """Per-character fields from per-span rows, all at once (a file has ~10^5 characters); the
    letter is left off each span's first character."""
    out = torch.full((n, len(FIELDS)), NONE, dtype=torch.long)
    out[:, _col("docstring")] = out[:, _col("fstring")] = 0
    if spans:
        se = torch.tensor(spans, dtype=torch.long)
        lengths = se[:, 1] - se[:, 0]
        which = torch.repeat_interleave(torch.arange(len(spans)), lengths)
        pos = torch.arange(len(which)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        vals = torch.tensor(rows, dtype=torch.long)[which]
        vals[pos == 0, _col("letter")] = NONE
        out[se[which, 0] + pos] = vals
    _fill_gaps(out)
    return out


def _fill_gaps(out: torch.Tensor) -> None:
    """Depths of characters no token set (-1) taken from the next character that has them
    (0 after the last token)."""
    n = len(out)
    for c in (_col("indent"), _col("bracket")):
        col = out[:, c]
        at = torch.where(col >= 0, torch.arange(n), torch.full((n,), n))
        nxt = at.flip(0).cummin(0).values.flip(0)  # index of the next set character, or n
        out[:, c] = torch.cat([col, torch.zeros(1, dtype=col.dtype)])[nxt]


def token_fields(chars: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Per-token fields: each token takes its first character's; tokens with no characters
    (special tokens, offset (0, 0) past the start) get NONE everywhere."""
    start = torch.tensor([a for a, _ in offsets], dtype=torch.long)
    empty = torch.tensor([a == b for a, b in offsets], dtype=torch.bool)
    fields = chars[start.clamp(max=len(chars) - 1)] if len(chars) else torch.full(
        (len(offsets), len(FIELDS)), NONE, dtype=torch.long)
    fields[empty] = NONE
    return fields


def label_matrix(fields: torch.Tensor, labels: tuple[Label, ...] = LABELS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, labels) bool twice: each label's predicate, and its scope, at each position."""
    every = torch.ones(len(fields), dtype=torch.bool)
    return (torch.stack([lab.test(fields) for lab in labels], dim=1),
            torch.stack([every if lab.scope is None else lab.scope(fields) for lab in labels], dim=1))
