"""Feature-browser pass: tokens/s and peak memory for 2k- and 16k-latent dictionaries.

    python benchmarks/browse.py [--tokens 1000000] [--latents 2048 16384]

Each size runs in its own subprocess (so peak RSS is its own) with one browser pass over the
held-out rows, timing per batch, side by side under the same machine load, the bare part (model
forward + `sae.encode`, which any browser must do) and the streaming statistics
(`FeatureStats.update`). Printed: tokens/s of the bare part, of the whole browser pass (bare +
statistics), their ratio, the statistics alone, peak RSS of the process, and the bounded state
of the statistics. On a machine shared with other jobs absolute rates move with the load; the
ratio, measured batch by batch, moves less.

The dictionaries are constructed, not trained: TopK SAEs (k=32) on zoo:pystdlib-4l's
blocks.2.hook_resid_post with the training initialisation (unit decoder rows, W_enc = W_dec).
Every token still has exactly k active latents, so the work per token is what a trained
dictionary costs; how often the top-k heaps change hands depends on the activation
distribution, which this does not reproduce. Site writing (HTML) is not timed here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

HOOK = "blocks.2.hook_resid_post"


def run_one(n_latents: int, tokens: int, batch_rows: int) -> dict:
    import torch
    from tqdm import tqdm

    from saelab.browse.collect import load_dictionaries
    from saelab.browse.stats import StatsConfig
    from saelab.data.activations import positions_to_keep
    from saelab.data.heldout import heldout_rows
    from saelab.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, n_latents=n_latents, k=32, hook=HOOK, model="zoo:pystdlib-4l"))
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec)
    dicts, model, data = load_dictionaries([sae], None, StatsConfig())
    stats = dicts[0].stats
    tok = model.tokenizer
    rows = heldout_rows(tok, data, tokens)
    total = int(positions_to_keep(rows, tok).sum())
    out = {"n_latents": n_latents, "tokens": total}
    bare = update = 0.0
    with torch.no_grad():
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"browse n={n_latents}")
        for batch in rows.split(batch_rows):
            t0 = time.perf_counter()
            keep = positions_to_keep(batch, tok)
            idx, vals = sae.encode(model.activations(batch, [HOOK])[HOOK][keep])
            t1 = time.perf_counter()
            stats.update(batch, keep, idx, vals)
            bare, update = bare + t1 - t0, update + time.perf_counter() - t1
            bar.update(int(keep.sum()))
        bar.close()
    out.update(bare_tok_s=total / bare, browse_tok_s=total / (bare + update), stats_tok_s=total / update)
    state = sum(t.numel() * t.element_size() for c in (stats.top, stats.sample)
                for t in (c.score, c.pos, c.act, c.tokens, c.acts))
    state += stats.hist.numel() * stats.hist.element_size()
    out["stats_state_mb"] = state / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--latents", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--batch-rows", type=int, default=32)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.tokens, a.batch_rows)))
        return
    import torch

    print(f"held-out tokens: {a.tokens:,}; torch threads: {torch.get_num_threads()}; "
          f"batch: {a.batch_rows} rows of 128")
    print(f"{'latents':>8} {'tokens':>10} {'bare tok/s':>11} {'browse tok/s':>13} {'ratio':>6} "
          f"{'stats alone tok/s':>18} {'peak RSS MB':>12} {'stats state MB':>15}")
    for n in a.latents:
        cmd = [sys.executable, __file__, "--one", str(n), "--tokens", str(a.tokens),
               "--batch-rows", str(a.batch_rows)]
        r = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        print(f"{n:>8} {r['tokens']:>10,} {r['bare_tok_s']:>11,.0f} {r['browse_tok_s']:>13,.0f} "
              f"{r['browse_tok_s'] / r['bare_tok_s']:>6.2f} {r['stats_tok_s']:>18,.0f} "
              f"{r['peak_rss_mb']:>12,.0f} {r['stats_state_mb']:>15,.0f}")


if __name__ == "__main__":
    main()
