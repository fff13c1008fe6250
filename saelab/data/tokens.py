"""Token data: text sources, tokenisation and packing into fixed-length rows.

A data spec is one of
- `builtin:stdlib`: the Python standard library source of the running interpreter (every
  machine has it, so saelab runs offline); split by a hash of each file's path, 5% held out;
- a local `.txt` / `.jsonl` file or a directory of them (jsonl rows need a "text" field);
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (needs network access the first time).

Rows are packed: documents are joined with the tokenizer's EOS, cut into `context_length`
pieces, and each row starts with BOS (when the tokenizer has one), as the models saw in training.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.data.specs import hub_name
from saelab.errors import SaelabError, first_line

BUILTIN_STDLIB = "builtin:stdlib"
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5


def _in_split(key: str, split: str) -> bool:
    if split not in SPLITS:
        raise SaelabError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return (bucket < HELDOUT_PERCENT) == (split == "heldout")


def stdlib_texts(split: str) -> list[str]:
    """The .py files of the running interpreter's standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not ({"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    )
    texts = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if _in_split(rel, split):
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


def _local_texts(path: Path, split: str) -> list[str]:
    """Documents: a .txt file's paragraphs (split at blank lines), a .jsonl file's rows.

    Split keys are relative to `path`, so the same data splits alike however it is named, and
    a single file still gives both splits.
    """
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".txt", ".jsonl")]
    if not files:
        raise SaelabError(f"data path {path} has no .txt or .jsonl files")
    texts = []
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if f.suffix == ".txt":
            paragraphs = f.read_text(encoding="utf-8", errors="replace").split("\n\n")
            docs = [(f"{rel}#{i}", p) for i, p in enumerate(paragraphs) if p.strip()]
        else:
            docs = []
            try:
                lines = f.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise SaelabError(
                    f"{f} is not UTF-8 text; a .jsonl file holds one JSON object per line"
                ) from None
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise SaelabError(
                        f"{f} line {i + 1}: expected a JSON object with a \"text\" field holding a string"
                    )
                docs.append((f"{rel}:{i}", text))
        texts += [t for key, t in docs if _in_split(key, split)]
    return texts


def _hf_texts(name: str, split: str) -> list[str]:
    """A Hugging Face dataset: its `test`/`validation` split is held out when it has one.

    Never runs a dataset's loading script (trust_remote_code=False; datasets >= 4 refuses
    scripts anyway). An unreachable hub fails at once (`saelab.formats.hub`): datasets has no
    cache-only switch but HF_HUB_OFFLINE, so the message names it."""
    import datasets

    from saelab.formats import hub

    path, _, config = name.partition(":")
    why = hub.unreachable()
    if why and not hub.offline_mode():
        raise SaelabError(
            f"could not load Hugging Face dataset {path!r}: {why}; set HF_HUB_OFFLINE=1 to use "
            "a copy in the local cache, or pass a local .txt/.jsonl file or directory, or builtin:stdlib"
        )
    try:
        ds = datasets.load_dataset(path, config or None, trust_remote_code=False)
    except Exception as e:  # offline, unknown name, gated, a script: all end alike for the user
        raise SaelabError(
            f"could not load Hugging Face dataset {path!r} ({first_line(e)}); with no network, "
            "pass a local .txt/.jsonl file or directory, or builtin:stdlib"
        ) from None
    held = next((s for s in ("test", "validation") if s in ds), None)
    if held is not None:
        rows = ds[held] if split == "heldout" else ds["train"]
        return [r["text"] for r in rows]
    return [r["text"] for i, r in enumerate(ds["train"]) if _in_split(f"{path}:{i}", split)]


def load_texts(spec: str, split: str = "train") -> list[str]:
    """Documents of a data spec (see module docstring) for one split."""
    if spec == BUILTIN_STDLIB:
        return stdlib_texts(split)
    if (repo := hub_name(spec)) is not None:
        return _hf_texts(repo, split)
    path = Path(spec)
    if path.exists():
        return _local_texts(path, split)
    raise SaelabError(
        f"unknown data spec {spec!r}; use {BUILTIN_STDLIB}, a local .txt/.jsonl file or directory, "
        "or hf:DATASET_NAME"
    )


@dataclass(frozen=True)
class TokenData:
    """Packed token rows from a data spec, shuffled by document each epoch.

    Fields:
        spec: data spec (module docstring).
        split: "train" or "heldout".
        context_length: tokens per row, BOS included.
        seed: document order of epoch e is a permutation seeded by (seed, e).
        rank, world: this process reads every `world`-th document from the `rank`-th, so
            data-parallel processes see disjoint text.
    """

    spec: str = BUILTIN_STDLIB
    split: str = "train"
    context_length: int = 128
    seed: int = 0
    rank: int = 0
    world: int = 1

    def rows(self, tokenizer, epochs: int | None = None) -> Iterator[torch.Tensor]:
        """Yield LongTensor rows of `context_length` tokens; `epochs=None` cycles forever."""
        texts = load_texts(self.spec, self.split)[self.rank :: self.world]
        if not texts:
            raise SaelabError(f"data {self.spec!r} has no documents in split {self.split!r}")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        body = self.context_length - (bos is not None)
        if body < 1:
            raise SaelabError(f"context_length must be at least 2, got {self.context_length}")
        epoch = 0
        while epochs is None or epoch < epochs:
            order = list(range(len(texts)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            stream: list[int] = []
            served = 0
            for i in order:  # tokenised lazily, so the first batch comes at once
                stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"]
                if eos is not None:
                    stream.append(eos)
                start = 0
                while len(stream) - start >= body:
                    row = stream[start : start + body]
                    start += body
                    served += 1
                    yield torch.tensor(([bos] if bos is not None else []) + row)
                del stream[:start]
            if not served:  # every later epoch would come up empty too: stop instead of spinning
                raise SaelabError(
                    f"data {self.spec!r} (split {self.split!r}) has {len(stream)} tokens, fewer than "
                    f"one row of context_length {self.context_length}; use more text or a shorter "
                    "--context-length"
                )
            epoch += 1

    def require_rows(self, tokenizer) -> None:
        """Fail now, before any work, if this data cannot fill one row (too little text, no
        documents in the split); reads only until the first row is packed."""
        next(self.rows(tokenizer, epochs=1))

    def shuffled_rows(self, tokenizer, buffer_rows: int, epochs: int | None = None
                      ) -> Iterator[torch.Tensor]:
        """`rows`, drawn at random from a buffer of `buffer_rows` (seeded by `seed`): consecutive
        rows come from one file, and a batch of them gives one file's gradient, not the corpus's."""
        rng = random.Random(f"{self.seed}:shuffle")
        buf: list[torch.Tensor] = []
        for row in self.rows(tokenizer, epochs):
            if len(buf) < buffer_rows:
                buf.append(row)
                continue
            i = rng.randrange(buffer_rows)
            yield buf[i]
            buf[i] = row
        rng.shuffle(buf)
        yield from buf

    def batches(self, tokenizer, batch_size: int, epochs: int | None = None, buffer_rows: int = 0):
        """Yield (batch_size, context_length) token batches (the last may be smaller); with
        `buffer_rows`, rows are shuffled through a buffer of that many (`shuffled_rows`)."""
        rows = (self.shuffled_rows(tokenizer, buffer_rows, epochs) if buffer_rows
                else self.rows(tokenizer, epochs))
        buf = []
        for row in rows:
            buf.append(row)
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
        if buf:
            yield torch.stack(buf)
