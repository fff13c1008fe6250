"""Positions to probe: rows of held-out Python files through the model and the SAE, with the
label fields of every token.

Files are taken in a seeded random order until they hold several times the characters wanted
(`_pick_files`). Each is tokenised once (with offsets) and labelled once
(`labels.char_labels`); it is cut into rows of context_length - 1 tokens, each run with BOS
first as the model was trained. Rows are drawn at random over those files (seeded) until the
budget of positions is met, so a file contributes from anywhere in it, not only its license
header. A rare label (`labels.Label.rare`) then gets extra rows from the same files, those holding
its positives, until each side (train, test) has as many positives as the probes can use or the
files run out; the extra positions are in that label's scope only, so every other label sees the
budget's rows alone. Whole files are held out
for testing (`TEST_FRACTION` of them, seeded). Files that do not tokenize as Python are skipped
and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from saelab.data.tokens import TokenData, load_texts
from saelab.errors import SaelabError
from saelab.evals.probes import task_labels
from saelab.evals.probes.labels import Label, char_labels, label_matrix, token_fields
from saelab.evals.probes.probing import Features
from saelab.models import HookedModel
from saelab.sae import SparseCode

TEST_FRACTION = 0.3
CHARS_PER_POSITION, MIN_FILES = 16, 12


@dataclass(frozen=True)
class Collected:
    """The probes' input: features at every position, their label fields, and the counts the
    report states."""

    feats: Features
    fields: torch.Tensor  # (N, len(labels.FIELDS))
    files: int
    skipped: int
    rows: int
    drawn_for: torch.Tensor | None = None  # (N,) label a position was drawn for (rare); -1: budget


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    fields: torch.Tensor
    test: bool


def _pick_files(texts: list[str], tokens: int, seed: int) -> list[str]:
    """Files in a seeded random order until they hold `CHARS_PER_POSITION` characters per
    position wanted (and at least `MIN_FILES` files): labelling all of a large corpus would
    cost more than probing it."""
    order = list(range(len(texts)))
    random.Random(f"{seed}:files").shuffle(order)
    picked: list[str] = []
    chars = 0
    for i in order:
        if chars >= CHARS_PER_POSITION * tokens and len(picked) >= MIN_FILES:
            break
        picked.append(texts[i])
        chars += len(texts[i])
    return picked


def _file_rows(tokenizer, texts: list[str], body: int, seed: int) -> tuple[list[_Row], int, int]:
    """Every row of every file that tokenizes, and the counts of files used and skipped."""
    rng = random.Random(f"{seed}:test-files")
    rows: list[_Row] = []
    used = skipped = 0
    for text in texts:
        chars = char_labels(text)
        if chars is None:
            skipped += 1
            continue
        used += 1
        test = rng.random() < TEST_FRACTION
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        fields = token_fields(chars, enc["offset_mapping"])
        ids = enc["input_ids"]
        rows += [_Row(ids[i : i + body], fields[i : i + body], test)
                 for i in range(0, len(ids) - body + 1, body)]
    return rows, used, skipped


def _rare_rows(drawn: list[_Row], pool: list[_Row], labels: tuple[Label, ...],
               want: tuple[int, int]) -> list[tuple[_Row, int]]:
    """(row, label index) for each rare label: rows of `pool` (in its seeded order) holding the
    label's positives, taken while the positives on the row's side are fewer than `want`
    (train, test), counting those already in `drawn`."""
    out = []
    for j, lab in enumerate(labels):
        if not lab.rare:
            continue

        def positives(row: _Row, lab: Label = lab) -> int:
            y, scope = label_matrix(row.fields, (lab,))
            return int((y & scope).sum())

        have = [0, 0]
        for row in drawn:
            have[row.test] += positives(row)
        for row in pool:
            if have[row.test] < want[row.test] and (n := positives(row)):
                out.append((row, j))
                have[row.test] += n
    return out


def collect(model: HookedModel, sae, data: TokenData, tokens: int, batch_rows: int, seed: int,
            labels: tuple[Label, ...] = (), want: tuple[int, int] = (0, 0)) -> Collected:
    """Run `tokens` positions (rounded up to whole rows) of `data`'s held-out files, and the
    extra rows of `labels`' rare ones (up to `want` positives a side, train and test)."""
    tok: Any = model.tokenizer  # a Hugging Face tokenizer
    body = data.context_length - (tok.bos_token_id is not None)
    texts = _pick_files(load_texts(data.spec, "heldout"), tokens, seed)
    rows, used, skipped = _file_rows(tok, texts, body, seed)
    if not rows:
        raise SaelabError(
            f"no held-out file of {data.spec!r} tokenizes as Python ({skipped} skipped): probes need "
            "Python source, e.g. --data builtin:stdlib"
        )
    random.Random(f"{seed}:rows").shuffle(rows)
    n = -(-tokens // body)
    extra = _rare_rows(rows[:n], rows[n:], labels, want)
    drawn = [(r, -1) for r in rows[:n]] + extra
    rows = [r for r, _ in drawn]
    drawn_for = torch.cat([torch.full((len(r.ids),), j, dtype=torch.long) for r, j in drawn])
    return Collected(encode_rows(model, sae, rows, batch_rows), torch.cat([r.fields for r in rows]),
                     used, skipped, n, drawn_for)


def collect_tasks(model: HookedModel, sae, tokens: int, batch_rows: int, seed: int) -> Collected:
    """Prompts of the circuit tasks (`task_labels`), about `tokens` positions in all."""
    tok: Any = model.tokenizer
    rng = random.Random(f"{seed}:test-prompts")
    rows = []
    for task, text, spans in task_labels.prompts(max(50, -(-tokens // 75)), seed):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        fields = task_labels.token_fields(task, text, spans, enc["offset_mapping"])
        rows.append(_Row(enc["input_ids"], fields, rng.random() < TEST_FRACTION))
    return Collected(encode_rows(model, sae, rows, batch_rows), torch.cat([r.fields for r in rows]),
                     len(rows), 0, len(rows))


@torch.no_grad()
def encode_rows(model: HookedModel, sae, rows: list[_Row], batch_rows: int) -> Features:
    """The hook activation and the SAE's code at every token of `rows` (each run with BOS
    first; rows of a batch padded on the right, the padding dropped)."""
    if not any(r.test for r in rows) or all(r.test for r in rows):
        raise SaelabError(f"the {len(rows)} rows drawn come from too few files to hold some out; "
                          "raise --probe-tokens or use data with more files")
    tok: Any = model.tokenizer
    head = [] if tok.bos_token_id is None else [tok.bos_token_id]
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    xs: list[torch.Tensor] = []
    codes: list[SparseCode] = []
    hook = sae.cfg.hook
    for start in tqdm(range(0, len(rows), batch_rows), desc=f"probes {hook}", unit="batch"):
        part = rows[start : start + batch_rows]
        width = max(len(r.ids) for r in part)
        ids = torch.tensor([head + r.ids + [pad] * (width - len(r.ids)) for r in part], device=model.device)
        real = torch.tensor([[i < len(r.ids) for i in range(width)] for r in part])
        x = model.activations(ids, [hook])[hook][:, len(head):][real.to(model.device)]
        idx, vals = sae.encode(x.to(sae.W_dec.dtype))
        xs.append(x.float().cpu())
        codes.append(SparseCode(idx.long().cpu(), vals.float().cpu(), sae.cfg.n_latents))
    test = torch.cat([torch.full((len(r.ids),), r.test, dtype=torch.bool) for r in rows])
    code = SparseCode.cat(codes)  # threshold-mode codes are as wide as their batch's busiest token
    return Features(torch.cat(xs), code.idx, code.vals, sae.cfg.n_latents, test)
