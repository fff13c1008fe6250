"""Train the four allocators on one zoo activation cache at equal average L0 and compare them.

    python benchmarks/allocators.py [--train-tokens 1000000] [--k 16] [--n-latents 2048]

One cache (with loss gradients, which gradient_topk needs) of the shipped zoo model feeds every
SAE; all get the same k (so the same average L0 in training: k per token for topk/gradient_topk,
a budget of k*B per batch for feature/mutual choice), tokens, seed and learning rate. Each is
then scored by `saelab.evals.evaluate` on the same held-out tokens, the batch-level allocators
in their threshold (inference) mode. Prints one table and writes it as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.cache import MANIFEST, build_cache
from saelab.data import TokenData
from saelab.evals import evaluate
from saelab.io import write_json
from saelab.models import load_model
from saelab.training import TrainConfig, train
from saelab.zoo import DEFAULT_MODEL

RUNS = [
    ("topk", {}),
    ("gradient_topk", {}),
    ("feature_choice", {"capacity": "uniform"}),
    ("feature_choice", {"capacity": "zipf"}),
    ("mutual_choice", {}),
]
COLUMNS = [("fvu", "held-out FVU"), ("dead_frac", "dead %"), ("l0", "L0"),
           ("delta_loss", "delta CE (nats)"), ("kl_sae", "KL"), ("ce_loss_recovered", "CE recovered")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/allocators"))
    p.add_argument("--hook", default="blocks.2.hook_resid_post")
    p.add_argument("--cache-tokens", type=int, default=500_000)
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--dead-tokens", type=int, default=200_000,
                   help="AuxK's dead window, shortened to fit the run (the 10M default never triggers)")
    p.add_argument("--eval-tokens", type=int, default=32_768)
    args = p.parse_args()

    cache = args.out / "cache"
    if not (cache / MANIFEST).exists():
        build_cache(load_model(DEFAULT_MODEL), TokenData(), [args.hook], cache, args.cache_tokens,
                    with_grads=True, overwrite=True)
    rows = []
    for allocator, extra in RUNS:
        name = allocator + "".join(f"-{v}" for v in extra.values())
        out = args.out / name
        train(TrainConfig.of(cache=str(cache), hook=args.hook, out=str(out), allocator=allocator,
                          n_latents=args.n_latents, k=args.k, tokens=args.train_tokens,
                          dead_tokens=args.dead_tokens, overwrite=True, **extra))
        report = evaluate(str(out), tokens=args.eval_tokens)
        rows.append({"run": name, **{key: report[key] for key, _ in COLUMNS}})

    header = f"{'allocator':<24}" + "".join(f"{label:>17}" for _, label in COLUMNS)
    print(f"\n{DEFAULT_MODEL} {args.hook}: n={args.n_latents}, k={args.k}, "
          f"{args.train_tokens:,} training tokens, {args.eval_tokens:,} held-out tokens\n")
    print(header)
    for r in rows:
        cells = "".join(
            f"{100 * r[key]:>16.2f}%" if key == "dead_frac" else f"{r[key]:>17.4f}" for key, _ in COLUMNS
        )
        print(f"{r['run']:<24}{cells}")
    write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                           "rows": rows})
    print(f"\nwritten: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
