"""Cross-check saelab's evals against SAELens's own evaluation on the same tokens.

SAELens needs transformer-lens 3.x, so this runs in a side venv where saelab also runs on 3.x:

    python3 -m venv /tmp/venv-saelens && . /tmp/venv-saelens/bin/activate
    pip install torch==2.13.0 && pip install sae-lens "transformer-lens>=3,<4"
    pip install -e . --no-deps && pip install matplotlib
    python benchmarks/saelens_crosscheck.py [DICT] [--tokens N] [--batch-rows B]

Without DICT a small TopK SAE is trained first on zoo:pystdlib-4l. The dictionary is exported
to SAELens's on-disk format by `saelab.formats.saelens.export_saelens` (cfg.json + sae_weights.safetensors;
SAELens keeps W_enc as (d_in, d_sae), saelab as (n, d)), loaded back with
`sae_lens.SAE.load_from_disk`, checked to encode and decode like saelab's, and then scored by
`saelab.evals.evaluate` and by `sae_lens.evals.run_evals` on identical token rows and the same
HookedTransformer.

The two disagree on CE loss recovered by design, for two rules saelab chose:
- SAELens zero-ablates the hook at every position, BOS included; saelab (and its SAE and mean
  splices, and SAELens's SAE splice) only at non-BOS/pad positions, so that the ablation
  changes exactly what the SAE replaces.
- SAELens drops a prediction only when its input token is special; saelab also drops it when
  its target is (here BOS = EOS = pad, so SAELens scores predicting the end of each document).
The script recomputes saelab's numbers under SAELens's rules with saelab's own splicing to show
that these rules account for the whole difference.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import saelab
from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.evals import evaluate
from saelab.formats.saelens import export_saelens
from saelab.models import load_model


class RowStore:
    """The part of SAELens's ActivationsStore its evals touch: fixed token rows, in order."""

    def __init__(self, rows: torch.Tensor, batch_rows: int):
        self.rows, self.context_size, self.store_batch_size_prompts = rows, rows.shape[1], batch_rows
        self.i = 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        self.i += n
        return self.rows[self.i - n : self.i]

    def reset_input_dataset(self) -> None:
        self.i = 0


@torch.no_grad()
def saelens_rules(model, sae, rows: torch.Tensor, batch_rows: int) -> dict:
    """saelab's splice scored with SAELens's rules: zero ablation at every position; CE over
    predictions whose input is not special, KL over every position whose token is not special."""
    hook = sae.cfg.hook
    ce, kl, n_ce, n_kl = {"clean": 0.0, "sae": 0.0, "zero": 0.0}, {"sae": 0.0, "zero": 0.0}, 0, 0

    def splice(keep):
        def fn(a):
            out = a.clone()
            out[keep] = sae.decode(*sae.encode(a[keep])).to(a.dtype)
            return out
        return fn

    for batch in rows.split(batch_rows):
        keep = positions_to_keep(batch, model.tokenizer)
        pred, targets = keep[:, :-1], batch[:, 1:][keep[:, :-1]]
        runs = {"clean": model.logits(batch), "sae": model.logits(batch, {hook: splice(keep)}),
                "zero": model.logits(batch, {hook: torch.zeros_like})}
        ref = runs["clean"][keep].double().log_softmax(-1)
        for name, logits in runs.items():
            logp = logits[:, :-1][pred].double().log_softmax(-1)
            ce[name] -= logp.gather(1, targets[:, None]).sum().item()
            if name != "clean":
                kl[name] += (ref.exp() * (ref - logits[keep].double().log_softmax(-1))).sum().item()
        n_ce, n_kl = n_ce + targets.numel(), n_kl + int(keep.sum())
    ce = {k: v / n_ce for k, v in ce.items()}
    kl = {k: v / n_kl for k, v in kl.items()}
    return {**{f"ce_{k}": v for k, v in ce.items()}, "kl_sae": kl["sae"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"]}


def train_small(out: Path) -> Path:
    from saelab.training import TrainConfig, train

    train(TrainConfig.of(out=str(out), hook="blocks.2.hook_resid_post", n_latents=1024, k=16,
                      tokens=400_000, batch_size=2048, eval_tokens=4096, warmup_steps=10))
    return out


def main() -> None:
    from sae_lens import SAE as LensSAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dictionary", nargs="?", help="saelab dictionary directory (default: train one)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=128)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="saelens-crosscheck-"))
    path = Path(args.dictionary) if args.dictionary else train_small(work / "sae")
    sae = saelab.load(str(path))
    model = load_model(sae.cfg.model)
    print(f"dictionary {path}: {sae.cfg.n_latents} latents, k={sae.cfg.k}, {sae.cfg.hook}; {model.backend}")

    lens = LensSAE.load_from_disk(export_saelens(sae, work / "saelens", context_size=args.context_length))
    x = model.activations(torch.tensor([[256] + list(b"def f(x):\n    return x\n")]), [sae.cfg.hook])
    x = x[sae.cfg.hook][0]
    with torch.no_grad():
        mine, theirs = sae(x), lens.decode(lens.encode(x))
    print(f"SAELens reload: max |x_hat difference| = {(mine - theirs).abs().max().item():.2e}")

    data = TokenData(split="heldout", context_length=args.context_length)
    rows = heldout_rows(model.tokenizer, data, args.tokens)
    n_batches = rows.shape[0] // args.batch_rows
    rows = rows[: n_batches * args.batch_rows]  # SAELens evaluates whole batches only
    kept = int(positions_to_keep(rows, model.tokenizer).sum())
    report = evaluate(sae, tokens=kept, model=model, data=data, batch_rows=args.batch_rows)
    assert report["rows"] == rows.shape[0], "saelab and SAELens must see the same rows"

    cfg = EvalConfig(batch_size_prompts=args.batch_rows, n_eval_reconstruction_batches=n_batches,
                     n_eval_sparsity_variance_batches=n_batches, compute_kl=True, compute_ce_loss=True,
                     compute_sparsity_metrics=True, compute_variance_metrics=True)
    lens_metrics, _ = run_evals(lens, RowStore(rows, args.batch_rows), model.model, ActivationScaler(), cfg)
    flat = {k: v for group in lens_metrics.values() for k, v in group.items()}
    rules = saelens_rules(model, sae, rows, args.batch_rows)

    print(f"\n{rows.shape[0]} rows x {rows.shape[1]} tokens, {kept:,} non-BOS/pad positions\n")
    pairs = [
        ("explained variance", report["explained_variance"], flat["explained_variance"], None),
        ("  (per-token legacy)", None, flat["explained_variance_legacy"], None),
        ("L0", report["l0"], flat["l0"], None),
        ("CE clean", report["ce_clean"], flat["ce_loss_without_sae"], rules["ce_clean"]),
        ("CE SAE", report["ce_sae"], flat["ce_loss_with_sae"], rules["ce_sae"]),
        ("CE zero ablation", report["ce_zero"], flat["ce_loss_with_ablation"], rules["ce_zero"]),
        ("CE loss recovered", report["ce_loss_recovered"], flat["ce_loss_score"], rules["ce_loss_recovered"]),
        ("KL(clean || SAE)", report["kl_sae"], flat["kl_div_with_sae"], rules["kl_sae"]),
        ("KL div score", report["kl_div_score"], flat["kl_div_score"], rules["kl_div_score"]),
    ]
    cell = lambda v: "" if v is None else f"{v:.7f}"  # noqa: E731
    print(f"{'metric':<22}{'saelab':>12}{'SAELens':>12}{'saelab, SAELens rules':>24}{'|rules-SAELens|':>18}")
    for name, a, b, c in pairs:
        diff = "" if c is None else f"{abs(c - b):.1e}"
        print(f"{name:<22}{cell(a):>12}{cell(b):>12}{cell(c):>24}{diff:>18}")
    print(f"|saelab - SAELens| explained variance: "
          f"{abs(report['explained_variance'] - flat['explained_variance']):.1e}")


if __name__ == "__main__":
    main()
