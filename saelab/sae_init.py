"""SAE initialisation (Gao et al. 2024): unit-norm decoder rows, W_enc = W_dec, b_dec = geometric median."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of x (Weiszfeld)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-12):
            m = new
            break
        m = new
    return m


def _spread(x: torch.Tensor) -> torch.Tensor:
    """RMS distance of the rows of x to their mean."""
    return (x - x.mean(0)).pow(2).sum(1).mean().sqrt()


@torch.no_grad()
def init_sae(sae, sample: torch.Tensor, seed: int, l0: int | None = None,
             target: torch.Tensor | None = None) -> None:
    """Gao et al.'s init from a data sample. A relu SAE has no budget, and tied weights make
    about half its latents fire on every token (L0 ~ n/2: a huge reconstruction and a slow
    sparse kernel); with `l0`, each latent's b_enc is set so it fires on a share l0/n of the
    sample, so training starts near that L0 and the L1 penalty takes it from there.

    A transcoder's b_dec lives in its target's space: `target` (the target hook's rows of the
    same tokens) gives its geometric median; the encoder reads `sample` with no b_dec to centre
    it, so b_enc = -W_enc mean(sample) centres its pre-activations instead (sparsify's init).
    Its encoder rows are scaled by the target's spread over the input's (RMS distance to the
    mean), so that, as in a tied SAE, a latent's value starts in the units of what it writes:
    unscaled, an MLP-in -> MLP-out transcoder on zoo:pystdlib-4l-v2 starts at FVU ~10."""
    sae.reset_parameters(torch.Generator(device="cpu").manual_seed(seed))
    sae.b_dec.copy_(geometric_median(sample if target is None else target).to(sae.b_dec.dtype))
    if target is not None:
        x, y = sample.to(sae.dtype), target.to(sae.dtype)
        sae.W_enc.mul_(_spread(y) / _spread(x).clamp_min(1e-12))
        sae.b_enc.copy_(-sae.W_enc @ x.mean(0))
    if l0 is not None:
        pre = sae.pre_acts(sample.to(sae.dtype))
        # sub_, not copy_: a transcoder's pre already holds its centring b_enc
        sae.b_enc.sub_(pre.float().quantile(1 - l0 / sae.cfg.n_latents, dim=0).to(sae.dtype))
