"""The sparse autoencoder, its config, its sparse codes, and its on-disk form.

    pre   = W_enc (x - b_dec) + b_enc          dense (B, n), used only to choose the active set
    idx   = allocate(pre)                      (B, k) latent indices per token
    vals  = relu(pre[idx])                     gathered; their backward is sparse, O(B k d)
    x_hat = sum_j vals_j W_dec[idx_j] + b_dec  saelab.kernels.sparse_decode

Weights are stored row-per-latent: W_enc and W_dec are both (n, d). A dictionary directory holds
`sae.safetensors` (weights, no pickle) and `cfg.json` (this config).

A transcoder (`SAEConfig.target_hook`; Dunefsky et al. 2024) reads one hook and reconstructs a
later one, e.g. an MLP's input (blocks.L.ln2.hook_normalized) to its output (blocks.L.hook_mlp_out):

    pre   = W_enc x + b_enc                    x is the input hook's activation; no b_dec on
                                               the input, which lives in the target's space
    y_hat = sum_j vals_j W_dec[idx_j] + b_dec [+ W_skip x]

W_dec is (n, d_out) and b_dec (d_out,); with `skip` (Paulo et al. 2025, sparsify's skip
connection) a dense learned W_skip (d_out, d_in), zero at init, adds a linear map of the input.
Selection, the sparse decode and every allocator are the SAE's.

Like torch's BatchNorm (and SAELens's BatchTopK), the batch-level allocators (feature_choice,
mutual_choice) allocate over the batch in train() mode and use their learned per-latent
thresholds in eval() mode; `saelab.load` returns a dictionary in eval() mode.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab import allocators
from saelab.checks import Cost, check_field_types, check_memory
from saelab.errors import SaelabError
from saelab.kernels import sparse_decode, sparse_encode
from saelab.models import DEFAULT_PROCESSING, check_hook_order, check_processing
from saelab.storage.files import read_safetensors, write_json, write_safetensors

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass(frozen=True)
class SAEConfig:
    """What a dictionary is: enough to rebuild it, to know where it reads activations, and
    where its training data came from (so an eval can default to that data's held-out split).

    Fields:
        d_in: width of the hooked activation.
        n_latents: dictionary size n.
        k: active latents per token (the budget k*B for batch-level allocators); 0 for relu
            and jumprelu, which have no budget.
        allocator: topk, gradient_topk, feature_choice, mutual_choice, relu, jumprelu or
            matryoshka (`saelab.allocators`).
        beta: gradient_topk's weight on the gradient term of its selection score.
        grad_score: gradient_topk's score, "normalised" (saelab's, scale-free beta) or "raw"
            (the published score, beta tuned per model).
        capacity: feature_choice's tokens-per-latent curve: zipf (the paper's) or uniform (an
            ablation).
        zipf_alpha: exponent of the zipf capacity curve.
        matryoshka: matryoshka's nested prefix widths, strictly increasing, the last n_latents
            (given without it, n_latents is appended); None for the other allocators.
        hook: hook name the SAE was trained on, e.g. `blocks.2.hook_resid_post`; a
            transcoder's input hook.
        target_hook: a transcoder's output: the (later) hook it reconstructs from `hook`'s
            activation, e.g. `blocks.1.hook_mlp_out` from `blocks.1.ln2.hook_normalized`; None
            for an SAE, which reconstructs `hook` itself.
        d_out: width of `target_hook` (None: d_in).
        skip: a transcoder with a learned linear skip connection W_skip x (d_out, d_in) added
            to its output (Paulo et al. 2025; sparsify's `skip_connection`).
        model: model spec the activations came from (`zoo:NAME`, a local path, or `hf:NAME`).
        processing: the model's weight processing those activations came from (see
            `saelab.models`): "folded" (LayerNorm folded, writing weights centred: saelab's and
            TransformerLens's default), "centred" (writing weights centred only) or "raw" (the
            Hugging Face model's own activations, as SAELens's trainer and sparsify use). A cfg.json
            without it was written by saelab before the field existed, so it reads as folded.
            Splicing or encoding on a model of another processing is refused.
        data: data spec of the training text; evals default to its held-out split.
        context_length: tokens per row (BOS included) the activations were computed with.
        train_tokens: activation vectors the SAE was trained on.
        eval_tokens: held-out tokens of the end-of-run eval, which is also the window over
            which dead latents are counted; `saelab eval` uses the same window by default.
        saelab_version: version that wrote the dictionary.
    """

    d_in: int
    n_latents: int
    k: int
    allocator: str = "topk"
    beta: float = 1.0
    grad_score: str = "normalised"
    capacity: str = "zipf"
    zipf_alpha: float = 0.5
    matryoshka: list[int] | None = None
    hook: str | None = None
    target_hook: str | None = None
    d_out: int | None = None
    skip: bool = False
    model: str | None = None
    processing: str = DEFAULT_PROCESSING
    data: str | None = None
    context_length: int | None = None
    train_tokens: int | None = None
    eval_tokens: int | None = None
    saelab_version: str = ""

    def __post_init__(self) -> None:
        check_field_types(self)
        allocators.check_settings(self.allocator, self.capacity, self.grad_score)
        budget = self.kind.budget
        if min(self.d_in, self.n_latents) < 1 or self.k < (1 if budget else 0):
            raise SaelabError(
                f"d_in and n_latents must be positive and k {'positive' if budget else '>= 0'} "
                f"for {self.allocator}, got d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}"
            )
        if self.k > self.n_latents:
            raise SaelabError(
                f"k={self.k} is larger than the dictionary (n_latents={self.n_latents}); "
                "choose k <= n_latents"
            )
        check_processing(self.processing)
        self._check_transcoder()
        object.__setattr__(self, "matryoshka", allocators.check_widths(self.matryoshka, self.n_latents,
                                                                       self.kind))
        if self.matryoshka and self.skip:  # its prefixes' reconstructions carry no skip term
            raise SaelabError("matryoshka with a skip connection is not supported: drop --skip, "
                              "or train the skip transcoder with another allocator")
        # before any tensor exists (a meta SAE too overflows torch on a 10^18-latent config)
        n, d, o = self.n_latents, self.d_in, self.out_dim
        check_memory([Cost("float32 weights", 4 * n * (d + o + 2), ("n_latents",)),
                      Cost("b_dec and W_skip", 4 * o * (1 + d * self.skip), ("d_in",))],
                     {"n_latents": n}, f"d_in {d}")

    def _check_transcoder(self) -> None:
        """skip and d_out belong to transcoders; a target comes after its input hook."""
        if self.target_hook is None:
            if self.skip or self.d_out is not None:
                raise SaelabError("skip and d_out describe transcoders; set target_hook (--target-hook, "
                                  "the hook to reconstruct) or drop them")
            return
        if self.d_out is not None and self.d_out < 1:
            raise SaelabError(f"d_out must be positive, got {self.d_out}")
        if self.hook is not None:
            check_hook_order(self.hook, self.target_hook)

    @property
    def transcoder(self) -> bool:
        """Whether it reconstructs another hook (`target_hook`) than the one it reads."""
        return self.target_hook is not None

    @property
    def out_dim(self) -> int:
        """Width of what it reconstructs: d_out for a transcoder, else d_in."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def out_hook(self) -> str | None:
        """The hook it reconstructs (and replaces when spliced): target_hook, else hook."""
        return self.target_hook if self.target_hook is not None else self.hook

    @property
    def batch_level(self) -> bool:
        """Whether selection depends on the batch (then inference uses learned thresholds)."""
        return self.kind.batch_level

    @property
    def has_thresholds(self) -> bool:
        """Whether the dictionary carries per-latent thresholds (a `threshold` buffer)."""
        return self.kind.thresholds

    @property
    def kind(self) -> allocators.Allocator:
        """The registered allocator this dictionary selects with (`saelab.allocators`)."""
        return allocators.get(self.allocator)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        if not isinstance(d, dict):
            raise SaelabError(f"a dictionary config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SparseCode:
    """Active latents per token: `idx` and `vals`, each (..., k_max); unused slots hold vals 0.

    Behaves as the pair `(idx, vals)` (unpacking, `code[0]`). k_max varies with the batch for
    allocators without a fixed budget (thresholds, relu), so codes are joined with
    `SparseCode.cat`, which pads."""

    idx: torch.Tensor
    vals: torch.Tensor
    n_latents: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.idx, self.vals))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.idx, self.vals)[i]

    @property
    def shape(self) -> torch.Size:
        return self.idx.shape

    @property
    def l0(self) -> torch.Tensor:
        """Active latents per token, (...)."""
        return (self.vals > 0).sum(-1)

    def to_dense(self) -> torch.Tensor:
        """The dense code (..., n_latents)."""
        dense = self.vals.new_zeros(*self.vals.shape[:-1], self.n_latents)
        return dense.scatter_add_(-1, self.idx, self.vals)

    def pad(self, k_max: int) -> SparseCode:
        """The same code with `k_max` slots (extra slots: latent 0, value 0)."""
        extra = k_max - self.idx.shape[-1]
        if extra < 0:
            raise SaelabError(f"cannot pad a code of {self.idx.shape[-1]} slots to {k_max}")
        pad = torch.nn.functional.pad
        return SparseCode(pad(self.idx, (0, extra)), pad(self.vals, (0, extra)), self.n_latents)

    @staticmethod
    def cat(codes: Sequence[SparseCode], dim: int = 0) -> SparseCode:
        """Concatenate codes along a token dimension, padding each to the widest."""
        if not codes or len({c.n_latents for c in codes}) != 1:
            raise SaelabError("SparseCode.cat needs at least one code, all of one dictionary size")
        k_max = max(c.idx.shape[-1] for c in codes)
        padded = [c.pad(k_max) for c in codes]
        return SparseCode(torch.cat([c.idx for c in padded], dim),
                          torch.cat([c.vals for c in padded], dim), codes[0].n_latents)


class SAE(torch.nn.Module):
    """A sparse autoencoder; `encode` returns a `SparseCode` (indices, values), not a dense code.

    A new SAE is usable at once: unit-norm random decoder rows and W_enc = W_dec (training
    re-initialises from data, `saelab.sae_init`)."""

    threshold: torch.Tensor  # per-latent buffer (n_latents,), only when cfg.has_thresholds
    W_skip: torch.nn.Parameter  # (d_out, d_in), only for a transcoder with cfg.skip

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        n, d, o = cfg.n_latents, cfg.d_in, cfg.out_dim
        self.W_enc = torch.nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = torch.nn.Parameter(torch.empty(n, o, device=device, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(o, device=device, dtype=dtype))
        if cfg.skip:
            self.W_skip = torch.nn.Parameter(torch.zeros(o, d, device=device, dtype=dtype))
        if cfg.has_thresholds:
            # until trained (`Trainer.calibrate_thresholds`) or loaded: the kind's fill value
            self.register_buffer("threshold", torch.full((n,), cfg.kind.threshold_fill, device=device,
                                                         dtype=dtype))
        if torch.device(device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, W_enc = W_dec, zero biases (Gao et al.'s init). A
        transcoder's encoder reads another space than its decoder writes: its rows are drawn
        apart (unit norm too); W_skip starts at zero (sparsify's and SAELens's init)."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if self.cfg.transcoder:
            w = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What W_enc multiplies: x - b_dec for an SAE, x itself for a transcoder."""
        return x if self.cfg.transcoder else x - self.b_dec

    def pre_acts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (B, n) pre-activations, without grad: they only pick the active set.

        `out`, a (B, n) buffer to write into, spares a training loop a fresh B x n allocation
        (and its page faults, ~10% of the matmul on CPU) every step."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, self.encoder_input(x), self.W_enc.T, out=out)

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None = None,
               batch: bool = False) -> allocators.Selection:
        """The active set. `grad` (B, d_out), the LM-loss gradient w.r.t. what the dictionary
        reconstructs, steers gradient_topk; `batch` makes the
        batch-level allocators allocate over this batch instead of using their thresholds."""
        return self.cfg.kind.select(self, pre, grad, batch)

    def encode_values(self, x: torch.Tensor, sel: allocators.Selection,
                      pre: torch.Tensor | None = None) -> torch.Tensor:
        """relu(pre) on the selection, differentiable with a sparse backward (k rows per token).

        Given the dense `pre` the selection came from, the values are gathered from it rather
        than recomputed (B*k dot products saved); the gradient is the same either way."""
        vals = torch.relu(sparse_encode(self.encoder_input(x), self.W_enc, self.b_enc, sel.idx, pre))
        return vals if sel.mask is None else vals * sel.mask

    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None,
               batch: bool | None = None) -> SparseCode:
        """The sparse code of x (..., d_in): `SparseCode` with idx and vals (..., k_max).

        `grad`: gradient of the LM loss w.r.t. x (a transcoder's: w.r.t. its target), for
        gradient_topk (without it: plain topk).
        `batch`: whether feature/mutual choice allocate over these tokens (as in training) or
        use their thresholds; default: allocate in train() mode, thresholds in eval() mode.
        """
        if x.shape[-1] != self.cfg.d_in:
            raise SaelabError(
                f"input width {x.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}"
            )
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if grad is not None:
            grad = grad.reshape(-1, grad.shape[-1])
        pre = self.pre_acts(x)
        sel = self.select(pre, grad, self.training if batch is None else batch)
        if torch.is_grad_enabled():
            vals = self.encode_values(x, sel, pre)
        else:
            vals = torch.relu(pre.gather(1, sel.idx))
            vals = vals if sel.mask is None else vals * sel.mask
        k_max = sel.idx.shape[1]
        return SparseCode(sel.idx.reshape(*lead, k_max), vals.reshape(*lead, k_max), self.cfg.n_latents)

    def encode_dense(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The dense code (..., n_latents) of x (..., d_in); `encode`'s arguments apply."""
        return self.encode(x, **kwargs).to_dense()

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat (..., d_out) from idx and vals (..., k), without building the dense code.

        A skip transcoder's output also depends on its input: pass `x` (..., d_in), whose
        W_skip x is added (refused without it: the output would silently lack the skip)."""
        lead, k = idx.shape[:-1], idx.shape[-1]
        x_hat = sparse_decode(idx.reshape(-1, k), vals.reshape(-1, k), self.W_dec, self.b_dec)
        if self.cfg.skip:
            if x is None:
                raise SaelabError("a skip transcoder's output needs its input: decode(idx, vals, x)")
            x_hat = x_hat + x.reshape(-1, self.cfg.d_in).to(x_hat.dtype) @ self.W_skip.T
        return x_hat.reshape(*lead, self.cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x (an SAE) or of the target hook from x (a transcoder)."""
        code = self.encode(x)
        return self.decode(code.idx, code.vals, x)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def save(self, path: str | Path) -> Path:
        """Write the dictionary directory; each file is replaced atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / WEIGHTS_FILE, dict(self.state_dict()))
        write_json(path / CONFIG_FILE, dataclasses.asdict(self.cfg))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> SAE:
        """A saelab dictionary directory, in eval() mode; `dtype` casts (default: as stored)."""
        path = Path(path)
        cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.exists() or not w_path.exists():
            raise SaelabError(
                f"no saelab dictionary at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                "saelab.load also reads SAELens and sparsify dictionaries and run directories of them)"
            )
        try:
            raw = json.loads(cfg_path.read_text())
            if not isinstance(raw, dict):
                raise SaelabError(f"{cfg_path} must be a JSON object, got {type(raw).__name__}")
            if "n_latents" not in raw:
                raise SaelabError(
                    f"{cfg_path} is not a saelab, SAELens or sparsify dictionary config (saelab's "
                    "names n_latents, SAELens's d_sae, sparsify's d_in and num_latents)")
            cfg = SAEConfig.from_dict(raw)
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise SaelabError(f"{cfg_path} is not a valid dictionary config ({e})") from None
        state, _ = read_safetensors(w_path, device=str(device))
        return cls.from_state(cfg, state, str(w_path), dtype)

    @classmethod
    def from_state(cls, cfg: SAEConfig, state: dict[str, torch.Tensor], source: str,
                   dtype: torch.dtype | None = None) -> SAE:
        """An SAE (eval() mode) holding `state`, whose names and shapes must match `cfg`."""
        sae = cls(cfg, device="meta")
        expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            raise SaelabError(f"{source} holds {found}, but its config implies {expected}")
        check_weights(state, source)
        sae.load_state_dict(state, assign=True)
        if dtype is not None:
            sae.to(dtype)
        return sae.eval()


def check_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse NaN/Inf weights (a diverged or corrupted dictionary) with the file named; the
    thresholds of batch-level SAEs may be inf (never selected) or NaN (not calibrated yet)."""
    for name, t in state.items():
        if name != "threshold" and not torch.isfinite(t).all():
            raise SaelabError(f"{path} holds NaN or Inf values in {name}; the dictionary is corrupt "
                              "or its training diverged")
