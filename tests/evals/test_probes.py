"""Probes: labels checked by hand, planted features and planted absorption against their plants."""

from __future__ import annotations

import torch

from saelab.evals.probes.collect import Collected, _rare_rows, _Row
from saelab.evals.probes.labels import (
    FIELDS,
    LABELS,
    LETTER_LABELS,
    LETTERS,
    NONE,
    TYPES,
    WORDS,
    char_labels,
    label_matrix,
    token_fields,
)
from saelab.evals.probes.probing import Features, Split, score
from saelab.evals.probes.run import analyse

SOURCE = '''"""Module doc."""
def f(self, x):  # note (a)
    """Doc."""
    y = f"a{x}" + 'q'
    return g((x, [1]),
             2)
'''


def _at(src: str, needle: str, nth: int = 0) -> int:
    i = -1
    for _ in range(nth + 1):
        i = src.index(needle, i + 1)
    return i


def _field(c: torch.Tensor, i: int, name: str) -> int:
    return int(c[i, FIELDS.index(name)])


def test_char_labels_by_hand():
    c = char_labels(SOURCE)
    assert c is not None and len(c) == len(SOURCE)
    t = TYPES.index
    checks = [  # (needle, nth occurrence, field, expected)
        ('"""Module', 0, "docstring", 1), ('"""Module', 0, "type", t("STRING")),
        ("def", 0, "type", t("KEYWORD")), ("def", 0, "word", WORDS.index("def")),
        ("self", 0, "word", WORDS.index("self")), ("self", 0, "letter", NONE),  # first char: none
        ("elf", 0, "letter", LETTERS.index("s")), ("(self", 0, "bracket", 0),
        ("self", 0, "bracket", 1), ("# note (a)", 0, "type", t("COMMENT")),
        ("(a)", 0, "bracket", 0),  # brackets in a comment are not brackets
        ('"""Doc', 0, "docstring", 1), ('"""Doc', 0, "indent", 1),
        ('f"a', 0, "fstring", 1), ('{x}', 0, "fstring", 1), ("{x}", 0, "bracket", 0),
        ("'q'", 0, "fstring", 0), ("'q'", 0, "docstring", 0), ("'q'", 0, "type", t("STRING")),
        ("y =", 0, "type", t("NAME")), ("=", 0, "type", t("OP")),
        ("((x", 0, "bracket", 0), ("(x, [", 0, "bracket", 1), ("x, [", 0, "bracket", 2),
        ("[1]", 0, "bracket", 2), ("1]", 0, "bracket", 3), ("1]", 0, "type", t("NUMBER")),
        ("]", 0, "bracket", 2), ("),\n", 0, "bracket", 1), ("2)", 0, "bracket", 1),
        ("2)", 0, "indent", 1),  # a continuation line keeps its logical line's indentation
        ("        2", 0, "bracket", 1),  # leading whitespace takes the next token's depths
        ("return", 0, "word", WORDS.index("return")), ("return", 0, "indent", 1),
    ]
    got = [(n, f, _field(c, _at(SOURCE, n, k), f)) for n, k, f, _ in checks]
    assert got == [(n, f, v) for n, _, f, v in checks]


def test_first_letter_negatives_are_identifiers_of_other_letters():
    """SAEBench's contrast: letter a against identifiers spelled from another letter; the
    keyword, operators, spaces and each identifier's first character are neither class."""
    src = "if ab: cd = 1\n"  # i0 f1 _2 a3 b4 :5 _6 c7 d8 _9 =10 _11 1(12) \n13
    y, scope = label_matrix(char_labels(src), LETTER_LABELS)
    a, c = LETTERS.index("a"), LETTERS.index("c")
    assert torch.nonzero(y[:, a]).flatten().tolist() == [4]
    assert torch.nonzero(y[:, c]).flatten().tolist() == [8]
    assert torch.nonzero(scope[:, a]).flatten().tolist() == [4, 8]
    assert (scope == scope[:, :1]).all()  # one scope for every letter


def test_rare_label_rows_are_drawn_until_each_side_has_enough():
    """Rows holding f-string positives are added from the pool in order, per side, until the
    side's positives reach the wanted count; rows without positives are never added."""
    fstring = LABELS.index(next(lab for lab in LABELS if lab.rare))

    def row(positives: int, test: bool) -> _Row:
        fields = torch.full((4, len(FIELDS)), NONE)
        fields[:, FIELDS.index("fstring")] = (torch.arange(4) < positives).long()
        return _Row([0] * 4, fields, test)

    drawn = [row(1, False), row(0, True)]
    pool = [row(0, False), row(2, False), row(3, True), row(4, False), row(1, True), row(2, False)]
    got = _rare_rows(drawn, pool, LABELS, want=(5, 2))
    # train: 1 drawn + 2 + 4 reaches 5 (the last pool row is not needed); test: 3 reaches 2
    at = {id(r): i for i, r in enumerate(pool)}
    assert [(at[id(r)], j) for r, j in got] == [(1, fstring), (2, fstring), (3, fstring)]


def test_untokenizable_source_is_none():
    assert char_labels("def f(:\n    '''unterminated\n") is None


def test_byte_tokens_take_their_characters_labels():
    from transformers import AutoTokenizer

    from saelab.zoo import DEFAULT_MODEL, MODELS_DIR

    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / DEFAULT_MODEL.removeprefix("zoo:"))
    src = "é = 'ü'  # ß\n"
    enc = tokenizer(src, add_special_tokens=False, return_offsets_mapping=True)
    fields = token_fields(char_labels(src), enc["offset_mapping"])
    types = fields[:, FIELDS.index("type")].tolist()
    # bytes: é (2 bytes, NAME), space, =, space, ' ü(2 bytes) ' (STRING), 2 spaces, # space ß(2) (COMMENT), \n
    t = TYPES.index
    assert types == [t("NAME")] * 2 + [NONE, t("OP"), NONE] + [t("STRING")] * 4 + [NONE] * 2 + \
        [t("COMMENT")] * 4 + [NONE]


def _features(n: int, n_latents: int, planted: dict[int, torch.Tensor], d: int, gen) -> Features:
    """Codes with each planted latent firing (value 3) exactly where its mask is True, plus
    three noise latents per position drawn from the unplanted ones; x is noise."""
    free = torch.tensor([j for j in range(n_latents) if j not in planted])
    noise = free[torch.randint(len(free), (n, 3), generator=gen)]
    idx = torch.cat([torch.tensor(list(planted)).expand(n, -1), noise], 1)
    vals = torch.cat([torch.stack([3.0 * m for m in planted.values()], 1),
                      torch.rand(n, 3, generator=gen) + 0.1], 1)
    test = torch.arange(n) % 10 < 3
    return Features(torch.randn(n, d, generator=gen), idx, vals, n_latents, test)


def _collected(feats: Features, fields: torch.Tensor) -> Collected:
    return Collected(feats, fields, files=1, skipped=0, rows=1)


def test_planted_latent_probes_perfectly_and_a_random_one_at_chance():
    gen = torch.Generator().manual_seed(0)
    n, n_latents = 4000, 200
    name = torch.rand(n, generator=gen) < 0.5
    feats = _features(n, n_latents, {7: name}, 8, gen)
    fields = torch.full((n, len(FIELDS)), NONE)
    fields[name, FIELDS.index("type")] = TYPES.index("NAME")
    r = analyse(_collected(feats, fields), torch.randn(n_latents, 8), seed=0)
    row = r["labels"]["NAME"]
    assert row["top_latents"][0] == 7
    assert row["sparse"]["1"] == {"accuracy": 1.0, "f1": 1.0}
    assert 0.4 < row["floor"]["1"]["accuracy"] < 0.6
    assert r["latent_labels"]["names"][r["latent_labels"]["best"][7]] == "NAME"
    assert r["latent_labels"]["f1"][7] == 1.0
    # one unplanted latent, probed alone on the same balanced sets: chance
    y = name
    train, test = torch.nonzero(~feats.test).flatten(), torch.nonzero(feats.test).flatten()
    split = Split(train, y[train], test, y[test])
    z = feats.dense(torch.arange(n))[:, [11]]
    assert 0.4 < score(z[train], split, z[test])[1]["accuracy"] < 0.6


def test_planted_absorption_is_found_at_the_planted_rate():
    """Letter a: its main latent 0 fires on every positive but the absorbed class (a fifth of
    them), where latent 1 fires instead, its decoder row at 45 degrees to the letter's direction.
    Latent 1 also fires on many negatives, so it is no split of the letter: absorption."""
    gen = torch.Generator().manual_seed(1)
    n, d, n_latents = 6000, 16, 64
    pos = torch.rand(n, generator=gen) < 0.4
    absorbed = pos & (torch.rand(n, generator=gen) < 0.2)
    decoy = ~pos & (torch.rand(n, generator=gen) < 0.3)
    feats = _features(n, n_latents, {0: pos & ~absorbed, 1: absorbed | decoy}, d, gen)
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    x = 0.3 * torch.randn(n, d, generator=gen) + 3 * pos[:, None] * e0 + 3 * (absorbed | decoy)[:, None] * e1
    feats = Features(x, feats.idx, feats.vals, n_latents, feats.test)
    w_dec = torch.nn.functional.normalize(torch.randn(n_latents, d, generator=gen), dim=1)
    w_dec[0], w_dec[1] = e0, (e0 + e1) / 2**0.5
    fields = torch.full((n, len(FIELDS)), NONE)  # negatives: identifiers spelled from b
    fields[:, FIELDS.index("letter")] = torch.where(pos, LETTERS.index("a"), LETTERS.index("b"))
    r = analyse(_collected(feats, fields), w_dec, seed=0, labels=LETTER_LABELS[:1])
    a = r["absorption"]["letters"]["a"]
    assert a["included"] and a["main_latents"] == [0] and not a["split"]
    planted = int((absorbed & feats.test).sum()) / int((pos & feats.test).sum())
    assert a["probe_true_positives"] == int((pos & feats.test).sum())
    assert abs(a["rate"] - planted) < 1e-9 and 0.15 < planted < 0.25
    assert r["absorption"]["mean_rate"] == a["rate"]


def test_task_roles_align_to_the_word_tokenizer_by_hand():
    from transformers import AutoTokenizer

    from saelab.evals.probes import task_labels as T
    from saelab.zoo import MODELS_DIR

    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "tasks-4l-v2")
    got = []
    for task, text, spans in T.prompts(1, seed=0):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        fields = T.token_fields(task, text, spans, enc["offset_mapping"])
        assert (fields[:, 0] == task).all()
        got.append([(text[a:b], T.ROLES[r]) for (a, b), (_, r) in
                    zip(enc["offset_mapping"], fields.tolist(), strict=True) if r != NONE])
    # the prompts, read by eye: tasks.generate(name, 1, seed=0)
    # "The local big hospital Alice and Claire went to had a bed. Alice offered the bed to"
    # "The occupation lasted from the year 1755 to the year 17"
    # 'def merge(self, stone, label, tree, image, files, path):\n    """width user gap\n\n
    #     :param stone: data value\n    :param label: tree read\n    :param'
    assert got == [
        [("Alice", "S"), ("Claire", "IO"), ("Alice", "S")],
        [("55", "year")],
        [(a, "def arg") for a in ("stone", "label", "tree", "image", "files", "path")]
        + [("stone", "param"), ("label", "param")],
    ]


def test_probes_refuse_a_transcoder_before_loading_a_model(tmp_path):
    import pytest

    from saelab.errors import SaelabError
    from saelab.evals.probes import probes
    from saelab.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=8, n_latents=16, k=2, hook="blocks.0.ln2.hook_normalized",
                        target_hook="blocks.0.hook_mlp_out", d_out=4, model="no-such-model"))
    sae.save(tmp_path / "tc")
    for given in (sae, str(tmp_path / "tc")):  # a missing model would fail later, in a different way
        with pytest.raises(SaelabError, match="transcoder"):
            probes(given)


def test_codes_of_different_widths_per_batch_are_padded_not_refused():
    """Threshold-mode dictionaries return codes as wide as a batch's busiest token, so two
    batches differ in width (feature_choice / mutual_choice probes crashed on torch.cat)."""
    from types import SimpleNamespace

    from saelab.evals.probes.collect import _Row, encode_rows

    class Model:
        device = "cpu"
        tokenizer = SimpleNamespace(bos_token_id=None, eos_token_id=0)

        def activations(self, ids, hooks):
            return {hooks[0]: ids.float().unsqueeze(-1)}

    class Sae:  # width = the batch's largest token id; latent j = j, value = id
        cfg = SimpleNamespace(hook="h", n_latents=8)
        W_dec = torch.zeros(8, 1)

        def encode(self, x):
            width = int(x.max())
            vals = x.expand(-1, width).clone()
            return torch.arange(width).expand(len(x), -1), vals

    rows = [_Row([1, 2], torch.zeros(2, 1), False), _Row([5], torch.zeros(1, 1), True)]
    feats = encode_rows(Model(), Sae(), rows, batch_rows=1)
    assert feats.idx.shape == (3, 5)
    assert feats.vals[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert feats.vals[:, 2:].sum(1).tolist() == [0.0, 0.0, 15.0]  # padding slots carry 0


def test_rows_drawn_for_a_rare_label_are_in_its_scope_alone():
    """Positions drawn for the f-string label count for it, not for NAME (whose positives and
    latent F1 come from the budget's positions only)."""
    gen = torch.Generator().manual_seed(2)
    n, n_latents = 4000, 50
    name = torch.rand(n, generator=gen) < 0.5
    fstring = torch.rand(n, generator=gen) < 0.3
    extra = torch.arange(n) >= 3000
    feats = _features(n, n_latents, {3: name | extra, 4: fstring}, 8, gen)  # 3 also fires on every extra
    fields = torch.full((n, len(FIELDS)), NONE)
    fields[:, FIELDS.index("fstring")] = fstring.long()
    fields[name, FIELDS.index("type")] = TYPES.index("NAME")
    rare = LABELS.index(next(lab for lab in LABELS if lab.rare))
    drawn_for = torch.where(extra, rare, -1)
    r = analyse(Collected(feats, fields, 1, 0, 1, drawn_for), torch.randn(n_latents, 8), seed=0)
    assert r["labels"]["NAME"]["positives"] == int(name[:3000].sum())
    assert r["labels"]["f-string"]["positives"] == int(fstring.sum())
    assert r["latent_labels"]["f1"][3] == 1.0  # latent 3 = NAME exactly on the budget's positions
