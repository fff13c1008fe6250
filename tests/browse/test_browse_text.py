"""Tokens as display text: byte tokens joined into whole characters, escapes for the rest,
against hand-computed cases; and how a page shows them."""

import html as htmlmod

import pytest

from saelab.browse.card import Context, LatentCard
from saelab.browse.html import context_html, index_row
from saelab.browse.text import BYTE_LEVEL, Piece, byte_text, display_pieces, token_bytes


def pieces(tokens):
    return [(p.text, p.start, p.stop) for p in display_pieces(tokens)]


@pytest.mark.parametrize("tokens, expected", [
    ([b"d", b"e", b"f"], [("d", 0, 1), ("e", 1, 2), ("f", 2, 3)]),  # ASCII: a piece per token
    ([b"c", b"a", b"f", b"\xc3", b"\xa9"], [("c", 0, 1), ("a", 1, 2), ("f", 2, 3), ("é", 3, 5)]),
    ([b"\xe2", b"\x86", b"\x92", b" "], [("→", 0, 3), (" ", 3, 4)]),  # U+2192, three bytes
    ([b"\xf0", b"\x9f", b"\x98", b"\x80"], [("😀", 0, 4)]),  # U+1F600, four bytes
    ([b"a", b"\xa9", b"b"], [("a", 0, 1), ("\\xa9", 1, 2), ("b", 2, 3)]),  # isolated continuation
    ([b"\x86", b"\x92", b"x"], [("\\x86", 0, 1), ("\\x92", 1, 2), ("x", 2, 3)]),  # cut at the start
    ([b"x", b"\xe2", b"\x86"], [("x", 0, 1), ("\\xe2", 1, 2), ("\\x86", 2, 3)]),  # cut at the end
    ([b"\xc3", b"a"], [("\\xc3", 0, 1), ("a", 1, 2)]),  # a lead byte with no continuation
    ([b"\xc0", b"\xaf", b"\xff"], [("\\xc0", 0, 1), ("\\xaf", 1, 2), ("\\xff", 2, 3)]),  # overlong, 0xff
    ([b" \xe2\x80", b"\x94x", b"y"], [(" —x", 0, 2), ("y", 2, 3)]),  # BPE tokens sharing a character
    ([b"\xc3\xa9\xc3", b"\xa9"], [("éé", 0, 2)]),
])
def test_display_pieces_by_hand(tokens, expected):
    assert pieces(tokens) == expected


def test_a_token_alone():
    assert byte_text(b"\xd0") == "\\xd0" and byte_text(b"\xd0\xb5") == "е"  # Cyrillic ie
    assert byte_text(b"a\xc3") == "a\\xc3" and byte_text(b"") == ""


class _Tokenizer:
    """What `token_bytes` reads of a tokenizer: decode (U+FFFD for part of a character, as
    Hugging Face decoders give) and the vocabulary names."""

    def __init__(self, names: dict[int, str], texts: dict[int, str]):
        self.names, self.texts = names, texts

    def decode(self, ids):
        return self.texts[ids[0]]

    def convert_ids_to_tokens(self, i):
        return self.names[i]


def test_token_bytes_reads_byte_level_and_byte_fallback_names():
    names = {0: "Ã", 1: "Ġâ", 2: "<0xD0>", 3: "▁é", 4: "Ġhi", 5: "<odd>"}
    texts = {0: "\ufffd", 1: " \ufffd", 2: "\ufffd", 3: " é", 4: " hi", 5: "\ufffd"}
    got = token_bytes(_Tokenizer(names, texts), [0, 1, 2, 3, 4, 5, -1])
    assert got == {0: b"\xc3", 1: b" \xe2", 2: b"\xd0", 3: " é".encode(), 4: b" hi", 5: b"<odd>"}


def test_zoo_tokenizer_tokens_are_its_bytes(zoo_model):
    """The zoo models' vocabulary is one token per byte (id = byte value), named in GPT-2's
    byte-level alphabet: the table read back from the tokenizer's own names."""
    tok = zoo_model.tokenizer
    assert {tok.convert_ids_to_tokens(i): i for i in range(256)} == BYTE_LEVEL
    got = token_bytes(tok, range(256))
    assert all(got[i] == bytes([i]) for i in range(256))
    assert token_bytes(tok, tok.encode("é→", add_special_tokens=False)) == {
        0xc3: b"\xc3", 0xa9: b"\xa9", 0xe2: b"\xe2", 0x86: b"\x86", 0x92: b"\x92"}


def _context(center: int) -> Context:
    raw = [b"x", b" ", b"\xc3", b"\xa9", b"!"]  # "x é!"
    return Context([byte_text(b) for b in raw], [0.0, 0.0, 0.5, 2.0, 0.0], center, 2.0, 7,
                   display_pieces(raw))


def test_a_character_over_byte_tokens_shows_whole_and_highlighted():
    c = _context(3)  # chosen for the é's second byte
    page = context_html(c, vmax=2.0)
    assert page.count("<span") == 2  # the activation value, and é as one piece
    assert '<span class="s9 mx" title="\\xc3: 0.5 · \\xa9: 2">é</span>' in page
    assert "Ã" not in page and "©" not in page
    assert c.snippet() == "x é" and _context(2).snippet() == "x é"  # the whole character
    assert "".join(p.text for p in c.shown()) == "x é!"
    card = LatentCard(latent=1, hook="h", window=9, count=1, max=2.0, mean=2.0, histogram=[],
                      top=[c, _context(2)], bands=[], promoted=None, suppressed=None,
                      effect_note="", neighbours=[])
    assert card.top_tokens() == [("\\xa9", 1), ("\\xc3", 1)]
    assert card.table[0]["text"] == "x é!"
    row = htmlmod.unescape(index_row(card, "1.html"))
    assert "\\xa9</span>×1" in row and "©" not in row


def test_contexts_without_pieces_show_one_piece_per_token():
    c = Context(["a", "b"], [1.0, 0.0], 0, 1.0, 0)
    assert c.shown() == [Piece("a", 0, 1), Piece("b", 1, 2)] and c.snippet() == "a"
