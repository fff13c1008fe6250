"""Positions to probe: rows of held-out Python files through the model and the SAE, with the
label fields of every token.

Files are taken in a seeded random order until they hold several times the characters wanted
(`_pick_files`). Each is tokenised once (with offsets) and labelled once
(`labels.char_labels`); it is cut into rows of context_length - 1 tokens, each run with BOS
first as the model was trained. Rows are drawn at random over those files (seeded) until the
budget of positions is met, so a file contributes from anywhere in it, not only its license
header. Whole files are held out
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
from saelab.evals.probes.labels import char_labels, token_fields
from saelab.evals.probes.probing import Features
from saelab.models import HookedModel

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


@torch.no_grad()
def collect(model: HookedModel, sae, data: TokenData, tokens: int, batch_rows: int, seed: int) -> Collected:
    """Run `tokens` positions (rounded up to whole rows) of `data`'s held-out files."""
    tok: Any = model.tokenizer  # a Hugging Face tokenizer
    bos = tok.bos_token_id
    body = data.context_length - (bos is not None)
    texts = _pick_files(load_texts(data.spec, "heldout"), tokens, seed)
    rows, used, skipped = _file_rows(tok, texts, body, seed)
    if not rows:
        raise SaelabError(
            f"no held-out file of {data.spec!r} tokenizes as Python ({skipped} skipped): probes need "
            "Python source, e.g. --data builtin:stdlib"
        )
    random.Random(f"{seed}:rows").shuffle(rows)
    rows = rows[: -(-tokens // body)]
    if not any(r.test for r in rows) or all(r.test for r in rows):
        raise SaelabError(f"the {len(rows)} rows drawn come from too few files to hold some out; "
                          "raise --probe-tokens or use data with more files")
    xs, idxs, valss = [], [], []
    hook = sae.cfg.hook
    for start in tqdm(range(0, len(rows), batch_rows), desc=f"probes {hook}", unit="batch"):
        part = rows[start : start + batch_rows]
        ids = torch.tensor([([bos] if bos is not None else []) + r.ids for r in part], device=model.device)
        x = model.activations(ids, [hook])[hook][:, ids.shape[1] - body :].reshape(-1, sae.cfg.d_in)
        idx, vals = sae.encode(x.to(sae.W_dec.dtype))
        xs.append(x.float().cpu())
        idxs.append(idx.long().cpu())
        valss.append(vals.float().cpu())
    test = torch.cat([torch.full((body,), r.test, dtype=torch.bool) for r in rows])
    feats = Features(torch.cat(xs), torch.cat(idxs), torch.cat(valss), sae.cfg.n_latents, test)
    return Collected(feats, torch.cat([r.fields for r in rows]), used, skipped, len(rows))
