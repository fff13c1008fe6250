"""Batch-1 greedy decoding with sparse MLPs: what activation sparsity buys in tokens per second.

`Decoder` runs a pre-LN transformer one token at a time with a key/value cache, from weights as
the hooked model runs them (LayerNorms folded: each is a plain normalisation), with every MLP a
swappable callable (B, d) -> (B, d). The same loop runs every contender, so the only difference
between them is the MLP:

- `dense`: `SparseMLP.dense`;
- `auto`: `SparseMLP.__call__`, dense or a sparse down-projection per call from the measured cost
  model (exact for ReLU);
- `predicted`: `PredictedMLP`, the trained low-rank active-set predictor picks the units, both
  projections run over them only (`SparseMLP.active`), again only when the cost model says it
  pays; units the predictor misses are lost, so its tokens may differ from dense.

`compare` generates from held-out prompts with each contender in interleaved turns and reports
tokens/s and how often the generated tokens differ from dense generation. `synthetic` builds
MLP-only layers (no attention) at a given shape with given per-layer densities, for shapes no
model here has.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from saelab.evals.sparsity.predictor import LayerPredictor
from saelab.kernels import SparseMLP, cost, padded_rows

MLP = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Attention:
    """One layer's attention, heads fused: ``qkv`` (3 H dh, d) and ``out`` (d, H dh), F.linear layout."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    n_heads: int


@dataclass
class Decoder:
    """Weights of a pre-LN transformer with folded LayerNorms, run token by token.

    Fields:
        W_E: (vocab, d). W_pos: (n_ctx, d) or None. W_U: (d, vocab). b_U: (vocab,).
        attention: one `Attention` per layer, or None per layer (MLP-only layers).
        mlps: one MLP per layer, (B, d) -> (B, d), applied to the normalised residual.
        eps: the LayerNorms' epsilon.
    """

    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    W_U: torch.Tensor
    b_U: torch.Tensor
    attention: Sequence[Attention | None]
    mlps: Sequence[MLP]
    eps: float = 1e-5
    W_U_rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.W_U_rows = self.W_U.T.contiguous()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def _attend(self, attn: Attention, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = F.linear(x, attn.qkv, attn.qkv_bias).view(3, attn.n_heads, -1)
        cache.append(torch.stack((k, v)))
        kv = torch.stack(cache)  # (T, 2, H, dh)
        scores = torch.einsum("hd,thd->ht", q, kv[:, 0]) / q.shape[-1] ** 0.5
        z = torch.einsum("ht,thd->hd", scores.softmax(-1), kv[:, 1])
        return F.linear(z.reshape(1, -1), attn.out, attn.out_bias)

    def step(self, token: int, pos: int, caches: list[list[torch.Tensor]],
             mlps: Sequence[MLP]) -> torch.Tensor:
        """Logits (vocab,) after feeding `token` at position `pos`; appends to `caches`."""
        x = self.W_E[token].unsqueeze(0)
        if self.W_pos is not None:
            x = x + self.W_pos[pos]
        for attn, cache, mlp in zip(self.attention, caches, mlps, strict=True):
            if attn is not None:
                x = x + self._attend(attn, self._norm(x), cache)
            x = x + mlp(self._norm(x))
        return F.linear(self._norm(x), self.W_U_rows, self.b_U)[0]

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], steps: int, mlps: Sequence[MLP] | None = None
                 ) -> tuple[list[int], float]:
        """Greedy continuation of `prompt` (`steps` tokens) and the seconds the `steps` took
        (the prompt is fed token by token through the same MLPs, untimed)."""
        mlps = self.mlps if mlps is None else mlps
        caches: list[list[torch.Tensor]] = [[] for _ in self.attention]
        for pos, token in enumerate(prompt[:-1]):
            self.step(token, pos, caches, mlps)
        out, token = [], prompt[-1]
        start = time.perf_counter()
        for pos in range(len(prompt) - 1, len(prompt) - 1 + steps):
            token = int(self.step(token, pos, caches, mlps).argmax())
            out.append(token)
        return out, time.perf_counter() - start

    @classmethod
    def of(cls, model) -> Decoder:
        """The decoder of a hooked model (`saelab.models.HookedModel`) with its dense MLPs."""
        from saelab.evals.sparsity.predictor import mlp_weights

        tl = model.model
        attention = []
        for block in tl.blocks:
            a = block.attn
            qkv = torch.cat([w.detach().permute(0, 2, 1).reshape(-1, w.shape[1])
                             for w in (a.W_Q, a.W_K, a.W_V)])
            bias = torch.cat([b.detach().reshape(-1) for b in (a.b_Q, a.b_K, a.b_V)])
            out = a.W_O.detach().reshape(-1, a.W_O.shape[-1]).T.contiguous()
            attention.append(Attention(qkv.contiguous(), bias, out, a.b_O.detach(), a.W_Q.shape[0]))
        mlps = [mlp_weights(model, i).dense for i in range(len(attention))]
        return cls(tl.W_E.detach(), tl.W_pos.detach(), tl.W_U.detach(), tl.b_U.detach(), attention,
                   mlps, float(tl.cfg.eps))


@dataclass(frozen=True)
class PredictedMLP:
    """A SparseMLP whose units come from a low-rank predictor, used only where it pays.

    Per call: if the cost model (measured once per shape, `saelab.kernels.cost`) says even the
    fixed cost of predicting loses, the dense MLP runs; otherwise the predictor picks the units
    and `SparseMLP.active` computes both projections over them, unless the number picked is past
    the break-even, when the dense MLP runs instead.
    """

    mlp: SparseMLP
    predictor: LayerPredictor
    _routes: dict[int, MLP] = field(default_factory=dict, compare=False, repr=False)

    def _predicted(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        route = self._routes.get(x.shape[0])
        if route is None:  # decided once per batch size, as in SparseMLP.__call__
            costs = self.costs(x.shape[0])
            route = self._routes[x.shape[0]] = (self.mlp.dense if costs.never_sparse
                                                else partial(self._sparse_or_dense, costs))
        return route(x)

    def _sparse_or_dense(self, costs: cost.CostModel, x: torch.Tensor) -> torch.Tensor:
        mask = self._predicted(x)
        if not costs.use_sparse(padded_rows(mask)):
            return self.mlp.dense(x)
        return self.mlp.active(x, *_code(mask))

    def costs(self, batch: int) -> cost.CostModel:
        d_ff, d = self.mlp.W_out.shape
        size = cost.bucket(batch)
        key = ("predicted", d, d_ff, self.predictor.rank, self.mlp.W_out.dtype, self.mlp.W_out.device,
               torch.get_num_threads(), size)
        if key in cost.COSTS:
            return cost.COSTS[key]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(size, d, generator=gen).to(self.mlp.W_out.dtype)

        def sparse_at(rows: int) -> Callable[[], object]:
            idx = torch.rand(size, d_ff, generator=gen).topk(max(1, rows // size), dim=1).indices
            return lambda: (self._predicted(x), self.mlp.active(x, idx))

        high = max(1, d_ff // (2 * size))
        return cost.calibrate(key, partial(self.mlp.dense, x), sparse_at, size, high * size)


def _code(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    from saelab.kernels import mask_code

    idx, valid = mask_code(mask)
    return idx, (None if mask.shape[0] == 1 and bool(valid.all()) else valid)


def compare(decoder: Decoder, contenders: dict[str, Sequence[MLP]],
            prompts: Sequence[Sequence[int]], steps: int) -> dict:
    """Greedy generation from every prompt with every contender's MLPs, in interleaved turns
    (the order rotates from prompt to prompt, so none always runs first or after the same one).

    Returns per contender: generated tokens/s (total tokens / total seconds), its median per-prompt
    speedup over the first contender (the reference, dense), the share of generated positions whose
    token differs from the reference's, and the share of prompts generated identically.
    """
    names = list(contenders)
    for mlps in contenders.values():  # warm-up: calibrations and first-call costs, untimed
        decoder.generate(prompts[0][:4], 2, mlps)
    tokens: dict[str, list[list[int]]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:  # each goes first in turn
            out, took = decoder.generate(prompt, steps, contenders[name])
            tokens[name].append(out)
            seconds[name].append(took)
    ref = names[0]
    result = {}
    for name in names:
        pairs = list(zip(tokens[name], tokens[ref], strict=True))
        differ = sum(a != b for x, y in pairs for a, b in zip(x, y, strict=True))
        ratios = [r / s for r, s in zip(seconds[ref], seconds[name], strict=True)]
        result[name] = {
            "tokens_per_second": steps * len(prompts) / sum(seconds[name]),
            "speedup_median": statistics.median(ratios),
            "token_differ_rate": differ / (steps * len(prompts)),
            "identical_prompts": sum(x == y for x, y in pairs) / len(prompts),
        }
    return {"prompts": len(prompts), "steps": steps, "contenders": result}


def synthetic(d: int, d_ff: int, densities: Sequence[float], vocab: int = 257,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Decoder, list[SparseMLP]]:
    """MLP-only layers (no attention) at (d, d_ff), layer i's units firing with probability
    ``densities[i]`` on its normalised input: W_in ~ N(0, 1/d) makes pre-activations ~N(0, 1), and
    b_in = -PhiInv(1 - density) shifts them. Random embedding and unembedding."""
    gen = torch.Generator().manual_seed(seed)
    mlps = []
    for density in densities:
        W_in = (torch.randn(d, d_ff, generator=gen) / d**0.5).to(dtype)
        W_out = (torch.randn(d_ff, d, generator=gen) / d_ff**0.5).to(dtype)
        shift = statistics.NormalDist().inv_cdf(1 - density)
        b_in = torch.full((d_ff,), -shift, dtype=dtype)
        mlps.append(SparseMLP.of(W_in, b_in, W_out, torch.zeros(d, dtype=dtype)))
    W_E = torch.randn(vocab, d, generator=gen).to(dtype)
    W_U = (torch.randn(d, vocab, generator=gen) / d**0.5).to(dtype)
    decoder = Decoder(W_E, None, W_U, torch.zeros(vocab, dtype=dtype), [None] * len(mlps),
                      [m.dense for m in mlps])
    return decoder, mlps
