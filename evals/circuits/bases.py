"""Node bases: what a circuit is made of, behind one interface.

A basis is a list of sites; a site is one hook whose activation x (B, T, d), per-head dims
flattened as `HookedModel.activations` gives it, splits into nodes. `split(x)` returns parts,
each (B, T, N_g, w_g) for a group of N_g nodes of width w_g, and `lin(parts)` is the linear map
back, so that x = lin(split(x)) + a constant. Patching nodes from a source (the counterfactual
run, or a mean) is then x + lin(mask * (source - split(x))), and the gradient with respect to a
node is taken through zero parts added the same way, x + lin(delta): the forward value and the
gradient reaching upstream are the model's own.

- heads: one site per layer at `blocks.L.attn.hook_z`, a node per head (width d_head).
- neurons: one site per layer at `blocks.L.mlp.hook_post`, a node per neuron (width 1).
- rotation: the neurons' sites in a random orthogonal basis (a node per direction, width 1):
  as many nodes as neurons, describing the same activations, with no error node (the rotation
  rebuilds x exactly); the baseline a dictionary must beat to show its directions are special.
- a dictionary (saelab, SAELens or sparsify; a run directory gives one site per hook): its
  latents (width 1; the part is the latent's activation, lin multiplies by its decoder row)
  and one error node (width d: x - x_hat, as Marks et al.), at the hook it was trained on.
  Latents are read with the dictionary's inference selection; the encoder takes no gradient
  (selection is not differentiable), so a latent's gradient is its decoder row . dm/dx.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import SaelabError
from saelab.models import HookedModel

from .patching import head_shape, z_hook

Parts = list[torch.Tensor]
NAMED_BASES = ("heads", "neurons", "rotation")
DEFAULT_ROTATION_SEED = 0


class Site:
    """One hook's nodes (see the module docstring)."""

    hook: str
    names: list[str]
    errors: list[bool]  # per node: is it an error node

    def split(self, x: torch.Tensor) -> Parts:
        raise NotImplementedError

    def lin(self, parts: Parts) -> torch.Tensor:
        raise NotImplementedError

    def sizes(self) -> list[int]:
        """Nodes per group, in `split`'s order."""
        raise NotImplementedError


class HeadSite(Site):
    def __init__(self, layer: int, n_heads: int, d_head: int):
        self.hook, self.n_heads, self.d_head = z_hook(layer), n_heads, d_head
        self.names = [f"{layer}.{h}" for h in range(n_heads)]
        self.errors = [False] * n_heads

    def split(self, x):
        return [x.unflatten(-1, (self.n_heads, self.d_head))]

    def lin(self, parts):
        return parts[0].flatten(-2)

    def sizes(self):
        return [self.n_heads]


class NeuronSite(Site):
    def __init__(self, layer: int, d_mlp: int):
        self.hook = f"blocks.{layer}.mlp.hook_post"
        self.names = [f"{layer}.n{i}" for i in range(d_mlp)]
        self.errors = [False] * d_mlp

    def split(self, x):
        return [x.unsqueeze(-1)]

    def lin(self, parts):
        return parts[0].squeeze(-1)

    def sizes(self):
        return [len(self.names)]


class RotationSite(Site):
    """The activation at `hook` (width d) in the orthonormal basis of `q`'s rows (d, d):
    node i is x . q_i, and x = sum_i (x . q_i) q_i."""

    def __init__(self, hook: str, q: torch.Tensor):
        self.hook, self.q = hook, q
        self.names = [f"{hook}/r{i}" for i in range(q.shape[0])]
        self.errors = [False] * q.shape[0]

    def split(self, x):
        return [(x @ self.q.T.to(x)).unsqueeze(-1)]

    def lin(self, parts):
        return parts[0].squeeze(-1) @ self.q.to(parts[0])

    def sizes(self):
        return [len(self.names)]


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """A (d, d) orthogonal matrix drawn uniformly (Haar): QR of a Gaussian matrix in float64,
    columns' signs fixed by R's diagonal."""
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).T.float()


class DictionarySite(Site):
    def __init__(self, hook: str, sae):
        self.hook, self.sae = hook, sae
        n = sae.cfg.n_latents
        self.names = [f"{hook}/{i}" for i in range(n)] + [f"{hook}/error"]
        self.errors = [False] * n + [True]

    def split(self, x):
        with torch.no_grad():
            z = self.sae.encode_dense(x.to(self.sae.dtype)).to(x.dtype)
            error = x - (z @ self.sae.W_dec.to(x.dtype) + self.sae.b_dec.to(x.dtype))
        return [z.unsqueeze(-1), error.unsqueeze(-2)]

    def lin(self, parts):
        return parts[0].squeeze(-1) @ self.sae.W_dec.detach().to(parts[0].dtype) + parts[1].squeeze(-2)

    def sizes(self):
        return [len(self.names) - 1, 1]


@dataclass
class Basis:
    """Sites in forward order, and a name for reports (heads, neurons, or the dictionary's)."""

    name: str
    sites: list[Site]

    @property
    def names(self) -> list[str]:
        return [n for s in self.sites for n in s.names]

    @property
    def errors(self) -> torch.Tensor:
        """(N,) bool: error nodes."""
        return torch.tensor([e for s in self.sites for e in s.errors], dtype=torch.bool)

    def __len__(self) -> int:
        return sum(len(s.names) for s in self.sites)

    @property
    def hooks(self) -> list[str]:
        return [s.hook for s in self.sites]

    def per_site(self, flat: torch.Tensor) -> list[list[torch.Tensor]]:
        """A (..., N) tensor cut into each site's groups, (..., N_g) each."""
        out, start = [], 0
        for s in self.sites:
            groups = []
            for n in s.sizes():
                groups.append(flat[..., start:start + n])
                start += n
            out.append(groups)
        return out


def basis(model: HookedModel, spec) -> Basis:
    """The basis `spec` names on `model`: "heads", "neurons", "rotation" (seed
    `DEFAULT_ROTATION_SEED`), a dictionary or run directory path, an SAE, or {hook: SAE}; every
    dictionary is checked against the model first."""
    if isinstance(spec, str | Path) and str(spec) in NAMED_BASES:
        return {"heads": heads, "neurons": neurons, "rotation": rotation}[str(spec)](model)
    if isinstance(spec, str | Path):
        from saelab.formats import open_dictionary

        if not Path(spec).is_dir():
            raise SaelabError(f"unknown basis {str(spec)!r}; use heads, neurons, rotation, or a dictionary "
                              "(or run) directory")
        name, spec = Path(spec).name, open_dictionary(spec, device=model.device)
    else:
        name = "dictionary"
    saes = dict(spec) if isinstance(spec, Mapping) else {spec.cfg.hook: spec}
    return Basis(name, [dictionary_site(model, hook, sae) for hook, sae in _in_order(model, saes)])


def heads(model: HookedModel) -> Basis:
    n_layers, n_heads = head_shape(model)
    return Basis("heads", [HeadSite(layer, n_heads, model.model.cfg.d_head) for layer in range(n_layers)])


def neurons(model: HookedModel) -> Basis:
    d_mlp = getattr(model.model.cfg, "d_mlp", None)
    sites: list[Site] = [NeuronSite(layer, d_mlp or 0) for layer in range(model.n_layers)]
    if not d_mlp or any(s.hook not in model.model.hook_dict for s in sites):
        raise SaelabError(f"model {model.spec} has no MLP neurons to patch (blocks.L.mlp.hook_post "
                          "is missing); use --basis heads or a dictionary")
    return Basis("neurons", sites)


def rotation(model: HookedModel, seed: int = DEFAULT_ROTATION_SEED) -> Basis:
    """The neurons' sites, each in its own random orthogonal basis (seeded by `seed` and the
    layer)."""
    sites: list[Site] = [RotationSite(s.hook, random_rotation(len(s.names), seed * 1000 + layer))
                         for layer, s in enumerate(neurons(model).sites)]
    return Basis("rotation", sites)


def _in_order(model: HookedModel, saes: dict) -> list[tuple[str, object]]:
    """Dictionaries sorted by where their hook fires in the forward pass."""
    order = {h: i for i, h in enumerate(model.model.hook_dict)}
    for hook in saes:
        if hook not in order:
            raise SaelabError(f"the dictionary's hook {hook!r} is not a hook of model {model.spec}; "
                              f"pass the model it was trained on (valid hooks look like "
                              f"blocks.0.hook_resid_post, blocks 0..{model.n_layers - 1})")
    return sorted(saes.items(), key=lambda kv: order[kv[0]])


def check_not_transcoder(hook: str | None, sae) -> None:
    """One line for a transcoder: its latents rebuild another hook, so a node basis at `hook`
    would split one hook by another's reconstruction."""
    if sae.cfg.transcoder:
        raise SaelabError(f"the dictionary at {hook} is a transcoder ({hook} -> "
                          f"{sae.cfg.target_hook}); circuit bases take SAEs, which rebuild the "
                          "hook they read")


def dictionary_site(model: HookedModel, hook: str, sae) -> DictionarySite:
    """A dictionary's site, refused in one line when it does not fit the model."""
    check_not_transcoder(hook, sae)
    model.check_hooks([hook])
    model.check_dictionary(sae, hook)
    width = model.hook_dims([hook])[hook]
    if sae.cfg.d_in != width:
        raise SaelabError(f"the dictionary at {hook} has d_in={sae.cfg.d_in}, but model "
                          f"{model.spec}'s {hook} is {width} wide; pass the model it was trained on")
    return DictionarySite(hook, sae)
