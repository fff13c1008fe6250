"""`probes`: sparse probing and absorption of one dictionary on exact Python labels."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from saelab import __version__
from saelab.data.heldout import resolve_dictionary
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.probes import absorption
from saelab.evals.probes.collect import TEST_FRACTION, Collected, collect, collect_tasks
from saelab.evals.probes.labels import (
    LABELS,
    LETTER_FAMILY,
    LETTER_LABELS,
    LETTER_NEGATIVES,
    Label,
    label_matrix,
)
from saelab.evals.probes.logistic import L2
from saelab.evals.probes.probing import KS, alive_latents, balanced, latent_label_f1, probe_label
from saelab.evals.probes.task_labels import TASK_LABELS, TASKS
from saelab.formats import load_one
from saelab.models import HookedModel

DEFAULT_TOKENS = 2**16
MAX_TRAIN, MAX_TEST, MIN_PER_CLASS = 2000, 500, 20
SOURCES = {"python": LABELS, "letters": LETTER_LABELS, "tasks": TASK_LABELS}  # `probes(labels=...)`


def check_label_source(labels: str) -> None:
    if labels not in SOURCES:
        raise SaelabError(f"unknown probe labels {labels!r}; use one of {', '.join(SOURCES)}")


@torch.no_grad()
def probes(
    sae_or_path,
    tokens: int = DEFAULT_TOKENS,
    model: HookedModel | str | None = None,
    data: TokenData | str | None = None,
    context_length: int | None = None,
    batch_rows: int = 32,
    device: str = "cpu",
    seed: int = 0,
    labels: str = "python",
) -> dict:
    """Probe a dictionary's latents for Python token labels; returns the report
    `write_probes_report` writes (probing.json).

    Args:
        sae_or_path: a dictionary directory or a loaded SAE (as for `saelab.evals.evaluate`).
        tokens: positions to probe (whole rows of held-out Python files, drawn at random).
        model, data, context_length, batch_rows, device: as for `evaluate`; `data` must hold
            Python source (default: the dictionary's data, else builtin:stdlib).
        seed: which rows and which files are held out, the balanced samples and the floor's
            random latents.
        labels: "python" (`labels.LABELS` on the data's held-out files), "letters" (their
            first-letter labels alone: absorption and that family, in less time) or "tasks"
            (`task_labels.TASK_LABELS` on prompts of the circuit-task generators, for the task
            model; `data` is then not read).

    Per label (`labels.LABELS`): held-out accuracy and F1 of the ceiling (the full model
    activation), of the top-k latents by mean difference and of k random live latents, for k in
    `probing.KS`. Per first letter: absorption (`absorption`). Per latent: the label its firing
    predicts best, with F1.
    """
    if tokens < 1 or batch_rows < 1:
        raise SaelabError(f"tokens and batch_rows must be positive, got {tokens} and {batch_rows}")
    check_label_source(labels)
    start = time.perf_counter()
    path = str(sae_or_path) if isinstance(sae_or_path, (str, Path)) else None
    sae = load_one(sae_or_path, device) if isinstance(sae_or_path, (str, Path)) else sae_or_path
    if sae.cfg.transcoder:  # absorption compares decoder rows (output space) with input-space probes
        raise SaelabError(f"probes need an SAE, but {path or 'this dictionary'} is a transcoder "
                          f"({sae.cfg.hook} -> {sae.cfg.target_hook}); evaluate it without --probes")
    sae, _, model, data = resolve_dictionary(sae, model, data, context_length, device)
    was_training = getattr(sae, "training", False)
    sae.eval()
    try:
        if labels == "tasks":
            got = collect_tasks(model, sae, tokens, batch_rows, seed)
        else:
            got = collect(model, sae, data, tokens, batch_rows, seed, SOURCES[labels], (MAX_TRAIN, MAX_TEST))
    finally:
        if was_training:
            sae.train()
    report = analyse(got, sae.W_dec.detach().float().cpu(), seed, SOURCES[labels])
    return {"dictionary": path, "model": model.spec, "hook": sae.cfg.hook, "n_latents": sae.cfg.n_latents,
            "k": sae.cfg.k, "allocator": sae.cfg.allocator, "label_source": labels,
            "data": "task generators: " + ", ".join(TASKS) if labels == "tasks" else data.spec,
            "context_length": data.context_length, "files": got.files, "files_skipped": got.skipped,
            "rows": got.rows, "positions": int((budget := _budget(got)).sum()),
            "rare_positions": len(budget) - int(budget.sum()), "test_fraction_files": TEST_FRACTION,
            "ks": list(KS), "l2": L2, "seed": seed, "letter_negatives": LETTER_NEGATIVES, **report,
            "seconds": round(time.perf_counter() - start, 2), "saelab_version": __version__}


def analyse(got: Collected, w_dec: torch.Tensor, seed: int, labels: tuple[Label, ...] = LABELS) -> dict:
    """Probing rows per label, absorption per letter, and each latent's best label."""
    feats = got.feats
    y, scope = label_matrix(got.fields, labels)
    budget = _budget(got)
    if got.drawn_for is not None:  # rare labels' extra rows are theirs alone
        scope &= budget[:, None] | (got.drawn_for[:, None] == torch.arange(len(labels))[None, :])
    gen = torch.Generator().manual_seed(seed)
    alive = alive_latents(feats)
    if not len(alive):
        raise SaelabError("no latent is active on any probed position; nothing to probe")
    rows, skipped, letters = {}, {}, {}
    for j, lab in enumerate(labels):
        split = balanced(y[:, j], scope[:, j], feats.test, MAX_TRAIN, MAX_TEST, MIN_PER_CLASS, gen)
        if split is None:
            skipped[lab.name] = int((y[:, j] & scope[:, j]).sum())
            continue
        res = probe_label(feats, split, KS, alive, gen)
        rows[lab.name] = {"family": lab.family, "positives": int((y[:, j] & scope[:, j]).sum()), **res.row}
        if lab.family == LETTER_FAMILY:
            letters[lab.name.split(":")[1]] = absorption.letter_absorption(feats, y[:, j], split, res, w_dec)
    f1 = latent_label_f1(feats, y, budget)
    best_f1, best = f1.max(1)
    return {"labels": rows, "labels_skipped": skipped,
            "absorption": {"letters": letters, **absorption.summary(letters)},
            "latent_labels": {"names": [lab.name for lab in labels], "best": best.tolist(),
                              "f1": [round(v, 4) for v in best_f1.tolist()]}}


def _budget(got: Collected) -> torch.Tensor:
    """(N,) bool: positions of the budget's rows (not drawn for a rare label)."""
    n = len(got.fields)
    return torch.ones(n, dtype=torch.bool) if got.drawn_for is None else got.drawn_for < 0
