"""Activation caches: shards on disk plus a manifest, and shuffled streams of batches.

On disk a cache is a directory:

    manifest.json           model spec and processing, hooks and widths, dtype, data, tokens,
                            seed, shard list
    shard_00000.safetensors one tensor per hook, (rows, d); rows are token positions
    ...

BOS and pad positions are dropped when caching (their activations are outliers that no SAE
should spend capacity on). Every file is written atomically and the manifest last, so a cache
whose manifest exists is complete. One process writes a cache at a time (`saelab.storage.lock`).

Integrity: each shard's entry in the manifest holds its byte size and the SHA-256 of its bytes,
hashed from the buffer as it is written (no second pass). A reader checks the size when it opens
the manifest and the hash as it loads each shard (the one read that loads it, so no pass over
the data before training), and refuses shard names that leave the cache directory (absolute,
`..`, symlinks pointing out) and NaN/Inf activations, naming the file; the builder refuses
NaN/Inf too. Manifests written before hashes existed are read without the content check (a
warning says to rebuild for it).

Two streams yield shuffled (B, d) batches for training:
- `CacheStream` reads a cache with bounded memory. The order of epoch e is fixed by
  (seed, e): shards are permuted, taken in groups of `buffer_shards`, and the rows of a group
  permuted; batches are consecutive slices of that order. Its position is just
  (epoch, offset), so `state_dict()` / `load_state_dict()` resume exactly.
(`saelab.data.activations.ModelStream` yields the same batches from a model run on the fly.)
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from saelab.checks import Cost, check_device, check_field_types, check_memory, check_number, doc_field
from saelab.data.activations import Batch, Layout, model_activations
from saelab.data.tokens import BUILTIN_STDLIB, SPLITS, TokenData
from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.models import DEFAULT_PROCESSING, PROCESSINGS, HookedModel, check_processing, grad_key
from saelab.storage.files import check_output_dir, read_safetensors, write_json, write_safetensors
from saelab.storage.lock import hold
from saelab.zoo import DEFAULT_MODEL

MANIFEST = "manifest.json"
FORMAT = "saelab-activation-cache/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIGEST = "sha256"  # hashlib name of the per-shard content hash; the manifest key too


@dataclass(frozen=True)
class Manifest:
    """The JSON manifest of a cache directory (see module docstring)."""

    model: str
    hooks: dict[str, int]
    dtype: str
    rows: int
    data: dict
    shards: list[dict]
    saelab_version: str
    with_grads: bool = False
    # the model's weight processing (`saelab.models`); manifests written before it was recorded
    # come from folded models, saelab's only kind then
    processing: str = DEFAULT_PROCESSING
    format: str = FORMAT

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest of cache `directory`, checked against what is on disk (sizes, paths)."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise SaelabError(
                f"no activation cache at {directory} ({MANIFEST} missing); build one with "
                "`saelab cache`"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SaelabError(f"{path} is not a valid cache manifest ({e})") from None
        if not isinstance(raw, dict):
            raise SaelabError(f"{path} is not a valid cache manifest (not a JSON object)")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in raw]
        if missing:
            raise SaelabError(f"{path} is not a valid cache manifest (missing {missing}); rebuild the cache")
        manifest = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        if manifest.format != FORMAT:
            raise SaelabError(f"{path} has format {manifest.format!r}; this saelab reads {FORMAT}")
        manifest._check_fields(path)
        for shard in manifest.shards:
            f = shard_path(Path(directory), shard["file"])
            if not f.exists():
                raise SaelabError(f"cache shard {f} listed in {path} is missing")
            if f.stat().st_size != shard["bytes"]:
                raise SaelabError(
                    f"cache shard {f} has {f.stat().st_size} bytes, the manifest says "
                    f"{shard['bytes']}: truncated or replaced; rebuild the cache"
                )
        return manifest

    def _check_fields(self, path: Path) -> None:
        """Types and consistency of what streams and the trainer read, as one clear error."""
        def bad(what: str) -> SaelabError:
            return SaelabError(f"{path} is not a valid cache manifest ({what}); rebuild the cache")

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(self.hooks, dict) or not self.hooks or not all(
            isinstance(h, str) and count(d) and d > 0 for h, d in self.hooks.items()
        ):
            raise bad("hooks must map hook names to positive widths")
        if self.dtype not in DTYPES:
            raise bad(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(self.processing, str) or self.processing not in PROCESSINGS:
            raise bad(f"processing {self.processing!r} is not one of {', '.join(PROCESSINGS)}")
        if not isinstance(self.data, dict) or not isinstance(self.data.get("spec"), str) \
                or not count(self.data.get("context_length")):
            raise bad("data must record its spec and context_length")
        if not isinstance(self.shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and count(s.get("rows"))
            and count(s.get("bytes")) and isinstance(s.get(DIGEST, ""), str) for s in self.shards
        ):
            raise bad("each shard needs a file name, rows and bytes")
        if not count(self.rows) or self.rows != sum(s["rows"] for s in self.shards):
            raise bad(f"rows={self.rows!r} is not the sum of its shards' rows")
        if not isinstance(self.with_grads, bool):
            raise bad("with_grads must be true or false")
        for s in self.shards:  # rows the reader will allocate must be in the file
            if s["rows"] * self.row_bytes > s["bytes"]:
                raise bad(f"shard {s['file']} claims {s['rows']} rows of {self.row_bytes} bytes, more "
                          f"than its {s['bytes']} bytes")

    @property
    def row_bytes(self) -> int:
        """Bytes of one row on disk: every hook (and its gradient) at the cache's dtype."""
        return sum(self.hooks.values()) * (1 + self.with_grads) * DTYPES[self.dtype].itemsize

    @property
    def hashed(self) -> bool:
        """Whether every shard carries a content hash (caches built before hashes do not)."""
        return all(DIGEST in s for s in self.shards)

    def check_hook(self, hook: str, directory: Path) -> int:
        """Width of `hook` in this cache, or a clear error when the cache lacks it."""
        if hook not in self.hooks:
            raise SaelabError(
                f"cache {directory} holds hooks {sorted(self.hooks)}, not {hook!r}"
            )
        return self.hooks[hook]


def shard_path(directory: Path, name: str) -> Path:
    """`directory / name` for a shard listed in a manifest, refusing any path that leaves the
    cache directory (absolute, `..`, or a symlink pointing elsewhere)."""
    rel = Path(name)
    target = directory / rel
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or \
            not target.resolve().is_relative_to(directory.resolve()):
        raise SaelabError(
            f"{directory / MANIFEST} lists shard {name!r}, which is not inside the cache directory; "
            "shards must be files of that directory (rebuild the cache)"
        )
    return target


def check_finite(t: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf values. One sum is the fast test; a non-finite sum (which a huge but
    finite tensor could also give) is confirmed element-wise before refusing."""
    if not torch.isfinite(t.float().sum()) and not torch.isfinite(t).all():
        raise SaelabError(f"{where} holds NaN or Inf values")


@dataclass(frozen=True)
class CacheConfig:
    """`saelab cache`: what to run, which hooks to capture, how many rows and how to store them
    (the output directory is the command's argument)."""

    model: str = doc_field(DEFAULT_MODEL, "Model spec: zoo:NAME, a local HF directory, or hf:NAME "
                           "on the hub.")
    hooks: tuple[str, ...] = doc_field((), "Hook to capture; repeat for several (one forward "
                                       "pass).", "blocks.{n_layers//2}.hook_resid_post", flag="hook")
    processing: str = doc_field(DEFAULT_PROCESSING, "The model's weight processing: folded "
                                "(LayerNorm folded, writing weights centred), centred (writing "
                                "weights centred only) or raw (the Hugging Face model's own "
                                "activations).")
    data: str = doc_field(BUILTIN_STDLIB, "Token data: builtin:stdlib, a .txt/.jsonl file or "
                          "directory, or hf:NAME.")
    split: str = doc_field("train", f"Data split: {' or '.join(SPLITS)}.")
    tokens: int = doc_field(1_000_000, "Activation rows (token positions) to cache.")
    context_length: int | None = doc_field(None, "Tokens per row, BOS included.",
                                           "min(model context, 128)")
    shard_rows: int = doc_field(65536, "Rows per shard file.")
    dtype: str = doc_field("float32", f"Storage dtype: {', '.join(DTYPES)}.")
    seed: int = doc_field(0, "Seed for the document order.")
    device: str = doc_field("cpu", "Torch device.")
    with_grads: bool = doc_field(False, "Also store the gradient of the next-token loss w.r.t. "
                                 "each activation (for gradient_topk).")
    overwrite: bool = doc_field(False, "Allow writing into a non-empty directory.")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_processing(self.processing)
        for name, low in (("tokens", 1), ("shard_rows", 1), ("context_length", 2), ("seed", 0)):
            check_number(name, getattr(self, name), low)
        if self.split not in SPLITS:
            raise SaelabError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if self.dtype not in DTYPES:
            raise SaelabError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        check_device(self.device)


def build_cache(
    model: HookedModel,
    data: TokenData,
    hooks: list[str],
    out_dir: Path,
    tokens: int,
    batch_rows: int = 32,
    shard_rows: int = 65536,
    dtype: str = "float32",
    overwrite: bool = False,
    with_grads: bool = False,
    world: World | None = None,
    digest: str | None = DIGEST,
) -> Manifest:
    """Run `model` over `data`, capturing every hook in one forward pass, into shards.

    Data parallel (`world` of several processes, each given its own slice of `data` and
    `tokens` rows to write), every process writes its own shards and rank 0 the manifest.

    `with_grads` also stores, per hook, the gradient of the next-token loss w.r.t.
    the activation (key `{hook}:grad`), which gradient-TopK training needs.
    `digest=None` records no shard hashes (only for measuring what hashing costs).
    """
    if dtype not in DTYPES:
        raise SaelabError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if min(tokens, batch_rows, shard_rows) < 1:
        raise SaelabError(f"tokens, batch_rows and shard_rows must be positive, got "
                          f"{tokens}, {batch_rows}, {shard_rows}")
    model.check_hooks(hooks)
    width = sum(model.hook_dims(hooks).values()) * (1 + with_grads)
    shard = ("shard_rows", shard_rows) if shard_rows <= tokens else ("tokens", tokens)
    # pending float32 batches, their join and the cast shard, until a shard is written
    check_memory([Cost("shard buffer", shard[1] * width * (8 + DTYPES[dtype].itemsize), (shard[0],))],
                 dict([shard]), f"{width} floats a row")
    world = world or World()
    out_dir = Path(out_dir)
    if world.is_main:
        check_output_dir(out_dir, overwrite)
    data.require_rows(model.tokenizer)  # too little text is an error now, not an endless loop
    with hold(out_dir) if world.is_main else nullcontext():
        if world.is_main:
            check_output_dir(out_dir, overwrite)  # again under the lock: nobody slipped in
            (out_dir / MANIFEST).unlink(missing_ok=True)  # an incomplete rebuild must not look complete
        world.barrier()
        return _write_cache(model, data, hooks, out_dir, tokens, batch_rows, shard_rows, dtype,
                            with_grads, world, digest)


def _write_cache(model: HookedModel, data: TokenData, hooks: list[str], out_dir: Path, tokens: int,
                 batch_rows: int, shard_rows: int, dtype: str, with_grads: bool, world: World,
                 digest: str | None) -> Manifest:
    """`build_cache`'s work once its input is checked and its directory locked."""
    dims = model.hook_dims(hooks)
    prefix = "shard_" if world.size == 1 else f"shard_r{world.rank:03d}_"
    shards: list[dict] = []
    keys = hooks + [grad_key(h) for h in hooks] * with_grads
    pending: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    pending_rows = rows = 0

    def flush(n: int) -> None:
        nonlocal pending_rows
        joined = {h: torch.cat(v) for h, v in pending.items()}
        chunk = {h: t[:n].to(DTYPES[dtype]) for h, t in joined.items()}
        name = f"{prefix}{len(shards):05d}.safetensors"
        for h, t in chunk.items():
            check_finite(t, f"{h} for cache shard {out_dir / name} (as {dtype})")
        hashed = write_safetensors(out_dir / name, chunk, digest=digest)
        entry = {"file": name, "rows": n, "bytes": (out_dir / name).stat().st_size}
        shards.append(entry if hashed is None else {**entry, digest: hashed})
        for h, t in joined.items():
            pending[h] = [t[n:]] if t.shape[0] > n else []
        pending_rows -= n

    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="cache", disable=not world.is_main)
    start = time.perf_counter()
    for acts in model_activations(model, data, hooks, batch_rows, with_grads=with_grads):
        n = min(next(iter(acts.values())).shape[0], tokens - rows)
        for h, a in acts.items():
            pending[h].append(a[:n].cpu())
        pending_rows += n
        rows += n
        bar.update(n)
        while pending_rows >= shard_rows:
            flush(shard_rows)
        if rows >= tokens:
            break
    if pending_rows:
        flush(pending_rows)
    bar.close()
    from saelab import __version__

    shards = [s for part in world.gather_object(shards) for s in part]
    manifest = Manifest(
        model=model.spec, hooks=dims, dtype=dtype, rows=sum(s["rows"] for s in shards),
        data=asdict(dataclasses.replace(data, rank=0, world=1)), shards=shards,
        saelab_version=__version__, with_grads=with_grads, processing=model.processing,
    )
    if world.is_main:
        write_json(out_dir / MANIFEST, {**asdict(manifest), "seconds": time.perf_counter() - start})
    world.barrier()
    return manifest


def _read_shard(directory: Path, shard: dict, keys: list[str], widths: list[int]) -> torch.Tensor:
    """The tensors `keys` of one shard side by side: (rows, sum(widths)), float32; its hash
    (when the manifest has one), shapes and finiteness checked as it is loaded."""
    path = shard_path(directory, shard["file"])
    expect = (DIGEST, shard[DIGEST]) if DIGEST in shard else None
    tensors, _ = read_safetensors(path, keys, what="cache shard", expect=expect, whole=True)
    for key, width in zip(keys, widths, strict=True):
        t = tensors[key]
        if tuple(t.shape) != (shard["rows"], width):
            raise SaelabError(f"cache shard {path} holds {key} of shape {tuple(t.shape)}, the manifest "
                              f"says ({shard['rows']}, {width}); rebuild the cache")
        check_finite(t, f"cache shard {path} ({key})")
    return torch.cat([tensors[key].float() for key in keys], dim=1)


class CacheStream:
    """Shuffled (B, d) batches of one hook (or a list of hooks) from a cache, resumable.

    Each epoch serves every row of the chosen shards exactly once; the last batch of an
    epoch may be short (or, with `drop_last`, is skipped). Memory holds at most two groups of
    `buffer_shards` shards. With `with_grads`, batches are (x, grad) pairs shuffled together;
    with a list of hooks, dicts {hook: batch} of the same tokens (module docstring: the order).
    """

    def __init__(
        self,
        directory: str | Path,
        hook: str | list[str],
        batch_size: int,
        seed: int = 0,
        buffer_shards: int = 4,
        shards: list[int] | None = None,
        with_grads: bool = False,
        drop_last: bool = False,
    ):
        self.directory = Path(directory)
        self.drop_last = drop_last  # training: skip an epoch's short tail (its FVU is noisy)
        self.manifest = Manifest.read(self.directory)
        self.layout = Layout(hook, with_grads)
        dims = [self.manifest.check_hook(h, self.directory) for h in self.layout.hooks]
        self.widths = [d for d in dims for _ in range(1 + with_grads)]
        if with_grads and not self.manifest.with_grads:
            raise SaelabError(
                f"cache {self.directory} has no gradients; rebuild it with `saelab cache --with-grads`"
            )
        self.batch_size, self.seed = batch_size, seed
        self.buffer_shards = max(1, buffer_shards)
        all_shards = self.manifest.shards
        self.shards = [all_shards[i] for i in (shards if shards is not None else range(len(all_shards)))]
        self.rows = sum(s["rows"] for s in self.shards)
        if self.rows == 0:
            raise SaelabError(f"cache {self.directory} has no rows to stream")
        if drop_last and batch_size > self.rows:  # every epoch would be one dropped short tail
            raise SaelabError(
                f"batch size {batch_size} is larger than the {self.rows} rows of cache "
                f"{self.directory}{' this process reads' if shards is not None else ''}; use a "
                "smaller batch or a bigger cache"
            )
        # a group of shards read (native dtype, float32 copy, joined, permuted) beside the carry
        group = sum(sorted((s["rows"] for s in self.shards), reverse=True)[:self.buffer_shards])
        largest = max(s["rows"] for s in self.shards)
        check_memory([Cost("shard buffer", group * sum(self.widths) * 4 * 4, ("shard_rows",))],
                     {"shard_rows": largest}, f"cache {self.directory}, {self.buffer_shards} shards at once")
        if not self.manifest.hashed:
            warnings.warn(f"cache {self.directory} was built before shard hashes: its shards' contents "
                          "are not checked; rebuild it with `saelab cache` to have them checked",
                          stacklevel=2)
        self.epoch, self.offset = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]

    def _groups(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [order[i : i + self.buffer_shards] for i in range(0, len(order), self.buffer_shards)]

    def _group_rows(self, epoch: int, gi: int, group: list[int]) -> torch.Tensor:
        x = torch.cat([_read_shard(self.directory, self.shards[i], self.layout.keys, self.widths)
                       for i in group])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7919 + gi)
        return x[torch.randperm(x.shape[0], generator=g)]

    def __iter__(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch, from the current position."""
        while True:
            yield from self._epoch_from_offset()
            self.epoch, self.offset = self.epoch + 1, 0

    def _epoch_from_offset(self) -> Iterator[Batch]:
        groups = self._groups(self.epoch)
        sizes = [sum(self.shards[i]["rows"] for i in grp) for grp in groups]
        start, first = 0, 0
        while first < len(groups) and start + sizes[first] <= self.offset:  # consumed groups
            start += sizes[first]
            first += 1
        skip = self.offset - start  # rows of the first group already served
        carry = torch.empty(0, sum(self.widths))
        for gi in range(first, len(groups)):
            rows = torch.cat([carry, self._group_rows(self.epoch, gi, groups[gi])[skip:]])
            skip = 0
            full = rows.shape[0] // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                self.offset += self.batch_size
                yield self.layout.split(rows[b : b + self.batch_size], self.widths)
            carry = rows[full:]
        if carry.shape[0]:
            self.offset += carry.shape[0]
            if not self.drop_last:
                yield self.layout.split(carry, self.widths)
