"""Time one full TopK SAE training step against its floor, the encoder matmul, and against peers.

A TopK step needs one dense product, the (B, n) pre-activations ``x @ W_enc.T``; everything else
is sparse. This script times, on the same data and in interleaved rounds (so background load hits
every contender alike), the median of:

- floor: ``x @ W_enc.T`` alone (every ratio is to this);
- floor-out: the same product into a preallocated output. Shown because saelab's trainer reuses
  its pre-activation buffer, while ``x @ W_enc.T`` page-faults a fresh (B, n) tensor in on every
  call, which on CPU costs ~10% of the product;
- saelab: ``Trainer.step`` (forward, backward, Adam, decoder renormalisation, dead-latent counts);
- sparsify (``eai-sparsify``, eager path, i.e. ``SPARSIFY_DISABLE_TRITON=1``): its trainer's step
  with ``optimizer="adam"`` (torch Adam, like saelab; its default is signum) and AuxK on;
- SAELens ``TopKTrainingSAE``: its trainer's ``_train_step`` body (forward, dead-neuron counts,
  backward, grad clipping, Adam).

Peers are optional: one that does not import is reported as "not installed" (SAELens needs
transformer-lens 3.x, so run this from a venv that has both, with saelab installed too).

    python benchmarks/step_time.py [--threads 2] [--latents 8192 32768] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's eager path, even where triton imports

import torch  # noqa: E402

Step = Callable[[], object]


def floor_step(x: torch.Tensor, n: int, reuse_output: bool = False) -> Step:
    W_enc = torch.randn(n, x.shape[1]) / x.shape[1] ** 0.5
    if not reuse_output:
        return lambda: x @ W_enc.T
    out = x.new_empty(x.shape[0], n)
    return lambda: torch.mm(x, W_enc.T, out=out)


def saelab_step(x: torch.Tensor, n: int, k: int) -> Step:
    from saelab.sae import SAE, SAEConfig
    from saelab.sae_init import init_sae
    from saelab.training.config import OptimConfig
    from saelab.training.trainer import Trainer

    sae = SAE(SAEConfig(d_in=x.shape[1], n_latents=n, k=k))
    init_sae(sae, x, seed=0)
    trainer = Trainer(sae, OptimConfig(batch_size=x.shape[0]), steps=10_000)
    return lambda: trainer.step(x)


def sparsify_step(x: torch.Tensor, n: int, k: int) -> Step:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k))
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    since_fired = torch.zeros(n, dtype=torch.long)
    dead_after, auxk_alpha = 10_000_000, 1 / 32

    def step() -> None:  # sparsify.Trainer.fit's per-batch body, fvu loss, one SAE
        total_variance = (x - x.mean(0)).pow(2).sum()
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=since_fired > dead_after, total_variance=total_variance)
        did_fire = torch.zeros(n, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0

    return step


def saelens_step(x: torch.Tensor, n: int, k: int) -> Step:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    since_fired = torch.zeros(n)
    counter = iter(range(10**9))

    def step() -> None:  # sae_lens SAETrainer._train_step, without the lr scheduler
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients=sae.get_coefficients(), dead_neuron_mask=since_fired > 1000,
            n_training_steps=next(counter), is_logging_step=False,
        ))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def build(x: torch.Tensor, n: int, k: int) -> dict[str, Step | str]:
    """Every contender's step, or why it is missing."""
    makers = {"floor": lambda: floor_step(x, n), "floor-out": lambda: floor_step(x, n, reuse_output=True),
              "saelab": lambda: saelab_step(x, n, k),
              "sparsify": lambda: sparsify_step(x, n, k), "saelens": lambda: saelens_step(x, n, k)}
    steps: dict[str, Step | str] = {}
    for name, make in makers.items():
        try:
            steps[name] = make()
        except ImportError as e:
            steps[name] = f"not installed ({e.name or e})"
    return steps


def median_times(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step; contenders alternate within each round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--latents", type=int, nargs="+", default=[8192, 32768], help="n values")
    parser.add_argument("--d", type=int, default=512, help="input width d")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step B")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--only", nargs="+", help="contenders to run (default: all)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average before: {os.getloadavg()[0]:.1f}")
    from saelab.kernels.backend import name_for

    print(f"saelab kernel backend on cpu: {name_for(torch.device('cpu'))}")
    for n in args.latents:
        torch.manual_seed(0)
        x = torch.randn(args.batch, args.d)
        steps = build(x, n, args.k)
        if args.only:
            steps = {name: s for name, s in steps.items() if name in args.only or name == "floor"}
        runnable = {name: s for name, s in steps.items() if not isinstance(s, str)}
        med = median_times(runnable, args.rounds, args.warmup)
        print(f"\nd={args.d} n={n} k={args.k} B={args.batch}: median of {args.rounds} steps "
              f"(load average now {os.getloadavg()[0]:.1f})")
        print(f"{'':10} {'ms':>9} {'x floor':>8} {'saelab / it':>12}")
        for name, step in steps.items():
            if isinstance(step, str):
                print(f"{name:10} {step}")
                continue
            versus = med["saelab"] / med[name] if "saelab" in med else float("nan")
            print(f"{name:10} {1e3 * med[name]:9.1f} {med[name] / med['floor']:8.2f} {versus:12.2f}")


if __name__ == "__main__":
    main()
