"""Tokens as display text: the bytes each token stands for, joined into whole characters.

Byte-level tokenizers (the zoo models: one token per byte; GPT-2's BPE) split a multi-byte UTF-8
character over several tokens. Decoded alone, such a token is not text; shown by its vocabulary
name it is mojibake (byte 0xd0 appears as "Ð"). Here a token is its bytes, and a run of tokens is
shown as whole characters where its bytes form them, and as `\\xNN` escapes where they do not (a
token alone that is part of a character, a character cut by the edge of a context, invalid UTF-8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, 0x7f-0xa0, 0xad) are shifted to U+0100 onwards in
    byte order, so every byte is one visible character in a vocabulary."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    table.update({chr(0x100 + i): b for i, b in enumerate(shifted)})
    return table


BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer, ids) -> dict[int, bytes]:
    """The bytes each token id stands for (ids < 0, padding beyond a row, are left out).

    A token that decodes alone to text is that text's UTF-8. One that does not (a part of a
    character: the decoder gives U+FFFD) is read from its vocabulary name: a byte-level name
    through GPT-2's alphabet, a `<0xNN>` byte-fallback name as its byte; any other name is
    taken as text."""
    out = {}
    for i in {int(i) for i in ids}:
        if i < 0:
            continue
        text = tokenizer.decode([i])
        if "\ufffd" in text:
            name = str(tokenizer.convert_ids_to_tokens(i))
            if (m := _BYTE_TOKEN.fullmatch(name)) is not None:
                out[i] = bytes([int(m.group(1), 16)])
                continue
            if all(ch in BYTE_LEVEL for ch in name):
                out[i] = bytes(BYTE_LEVEL[ch] for ch in name)
                continue
            text = name
        out[i] = text.encode("utf-8")
    return out


def _characters(data: bytes) -> list[tuple[int, int, str]]:
    """(start, stop, text) of each character of `data`, in order; a byte that begins no valid
    UTF-8 character is a unit of its own, shown as `\\xNN`."""
    out, i = [], 0
    while i < len(data):
        for n in range(1, 5):  # 1-4 bytes; a lead byte fixes the length, so the first fit is it
            try:
                out.append((i, i + n, data[i:i + n].decode("utf-8")))
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append((i, i + 1, f"\\x{data[i]:02x}"))
            n = 1
        i += n
    return out


def byte_text(data: bytes) -> str:
    """`data` as display text: its characters, and `\\xNN` for bytes that form none."""
    return "".join(text for _, _, text in _characters(data))


@dataclass(frozen=True)
class Piece:
    """A run of tokens shown as one: tokens `start` to `stop` - 1 of a sequence, `text` their
    display text. A piece is one token unless a character's bytes span several tokens."""

    text: str
    start: int
    stop: int


def display_pieces(tokens: list[bytes]) -> list[Piece]:
    """A token sequence (each token's bytes) as display pieces, in order: consecutive tokens are
    joined exactly where a UTF-8 character's bytes cross between them; bytes that form no whole
    character within the sequence show as `\\xNN`."""
    data = b"".join(tokens)
    chars = _characters(data)
    starts = {start for start, _, _ in chars} | {len(data)}
    pieces: list[Piece] = []
    first, offset, c = 0, 0, 0
    for t, part in enumerate(tokens):
        offset += len(part)
        if offset not in starts:  # a character continues into the next token
            continue
        text = []
        while c < len(chars) and chars[c][1] <= offset:
            text.append(chars[c][2])
            c += 1
        pieces.append(Piece("".join(text), first, t + 1))
        first = t + 1
    return pieces
