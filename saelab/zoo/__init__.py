"""The model zoo: small transformers saelab trains itself and ships, so it runs with no hub.

Each zoo model is a Hugging Face directory (config.json, model.safetensors, tokenizer.json) plus
`zoo_card.json` recording how it was built and how well it predicts held-out text. Shipped
models live in the package (`saelab/zoo/models/NAME`, read-only); `saelab zoo build NAME`
writes to the user's zoo directory (`user_dir()`), never into the package. `zoo:NAME` resolves
a shipped model first, then the user's: a local rebuild of a shipped recipe never silently
replaces the weights that dictionaries trained on `zoo:NAME` expect (load it by its path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from saelab.errors import SaelabError

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "zoo:pystdlib-4l-v2"


@dataclass(frozen=True)
class ZooRecipe:
    """How to build one zoo model (GPT-2 architecture, ReLU MLPs, byte-level tokenizer).

    Fields:
        name: the NAME in `zoo:NAME`.
        n_layer, d_model, n_head, d_mlp, context_length: architecture.
        tokens: training tokens (one pass over `batch_size`-row batches).
        batch_size: rows per step.
        lr: peak AdamW learning rate (`saelab.schedule`: linear warmup over 5% of steps,
            constant, linear decay to 0 over the final `decay_fraction`).
        decay_fraction: final share of steps over which the learning rate decays.
        dropout: dropout on embeddings, residual and attention (GPT-2's is 0.1; 0 learns much
            faster at this size and token budget).
        init_std: std of the normal initialisation of every weight (GPT-2's is 0.02; attention
            learns to copy, the induction step, far sooner from a larger one: see tasks-4l).
        tie_embeddings: the unembedding is the embedding's transpose (GPT-2's choice).
        shuffle_rows: stdlib rows are drawn at random from a buffer of this many (0: in file
            order, where a batch is a few consecutive stretches of one file).
        seed: seeds initialisation and data order; the build is reproducible on one interpreter.
        checkpoints: intermediate checkpoints kept in `checkpoints/step-N/` beside the model (HF
            directories, not shipped in the package): the initial model, this many at steps
            S/2^n .. S/2 (S = total steps; early steps are where sparsity emerges), and the
            final one. `saelab sparsity --checkpoints` plots density against step from them.
        corpus: "stdlib" (byte tokenizer, standard-library source) or "tasks" (word-level
            tokenizer, synthetic circuit-task text mixed with stdlib source: `saelab.zoo.task_corpus`).
        stdlib_fraction: for the tasks corpus, the share of each batch's rows that is stdlib.
        copy_steps: for the tasks corpus, steps of pure copying data before the task mix
            (`saelab.zoo.task_corpus.copy_rows`): the copying the tasks need forms there first.
        copy_fraction: for the tasks corpus, the share of each later batch's rows that stays
            copying, so induction keeps being trained after the warm-up.
        gt_all_starts: for the tasks corpus, greater-than text starts at any year 00-98 (not
            only the task's 02-98), so the task's counterfactual start year 01 is one it knows.
        pack_rows: for the tasks corpus, a task row's tail is a random sequence and its repeat
            instead of EOT padding.
        gt_end_years: for the tasks corpus with gt_all_starts, greater-than's end year is
            "uniform" above the start or "near" it (a geometric gap, mean 5 years).
        gt_weight: for the tasks corpus, greater-than documents are drawn this many times as
            often as each other task's (1: uniform over the four tasks).
        (`saelab.zoo.task_corpus` says why each of the last five exists.)
    """

    name: str
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    context_length: int = 128
    tokens: int = 4_000_000
    batch_size: int = 32
    lr: float = 2e-3
    decay_fraction: float = 0.2
    shuffle_rows: int = 8192
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    seed: int = 0
    checkpoints: int = 4
    corpus: str = "stdlib"
    stdlib_fraction: float = 0.25
    copy_steps: int = 0
    copy_fraction: float = 0.0
    gt_all_starts: bool = False
    pack_rows: bool = False
    gt_end_years: str = "uniform"
    gt_weight: int = 1


RECIPES = {r.name: r for r in [
    ZooRecipe("pystdlib-4l-v2", context_length=256, tokens=10_000_000, batch_size=16, lr=3e-3),
    ZooRecipe("tasks-4l", n_head=8, context_length=96, tokens=12_600_000, batch_size=32,
              lr=3e-3, corpus="tasks", stdlib_fraction=0.125, copy_steps=1500, init_std=0.08,
              tie_embeddings=False, checkpoints=0),
    ZooRecipe("tasks-4l-v2", n_head=8, context_length=96, tokens=15_000_000, batch_size=32,
              lr=3e-3, corpus="tasks", stdlib_fraction=0.125, copy_steps=2000, init_std=0.08,
              tie_embeddings=False, checkpoints=0, copy_fraction=0.125, gt_all_starts=True,
              pack_rows=True),
    ZooRecipe("tasks-4l-v3", n_head=8, context_length=96, tokens=15_000_000, batch_size=32,
              lr=3e-3, corpus="tasks", stdlib_fraction=0.125, copy_steps=2000, init_std=0.08,
              tie_embeddings=False, checkpoints=0, copy_fraction=0.125, gt_all_starts=True,
              pack_rows=True, gt_end_years="near", gt_weight=3),
]}


def user_dir() -> Path:
    """Where `saelab zoo build` writes: $SAELAB_ZOO_DIR, else $XDG_CACHE_HOME/saelab/zoo, else
    ~/.cache/saelab/zoo."""
    if os.environ.get("SAELAB_ZOO_DIR"):
        return Path(os.environ["SAELAB_ZOO_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "saelab" / "zoo"


def _models_in(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.glob("*")) if (p / "config.json").exists()}


def installed_models() -> dict[str, Path]:
    """Every model `zoo:NAME` can load, name -> directory; a shipped model wins over a user
    build of the same name."""
    return {**_models_in(user_dir()), **_models_in(MODELS_DIR)}


def model_dir(name: str) -> Path:
    """Directory of a zoo model (`name` with or without the `zoo:` prefix)."""
    name = name.removeprefix("zoo:")
    path = installed_models().get(name)
    if path is None:
        shipped = ", ".join(f"zoo:{n}" for n in shipped_models()) or "none"
        hint = f"; build it with `saelab zoo build {name}`" if name in RECIPES else ""
        raise SaelabError(f"zoo model {name!r} is not installed (shipped: {shipped}){hint}")
    return path


def shipped_models() -> list[str]:
    return list(_models_in(MODELS_DIR))


def card(name: str) -> dict:
    """The zoo card of an installed model: recipe, data, held-out loss vs a unigram baseline."""
    path = model_dir(name) / "zoo_card.json"
    return json.loads(path.read_text()) if path.exists() else {}
