"""The sparse autoencoder, its config, and its on-disk form.

    pre   = W_enc (x - b_dec) + b_enc          dense (B, n), used only to choose the active set
    idx   = allocate(pre)                      (B, k) latent indices per token
    vals  = relu(pre[idx])                     gathered; their backward is sparse, O(B k d)
    x_hat = sum_j vals_j W_dec[idx_j] + b_dec  saelab.kernels.sparse_decode

Weights are stored row-per-latent: W_enc and W_dec are both (n, d). A dictionary directory holds
`sae.safetensors` (weights, no pickle) and `cfg.json` (this config).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab import allocators
from saelab.checks import check_field_types
from saelab.errors import SaelabError
from saelab.io import read_safetensors, write_json, write_safetensors
from saelab.kernels import sparse_decode, sparse_encode

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass(frozen=True)
class SAEConfig:
    """What a dictionary is: enough to rebuild it and to know where it reads activations.

    Fields:
        d_in: width of the hooked activation.
        n_latents: dictionary size n.
        k: active latents per token (the budget k*B for batch-level allocators).
        allocator: topk, gradient_topk, feature_choice or mutual_choice (`saelab.allocators`).
        beta: gradient_topk's weight on the gradient term of its selection score.
        capacity: feature_choice's tokens-per-latent curve, uniform or zipf.
        zipf_alpha: exponent of the zipf capacity curve.
        hook: hook name the SAE was trained on, e.g. `blocks.2.hook_resid_post`.
        model: model spec the activations came from (`zoo:NAME`, a path, or a hub name).
        saelab_version: version that wrote the dictionary.
    """

    d_in: int
    n_latents: int
    k: int
    allocator: str = "topk"
    beta: float = 1.0
    capacity: str = "uniform"
    zipf_alpha: float = 0.5
    hook: str | None = None
    model: str | None = None
    saelab_version: str = ""

    def __post_init__(self) -> None:
        check_field_types(self)
        if min(self.d_in, self.n_latents, self.k) < 1:
            raise SaelabError(f"d_in, n_latents and k must be positive, got {self}")
        if self.k > self.n_latents:
            raise SaelabError(
                f"k={self.k} is larger than the dictionary (n_latents={self.n_latents}); "
                "choose k <= n_latents"
            )
        allocators.check(self.allocator)
        if self.capacity not in allocators.CAPACITIES:
            raise SaelabError(f"unknown capacity {self.capacity!r}; use uniform or zipf")

    @property
    def batch_level(self) -> bool:
        """Whether selection depends on the batch (then inference uses learned thresholds)."""
        return self.allocator in allocators.BATCH_ALLOCATORS

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        if not isinstance(d, dict):
            raise SaelabError(f"a dictionary config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SAE(torch.nn.Module):
    """A TopK-family sparse autoencoder; `encode` returns (indices, values), not a dense code."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        self.W_enc = torch.nn.Parameter(torch.empty(n, d, device=device))
        self.b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = torch.nn.Parameter(torch.empty(n, d, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
        if cfg.batch_level:
            # per-latent inference thresholds, set after training from the batch selection
            # boundary (`Trainer.calibrate_thresholds`); NaN until then
            self.register_buffer("threshold", torch.full((n,), float("nan"), device=device))

    def pre_acts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (B, n) pre-activations, without grad: they only pick the active set.

        `out`, a (B, n) buffer to write into, spares a training loop a fresh B x n allocation
        (and its page faults, ~10% of the matmul on CPU) every step."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T, out=out)

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None = None,
               batch: bool = False) -> allocators.Selection:
        """The active set. `grad` (B, d_in) steers gradient_topk; `batch` makes the
        batch-level allocators allocate over this batch instead of using their thresholds."""
        cfg = self.cfg
        if cfg.allocator == "topk" or (cfg.allocator == "gradient_topk" and grad is None):
            return allocators.topk(pre, cfg.k)
        if cfg.allocator == "gradient_topk":
            with torch.no_grad():
                return allocators.topk(allocators.gradient_score(pre, grad, self.W_dec, cfg.beta), cfg.k)
        if not batch:
            if torch.isnan(self.threshold).any():
                raise SaelabError(
                    f"this {cfg.allocator} SAE has no inference thresholds yet; encode with "
                    "batch=True or train it first"
                )
            return allocators.threshold(pre, self.threshold)
        if cfg.allocator == "feature_choice":
            return allocators.feature_choice(pre, cfg.k, cfg.capacity, cfg.zipf_alpha)
        return allocators.mutual_choice(pre, cfg.k)

    def encode_values(self, x: torch.Tensor, sel: allocators.Selection,
                      pre: torch.Tensor | None = None) -> torch.Tensor:
        """relu(pre) on the selection, differentiable with a sparse backward (k rows per token).

        Given the dense `pre` the selection came from, the values are gathered from it rather
        than recomputed (B*k dot products saved); the gradient is the same either way."""
        vals = torch.relu(sparse_encode(x - self.b_dec, self.W_enc, self.b_enc, sel.idx, pre))
        return vals if sel.mask is None else vals * sel.mask

    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None,
               batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, vals), each (B, k_max); slots a token does not use have vals == 0.

        `grad`: gradient of the LM loss w.r.t. x, for gradient_topk (without it: plain topk).
        `batch`: feature/mutual choice allocate over this batch rather than use thresholds.
        """
        if x.shape[-1] != self.cfg.d_in:
            raise SaelabError(
                f"input width {x.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}"
            )
        x = x.to(self.W_enc.dtype)
        pre = self.pre_acts(x)
        sel = self.select(pre, grad, batch)
        if torch.is_grad_enabled():
            return sel.idx, self.encode_values(x, sel, pre)
        vals = torch.relu(pre.gather(1, sel.idx))
        return sel.idx, vals if sel.mask is None else vals * sel.mask

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return sparse_decode(idx, vals, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_hat = self.decode(*self.encode(x.reshape(-1, shape[-1])))
        return x_hat.reshape(shape)

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
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        path = Path(path)
        cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.exists() or not w_path.exists():
            raise SaelabError(
                f"no saelab dictionary at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        try:
            cfg = SAEConfig.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise SaelabError(f"{cfg_path} is not a valid dictionary config ({e})") from None
        state, _ = read_safetensors(w_path, device=str(device))
        sae = cls(cfg, device=device)
        expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            raise SaelabError(f"{w_path} holds {found}, but {cfg_path} implies {expected}")
        check_weights(state, w_path)
        sae.load_state_dict(state)
        return sae


def check_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN/Inf weights (a diverged or corrupted dictionary) with the file named; the
    thresholds of batch-level SAEs may be inf (never selected) or NaN (not calibrated yet)."""
    for name, t in state.items():
        if name != "threshold" and not torch.isfinite(t).all():
            raise SaelabError(f"{path} holds NaN or Inf values in {name}; the dictionary is corrupt "
                              "or its training diverged")
