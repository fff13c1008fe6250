"""The streaming pass and the decoder-side facts a feature page shows.

One forward pass of the model per batch of held-out rows feeds every dictionary of a run (one
per hook), each into its `FeatureStats`. Rows come from `saelab.data.heldout.heldout_rows`, the
same held-out rows `saelab eval` scores, and BOS/pad positions are skipped as there.

Next-token effects ("promotes / suppresses") are the direct path only: the latent's decoder row
mapped into the residual stream by the hook's own linear output map, then through the
unembedding (W_U, with the final LayerNorm folded in by transformer-lens and its per-token scale
ignored). That map exists for the residual stream itself (hook_embed, hook_resid_pre/mid/post,
hook_attn_out, hook_mlp_out: identity), attention head outputs (attn.hook_z: through W_O of each
head; attn.hook_result: summed over heads) and MLP neurons (mlp.hook_post: through W_out). The
effect through later layers is not linear and is not shown; for any other hook (queries, keys,
MLP pre-activations, ...) there is no linear path to the output, and the page says so.

A transcoder's latents are read at its input hook (contexts, counts, activations) and write at
its target hook: their effects map the decoder row from the target (e.g. hook_mlp_out, the
residual stream's own space). Its skip connection W_skip x belongs to no latent and is not shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saelab.browse.stats import FeatureStats, StatsConfig
from saelab.data.activations import positions_to_keep
from saelab.data.heldout import heldout_rows, resolve_dictionary
from saelab.data.tokens import TokenData
from saelab.errors import SaelabError
from saelab.formats import load_one
from saelab.models import HookedModel
from saelab.sae import CONFIG_FILE, SAE

_RESID = re.compile(
    r"^(hook_embed|hook_pos_embed|blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out))$")
_HEAD_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
_HEAD_RESULT = re.compile(r"^blocks\.(\d+)\.attn\.hook_result$")
_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def find_dictionaries(path: str | Path) -> list[Path]:
    """A dictionary directory, or a run directory holding one dictionary per subdirectory
    (what `saelab train --hook A --hook B` writes), as a sorted list of dictionary paths."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return [path]
    found = sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}")) if path.is_dir() else []
    if not found:
        raise SaelabError(
            f"{path} is neither a dictionary directory (with {CONFIG_FILE}) nor a run directory "
            "with one dictionary per subdirectory"
        )
    return found


@dataclass
class Dictionary:
    """One dictionary of the site and its pass over the data.

    Fields:
        name: its hook, which titles its section.
        sae: the loaded dictionary.
        stats: its streaming statistics, filled by `collect`.
    """

    name: str
    sae: SAE
    stats: FeatureStats


def load_dictionaries(saes: list, latents: list[int] | None, cfg: StatsConfig,
                      model: HookedModel | str | None = None, data: TokenData | str | None = None,
                      device: str = "cpu") -> tuple[list[Dictionary], HookedModel, TokenData]:
    """Load and check each dictionary (path or SAE) against one model and data source.

    `latents` must exist in every dictionary; None means all. Bad input fails here, before any
    pass over the data.
    """
    loaded = [(load_one(s, device), str(s)) if isinstance(s, (str, Path)) else (s, None) for s in saes]
    for sae, path in loaded:  # checks that need no model come first
        if latents and max(latents) >= sae.cfg.n_latents:
            raise SaelabError(f"latent {max(latents)} does not exist: {path or 'the dictionary'} "
                              f"has {sae.cfg.n_latents} latents (0..{sae.cfg.n_latents - 1})")
    out = []
    for sae, path in loaded:
        sae, _, model, data = resolve_dictionary(sae, model, data, None, device)
        if sae.cfg.model not in (None, model.spec):
            raise SaelabError(f"{path or 'a dictionary'} was trained on {sae.cfg.model}, not on "
                              f"{model.spec}; browse dictionaries of one model together")
        hook = sae.cfg.hook
        assert hook is not None  # resolve_dictionary refuses a dictionary that names no hook
        out.append(Dictionary(hook, sae.eval(), FeatureStats(sae.cfg.n_latents, cfg, latents)))
    if len({d.name for d in out}) != len(out):
        raise SaelabError(f"the dictionaries share hooks ({[d.name for d in out]}); browse them one by one")
    if not isinstance(model, HookedModel) or not isinstance(data, TokenData):  # resolved unless no saes
        raise SaelabError("no dictionary to browse; pass at least one")
    return out, model, data


@torch.no_grad()
def collect(dicts: list[Dictionary], model: HookedModel, data: TokenData, tokens: int,
            batch_rows: int = 32, progress: bool = True) -> int:
    """One streaming pass over `tokens` held-out positions into every dictionary's stats;
    returns the positions seen (whole rows, so at least `tokens` unless the split runs out)."""
    tok = model.tokenizer
    hooks = [d.name for d in dicts]
    rows = heldout_rows(tok, data, tokens)
    bar = tqdm(total=int(positions_to_keep(rows, tok).sum()), unit="tok", unit_scale=True,
               desc="browse", disable=not progress)
    for batch in rows.split(batch_rows):
        batch = batch.to(model.device)
        keep = positions_to_keep(batch, tok)
        acts = model.activations(batch, hooks)
        for d in dicts:
            idx, vals = d.sae.encode(acts[d.name][keep])
            d.stats.update(batch, keep, idx, vals)
        bar.update(int(keep.sum()))
    bar.close()
    return dicts[0].stats.tokens


def output_directions(model: HookedModel, hook: str, W_dec: torch.Tensor) -> torch.Tensor | None:
    """Each decoder row's direct write into the residual stream (n, d_model), or None when
    the hook has no linear path to the output (module docstring)."""
    m = model.model
    if _RESID.match(hook):
        return W_dec
    if g := _HEAD_Z.match(hook):
        W_O = m.W_O[int(g[1])]  # (heads, d_head, d_model)
        return torch.einsum("nhe,hed->nd", W_dec.view(W_dec.shape[0], *W_O.shape[:2]), W_O.to(W_dec))
    if _HEAD_RESULT.match(hook):
        return W_dec.view(W_dec.shape[0], -1, m.cfg.d_model).sum(1)
    if g := _MLP_POST.match(hook):
        return W_dec @ m.W_out[int(g[1])].to(W_dec)
    return None


def effect_note(hook: str) -> str:
    """What the promoted/suppressed tokens of a hook's latents mean (or why there are none)."""
    if _RESID.match(hook):
        return "decoder direction through the unembedding (direct path; final LayerNorm scale ignored)"
    if _HEAD_Z.match(hook) or _HEAD_RESULT.match(hook):
        return ("decoder direction through each head's W_O into the residual stream, then the "
                "unembedding (direct path only; later layers ignored)")
    if _MLP_POST.match(hook):
        return ("decoder direction through the MLP's W_out into the residual stream, then the "
                "unembedding (direct path only; later layers ignored)")
    return f"not shown: {hook} has no linear path to the logits (the rest of the model is not linear)"


@torch.no_grad()
def logit_effects(model: HookedModel, hook: str, W_dec: torch.Tensor, latents: list[int], top: int = 10):
    """(promoted ids, values, suppressed ids, values), each (L, top), or None (module docstring)."""
    dirs = output_directions(model, hook, W_dec[latents].float())
    if dirs is None:
        return None
    logits = dirs @ model.model.W_U.float()
    top = min(top, logits.shape[1])
    up, down = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
    return up.indices, up.values, down.indices, down.values


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, latents: list[int], m: int = 8, chunk: int = 1024):
    """(ids, cosines), each (L, m): the latents whose decoder rows are closest in cosine to
    each of `latents` (itself excluded), computed in row chunks (no n x n matrix)."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    m = min(m, unit.shape[0] - 1)
    ids, cos = [], []
    for part in torch.tensor(latents, dtype=torch.long).split(chunk):
        sim = unit[part] @ unit.T
        sim[torch.arange(part.numel()), part] = -torch.inf
        best = sim.topk(m, dim=1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)

