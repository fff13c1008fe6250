"""Batch-1 greedy decode with sparse MLPs against dense: tokens/s and generated-token agreement.

Two models, each run by `saelab.evals.sparsity.decode.Decoder` (one loop, one token at a time,
key/value cache; only the MLPs differ between contenders, which take interleaved turns per
prompt):

- the zoo model (default zoo:pystdlib-4l-v2, d = 128, d_ff = 512): prompts are the first
  `--prompt` tokens of held-out rows of builtin:stdlib; the active-set predictor is trained as
  `saelab sparsity` trains it (train split, target recall 0.95) on `--predictor-tokens` (65,536:
  the cut at recall 0.999 sits in the tail of the active scores, which 16,384 tokens left to noise);
- `--synthetic`: MLP-only layers (no attention) at the 7B MLP shape (d = 4096, d_ff = 16384),
  one per density in `--densities` (default: the zoo's measured per-layer densities), random
  weights; prompts are random tokens. Its predictors are fit the same way on `--synthetic-tokens`
  tokens of the synthetic model's own activations.

Contenders: dense; auto (`SparseMLP.__call__`: dense or sparse down-projection by the measured
cost model, exact); predicted (`PredictedMLP`: the predictor's units only, where the cost model
says it pays); and, to show what the cost model avoids and what the predictor alone changes,
"sparse down (forced)" and "predicted (forced) r=R", which always take the sparse path, the
latter once per target recall in `--recalls` (the predictors are trained at 0.95; each R moves
the cut, `LayerPredictor.at_recall`), with the share of units it computed per call.

    python benchmarks/sparse_decode.py [--prompts 48] [--steps 32] [--synthetic]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from saelab.data.heldout import heldout_rows
from saelab.data.tokens import TokenData
from saelab.evals.sparsity.decode import Decoder, PredictedMLP, compare, synthetic
from saelab.evals.sparsity.predictor import _fit, mlp_weights, train_predictors
from saelab.kernels import mask_code
from saelab.models import load_model
from saelab.storage.files import write_json
from saelab.zoo import DEFAULT_MODEL

ZOO_DENSITIES = (0.2156, 0.0406, 0.0461, 0.0514)
"""zoo:pystdlib-4l-v2's per-layer densities (`saelab sparsity`, 65,656 held-out tokens)."""


def _forced(mlp, predictor, computed: list[float]):
    """The predictor's units only, every call; appends the share of units computed per call."""
    def forward(x):
        mask = predictor.predict(x)
        computed.append(float(mask.float().mean()))
        return mlp.active(x, *mask_code(mask))
    return forward


def _contenders(mlps, preds, recalls) -> tuple[dict, dict[str, list[float]]]:
    """The contenders' MLPs, and the units each forced-predictor contender computed per call."""
    contenders = {
        "dense": [m.dense for m in mlps],
        "auto": list(mlps),
        "predicted": [PredictedMLP(m, p) for m, p in zip(mlps, preds, strict=True)],
        "sparse down (forced)": [m.sparse_down for m in mlps],
    }
    computed: dict[str, list[float]] = {}
    for recall in recalls:  # the same predictors, their cut moved (LayerPredictor.at_recall)
        name = f"predicted (forced) r={recall:g}"
        computed[name] = []
        contenders[name] = [_forced(m, p.at_recall(recall), computed[name])
                            for m, p in zip(mlps, preds, strict=True)]
    return contenders, computed


def _run(decoder, mlps, preds, prompts, steps, recalls) -> dict:
    contenders, computed = _contenders(mlps, preds, recalls)
    result = compare(decoder, contenders, prompts, steps)
    for name, shares in computed.items():
        result["contenders"][name]["units_computed"] = sum(shares) / len(shares)
    return result


def _print(title: str, result: dict) -> None:
    print(f"\n{title}: {result['prompts']} prompts x {result['steps']} generated tokens, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'contender':>30} {'tokens/s':>9} {'speedup':>8} {'tokens differ':>13} {'identical':>9} "
          f"{'units computed':>14}")
    for name, r in result["contenders"].items():
        units = f"{100 * r['units_computed']:.1f}%" if "units_computed" in r else "all"
        print(f"{name:>30} {r['tokens_per_second']:>9.2f} {r['speedup_median']:>7.2f}x "
              f"{100 * r['token_differ_rate']:>12.1f}% {100 * r['identical_prompts']:>8.0f}% {units:>14}",
              flush=True)


def zoo(args) -> dict:
    model = load_model(args.model)
    data = TokenData(split="heldout", context_length=args.prompt)
    rows = heldout_rows(model.tokenizer, data, args.prompts * args.prompt)[: args.prompts]
    preds, seen = train_predictors(model, TokenData(split="train"), args.predictor_tokens)
    decoder = Decoder.of(model)
    mlps = [mlp_weights(model, i) for i in range(model.n_layers)]
    result = _run(decoder, mlps, preds, [r.tolist() for r in rows], args.steps, args.recalls)
    result.update(model=model.spec, predictor_train_tokens=seen)
    return result


def synthetic_7b(args) -> dict:
    torch.manual_seed(0)
    decoder, mlps = synthetic(4096, 16384, args.densities)
    gen = torch.Generator().manual_seed(1)
    preds = []
    with torch.no_grad():
        x = decoder._norm(torch.randn(args.synthetic_tokens, 4096, generator=gen))
    for mlp in mlps:  # each layer's predictor on its own inputs, as train_predictors does
        with torch.no_grad():
            h = mlp.hidden(x)
        with torch.enable_grad():
            preds.append(_fit(x, h > 0, 256, 0.95, 4, 256, 1e-2, gen))
        with torch.no_grad():
            x = decoder._norm(x + mlp.down(h))
    prompts = [torch.randint(0, 257, (args.synthetic_prompt,), generator=gen).tolist()
               for _ in range(args.synthetic_prompts)]
    result = _run(decoder, mlps, preds, prompts, args.synthetic_steps, args.recalls)
    result.update(model="synthetic MLP-only layers, d 4096, d_ff 16384", densities=list(args.densities),
                  predictor_train_tokens=args.synthetic_tokens)
    return result


def _loaded(run, args) -> dict:
    """`run(args)`'s result with the load averages (1, 5, 15 min) before and after it."""
    before = os.getloadavg()
    result = run(args)
    return {**result, "load_before": before, "load_after": os.getloadavg(), "threads": args.threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--steps", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--predictor-tokens", type=int, default=65536,
                   help="train tokens of the zoo predictors (16,384 left the cut at recall 0.999 "
                        "on noise: 8.3%% of tokens differed at 30%% of units, against 1.8%% at 26%%)")
    p.add_argument("--recalls", nargs="+", type=float, default=[0.95, 0.99, 0.999, 1.0],
                   help="target recalls of the forced-predictor contenders (trained at 0.95, cut moved)")
    p.add_argument("--synthetic", action="store_true", help="also run the 7B-shape MLP-only layers")
    p.add_argument("--densities", nargs="+", type=float, default=list(ZOO_DENSITIES))
    p.add_argument("--synthetic-tokens", type=int, default=2048)
    p.add_argument("--synthetic-prompts", type=int, default=4)
    p.add_argument("--synthetic-prompt", type=int, default=4)
    p.add_argument("--synthetic-steps", type=int, default=8)
    p.add_argument("--skip-zoo", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    if not args.skip_zoo:
        results.append(_loaded(zoo, args))
        _print(results[-1]["model"], results[-1])
    if args.synthetic:
        results.append(_loaded(synthetic_7b, args))
        _print(results[-1]["model"] + f", densities {args.densities}", results[-1])
    if args.json:
        write_json(Path(args.json), results)


if __name__ == "__main__":
    main()
