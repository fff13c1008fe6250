"""gradient_topk (g-SAE): top-k of the score s = pre + beta * pre * e, where e_j = |W_dec[j] . g|
is latent j's first-order effect on the LM loss (g: the loss gradient w.r.t. the SAE input).
Two scores (`grad_score`): "raw", the published one, e as is with a fixed beta; and
"normalised" (saelab's, the default), e divided by its mean over the token's latents. Raw
|W_dec g| is tiny and its scale varies by orders of magnitude across models, layers and
tokens (median 0.006 at zoo:pystdlib-4l's layer 2), so a raw beta must be tuned per model;
normalised, beta = 1 weighs the gradient like the activation itself, but every token gets the
same steering however little its loss depends on the activation. beta = 0 is topk either way.
Values are still relu(pre). Without a gradient (inference) it is plain topk."""

from __future__ import annotations

import torch

from saelab.allocators.base import Allocator, Selection, topk

GRAD_SCORES = ("normalised", "raw")


def gradient_score(pre: torch.Tensor, grad: torch.Tensor, W_dec: torch.Tensor, beta: float,
                   kind: str = "normalised") -> torch.Tensor:
    """gradient_topk's selection score (module docstring): pre * (1 + beta * e), e = |W_dec g|,
    divided by its per-token mean when `kind` is "normalised"."""
    effect = (grad.to(pre.dtype) @ W_dec.T).abs()
    if kind == "normalised":
        effect = effect / effect.mean(1, keepdim=True).clamp_min(1e-30)
    return pre + beta * pre * effect


class GradientTopK(Allocator):
    name = "gradient_topk"
    needs_grad = True
    inference_topk = True
    saelens_architecture = "topk"
    step_matrices = 4.5  # measured: the score beside the pre-activations

    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, batch: bool) -> Selection:
        if grad is None:
            return topk(pre, sae.cfg.k)
        with torch.no_grad():
            return topk(gradient_score(pre, grad, sae.W_dec, sae.cfg.beta, sae.cfg.grad_score), sae.cfg.k)
