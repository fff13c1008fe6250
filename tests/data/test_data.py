import json

import pytest

from saelab.data.tokens import TokenData, _in_split, load_texts, stdlib_texts
from saelab.errors import SaelabError


class ByteTok:
    """A stand-in tokenizer: one token per byte, BOS/EOS = 256."""

    bos_token_id = eos_token_id = 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_stdlib_splits_partition_the_files():
    train, held = stdlib_texts("train"), stdlib_texts("heldout")
    assert len(held) > 10
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10
    keys = [f"pkg/mod{i}.py" for i in range(2000)]
    in_train = [_in_split(k, "train") for k in keys]
    assert in_train == [not _in_split(k, "heldout") for k in keys]  # each in exactly one split
    assert in_train == [_in_split(k, "train") for k in keys]  # and deterministically so


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(200)))
    docs = load_texts(str(tmp_path), "train") + load_texts(str(tmp_path), "heldout")
    assert sorted(docs) == sorted(["hello"] + [f"doc {i}" for i in range(200)])


def test_bad_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SaelabError, match=r"bad.jsonl line 2"):
        load_texts(str(f))


def test_unknown_spec_and_offline_hub_are_clear(monkeypatch):
    with pytest.raises(SaelabError, match="unknown data spec"):
        load_texts("no/such/path.txt")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaelabError, match="could not load Hugging Face dataset 'nobody/none'"):
        load_texts("hf:nobody/none")


def test_rows_are_packed_with_bos_and_cover_the_text(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 5)  # one paragraph: one document
    data = TokenData(str(tmp_path), "train", context_length=8)
    if not load_texts(str(tmp_path), "train"):  # the lone document hashed into heldout
        data = TokenData(str(tmp_path), "heldout", context_length=8)
    rows = list(data.rows(ByteTok(), epochs=1))
    assert all(r.shape == (8,) and r[0] == 256 for r in rows)
    body = b"".join(bytes(r[1:].tolist()) for r in rows if 256 not in r[1:].tolist())
    assert body == (b"abcdefghij" * 5)[: len(body)] and len(body) == 49  # 7 rows of 7 bytes


def test_a_single_text_file_gives_both_splits_whatever_its_path(tmp_path, monkeypatch):
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(f"paragraph {i}" for i in range(400)))
    train, held = load_texts(str(f), "train"), load_texts(str(f), "heldout")
    assert len(train) + len(held) == 400 and 5 <= len(held) <= 40
    monkeypatch.chdir(tmp_path)
    assert load_texts("book.txt", "heldout") == held  # relative and absolute paths agree


def test_shuffled_rows_are_the_same_rows_in_a_seeded_random_order(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 9})
                                                for i in range(300)))
    split = "train" if load_texts(str(tmp_path), "train") else "heldout"
    data = TokenData(str(tmp_path), split, context_length=8)
    plain = [tuple(r.tolist()) for r in data.rows(ByteTok(), epochs=1)]
    mixed = [tuple(r.tolist()) for r in data.shuffled_rows(ByteTok(), 64, epochs=1)]
    assert sorted(mixed) == sorted(plain) and mixed != plain  # a permutation, not the file order
    assert mixed == [tuple(r.tolist()) for r in data.shuffled_rows(ByteTok(), 64, epochs=1)]
    # neighbours in the file order rarely stay neighbours
    after = {plain[i]: plain[i + 1] for i in range(len(plain) - 1)}
    kept = sum(after.get(a) == b for a, b in zip(mixed, mixed[1:], strict=False))
    assert kept < len(plain) / 10
    batch = next(data.batches(ByteTok(), 16, epochs=1, buffer_rows=64))
    assert [tuple(r.tolist()) for r in batch] == mixed[:16]
