"""`evaluate`: one SAE scored on held-out tokens, from its dictionary directory alone.

Every number comes from the same rows of held-out text and skips BOS/pad positions: the SAE
never sees them (training drops them too) and they are never spliced. Two passes over the rows:
the first runs the clean model, the SAE's reconstruction and zero ablation; the second runs
mean ablation, whose mean is the first pass's mean activation over the whole eval set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from saelab import __version__
from saelab.checks import check_device, check_field_types, check_number, doc_field
from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows, resolve_dictionary
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.evals.latents import LatentStats
from saelab.evals.reconstruction import ReconstructionStats
from saelab.evals.spliced import SplicedLoss, prediction_mask
from saelab.models import HookedModel
from saelab.tasks import generate

DEFAULT_TOKENS = 2**15  # the end-of-run eval's default window (`TrainConfig.eval_tokens`)


@dataclass(frozen=True)
class EvalConfig:
    """`saelab eval`: `evaluate`'s settings as specs (each documented once: `saelab eval --help`
    shows the same text), and where the report goes. `settings()` is what `evaluate` takes."""

    tokens: int | None = doc_field(None, "Held-out tokens to evaluate on (whole rows until at "
                                   "least this many); also the dead-latent window.",
                                   f"the end-of-run eval's window in cfg.json, else {DEFAULT_TOKENS}")
    data: str | None = doc_field(None, "Token data whose held-out split is used: builtin:stdlib, "
                                 "a .txt/.jsonl file or directory, or hf:NAME.",
                                 "the data cfg.json says the SAE was trained on")
    context_length: int | None = doc_field(None, "Tokens per row.", "the SAE's training context "
                                           "from cfg.json, else min(model context, 128)")
    model: str | None = doc_field(None, "Model spec to evaluate in.", "the one cfg.json names")
    batch_rows: int = doc_field(32, "Rows per forward pass.")
    out: str | None = doc_field(None, "Where to write eval.json, eval.md and the PNGs, a new or "
                                "empty directory.", "the dictionary directory, whose report they "
                                "replace", path=True)
    overwrite: bool = doc_field(False, "Allow writing into a non-empty --out directory.")
    device: str = doc_field("cpu", "Torch device.")
    probes: bool = doc_field(False, "Also probe the latents for exact Python labels (sparse "
                             "probing, absorption): probing.json, probing.md, probing.png.")
    probe_tokens: int = doc_field(2**16, "Held-out positions the probes read (with --probes).")
    probe_labels: str = doc_field("python", "With --probes: python (tokenize labels on the data's "
                                  "held-out files), letters (their first-letter labels alone: "
                                  "absorption, in less time) or tasks (roles from the circuit-task "
                                  "generators, for zoo:tasks-4l-v2).")
    task: str | None = doc_field(None, "Also measure how faithful circuits of the dictionary's "
                                 "latents (and error node) are on this task (ioi, greater-than, "
                                 "docstring, induction): CPR, CMD and nodes to f >= 0.8, EAP-IG "
                                 "scores, 48 held-out prompts.", "no circuit eval")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name, low in (("tokens", 1), ("batch_rows", 1), ("context_length", 2), ("probe_tokens", 1)):
            check_number(name, getattr(self, name), low)
        check_device(self.device)
        from saelab.evals.probes.run import check_label_source  # here: saelab.evals imports both

        check_label_source(self.probe_labels)
        if self.task is not None:
            generate(self.task, 1)  # an unknown task fails here, before any work

    def settings(self) -> dict:
        """`evaluate`'s keywords (all but where the report goes)."""
        return {"tokens": self.tokens, "model": self.model, "data": self.data,
                "context_length": self.context_length, "batch_rows": self.batch_rows,
                "device": self.device}


def _splice(keep: torch.Tensor, values: torch.Tensor | float):
    """A `HookedModel.logits` replacement: `values` at the kept positions, the rest untouched."""

    def fn(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[keep] = values.to(act) if isinstance(values, torch.Tensor) else values
        return out

    return fn


@torch.no_grad()
def evaluate(
    sae_or_path,
    tokens: int | None = None,
    model: HookedModel | str | None = None,
    data: TokenData | str | None = None,
    context_length: int | None = None,
    batch_rows: int = EvalConfig.batch_rows,
    device: str = EvalConfig.device,
) -> dict:
    """Score an SAE on held-out tokens; returns the report `write_report` writes.

    Args:
        sae_or_path: a dictionary directory, or an object with `cfg` (an `SAEConfig`),
            `encode(x) -> (idx, vals)` and `decode(idx, vals, x) -> x_hat`, such as an `SAE`.
        tokens: eval window: whole rows are taken until at least this many non-BOS/pad
            positions are in; the report's `tokens` is the exact count (and the dead-latent
            window). Default: the window of the SAE's end-of-run eval (cfg `eval_tokens`),
            else 32768.
        model: a loaded `HookedModel` or a model spec; default: the one cfg.json names. A spec
            loads with the weight processing the dictionary was trained on (cfg `processing`);
            a loaded model of another processing is a one-line error naming the fix.
        data: a data spec (its "heldout" split, rows of min(model context, 128) tokens) or a
            `TokenData` used as given; default: the held-out split of the data the SAE was
            trained on, at its context length (cfg `data`, `context_length`), else builtin:stdlib.
        context_length: tokens per row when `data` is a spec; default: the SAE's training
            context for its own data, else min(model context, 128).
        batch_rows: rows per forward pass.
        device: where the model and a dictionary loaded from a path live.

    Reconstruction and latent statistics cover every non-BOS/pad position. Losses: logits at
    position t predicting token t+1 count when neither token t nor t+1 is BOS/pad; CE is the
    mean over those predictions, KL(clean || spliced) too (`saelab.evals.spliced`). Spliced
    runs replace the hook's activation at non-BOS/pad positions only, with the reconstruction
    (ce_sae), zeros (ce_zero) or the eval set's mean activation (ce_mean).

    A transcoder (cfg `target_hook`) is scored on its target: FVU of the target hook's
    activation, and spliced runs that replace the target (with the transcoder's output
    computed from the input hook in the clean pass, with zeros, or with the target's mean).
    """
    start = time.perf_counter()
    sae, path, model, data = resolve_dictionary(sae_or_path, model, data, context_length, device)
    if tokens is None:
        tokens = getattr(sae.cfg, "eval_tokens", None) or DEFAULT_TOKENS
    if tokens < 1 or batch_rows < 1:
        raise SaelabError(f"tokens and batch_rows must be positive, got {tokens} and {batch_rows}")
    was_training = getattr(sae, "training", False)
    if was_training:
        sae.eval()  # inference selection (thresholds for batch-level allocators)
    try:
        return _evaluate(sae, path, model, data, tokens, batch_rows, start)
    finally:
        if was_training:
            sae.train()


def _evaluate(sae, path, model: HookedModel, data: TokenData, tokens: int, batch_rows: int,
              start: float) -> dict:
    hook, cfg, tok = sae.cfg.hook, sae.cfg, model.tokenizer
    target = getattr(cfg, "target_hook", None) or hook  # what is reconstructed and replaced
    skip = getattr(cfg, "skip", False)
    batches = heldout_rows(tok, data, tokens).split(batch_rows)
    recon, latents, loss = ReconstructionStats(), LatentStats(cfg.n_latents), SplicedLoss()

    seen: dict[str, torch.Tensor] = {}

    def probe(name: str):
        def fn(act: torch.Tensor) -> torch.Tensor:
            seen[name] = act
            return act
        return fn

    total = sum(b.numel() for b in batches)
    bar = tqdm(total=2 * total, unit="tok", unit_scale=True, desc=f"eval {hook}")
    for batch in batches:
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, tok)
        mask = prediction_mask(keep)
        clean = model.logits(batch, {h: probe(h) for h in (hook, target)})
        x, y = seen[hook][keep], seen[target][keep]
        idx, vals = sae.encode(x)
        y_hat = sae.decode(idx, vals, x)  # x: a skip transcoder's W_skip x
        recon.update(y, y_hat)
        latents.update(idx, vals)
        ref = loss.add("clean", clean, batch, mask)
        loss.add("sae", model.logits(batch, {target: _splice(keep, y_hat)}), batch, mask, ref)
        loss.add("zero", model.logits(batch, {target: _splice(keep, 0.0)}), batch, mask, ref)
        bar.update(batch.numel())
    mean = recon.mean
    for batch in batches:  # mean ablation needs the whole set's mean first
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, tok)
        loss.add("mean", model.logits(batch, {target: _splice(keep, mean)}), batch, prediction_mask(keep))
        bar.update(batch.numel())
    bar.close()

    lat = latents.result()
    histograms = {k: lat.pop(k) for k in ("l0_histogram", "latent_density")}
    return {
        "dictionary": path,
        "model": model.spec,
        "processing": model.processing,
        "hook": hook,
        "target_hook": getattr(cfg, "target_hook", None),
        "skip": skip,
        "d_in": cfg.d_in,
        "n_latents": cfg.n_latents,
        "k": cfg.k,
        "allocator": cfg.allocator,
        "data": data.spec,
        "split": data.split,
        "context_length": data.context_length,
        "rows": sum(b.shape[0] for b in batches),
        "tokens": latents.tokens,
        **recon.result(),
        **lat,
        **loss.result(),
        "seconds": round(time.perf_counter() - start, 2),
        "saelab_version": __version__,
        **histograms,
    }
