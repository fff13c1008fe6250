"""Train a zoo model from its recipe and write it as a Hugging Face directory.

Run with `saelab zoo build NAME`. The text is the running interpreter's standard library source
(`builtin:stdlib`, train split), so the build needs no network; the card records the Python
version because a different stdlib gives a (slightly) different model.

The output directory must be new or empty. With `overwrite` it may instead hold a previous zoo
build (`zoo_card.json` and nothing a build does not write), which is replaced as a whole once
the new model is complete; anything else is never replaced. Both are checked before training
starts, and again just before the new model is moved in.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saelab.checks import check_field_types, check_number, doc_field
from saelab.data.tokens import BUILTIN_STDLIB, TokenData
from saelab.errors import SaelabError
from saelab.schedule import lr_factor
from saelab.storage.files import check_output_dir, write_json
from saelab.zoo import MODELS_DIR, RECIPES, ZooRecipe, task_corpus, user_dir

EOT = "<|endoftext|>"
EOT_ID = 256
CARD_FILE = "zoo_card.json"


@dataclass(frozen=True)
class ZooBuildConfig:
    """`saelab zoo build NAME`: where the model goes, whether a previous build there may be
    replaced (`check_out_dir`), and the recipe's training tokens if not its own."""

    out: str | None = doc_field(None, "Output directory, new or empty.", "NAME in the user's zoo "
                                "directory, $SAELAB_ZOO_DIR or ~/.cache/saelab/zoo, where zoo:NAME "
                                "finds it", path=True)
    tokens: int | None = doc_field(None, "Override the recipe's training tokens.", "the recipe's")
    overwrite: bool = doc_field(False, "Replace a previous zoo build at the output directory (only "
                                "that: a directory holding other files is refused).")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_number("tokens", self.tokens, 1)

    def recipe(self, name: str) -> ZooRecipe:
        """The recipe `name`, with `tokens` if given."""
        if name not in RECIPES:
            raise SaelabError(f"unknown zoo recipe {name!r}; available: {', '.join(RECIPES)}")
        recipe = RECIPES[name]
        return recipe if self.tokens is None else dataclasses.replace(recipe, tokens=self.tokens)


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character map of byte-level BPE (GPT-2's convention)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(directory: Path):
    """Write and return a byte-level tokenizer: token id == byte value, 256 == <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    vocab[EOT] = EOT_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    tok.save(str(directory / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token=EOT, eos_token=EOT, pad_token=EOT,
    )
    fast.save_pretrained(str(directory))
    return fast


CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens")  # the tokenizer's files, whatever it writes


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Steps whose model `build` keeps: 0, steps / 2^n, ..., steps / 2, and steps."""
    return sorted({0, steps, *(steps >> i for i in range(1, n + 1))})


def _save_checkpoint(model, built: Path, step: int, tokens_seen: int) -> None:
    """`built/checkpoints/step-N`: a loadable HF directory (weights + the tokenizer's files)."""
    path = built / CHECKPOINTS_DIR / f"step-{step:07d}"
    model.save_pretrained(str(path))
    for f in built.glob("*.json"):
        if f.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy(f, path)
    write_json(path / "checkpoint.json", {"step": step, "tokens_seen": tokens_seen})


@torch.no_grad()
def _heldout_losses(model, rows: torch.Tensor, unigram_logp: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss (nats) of the model and of the unigram baseline on held-out rows."""
    model.eval()
    total, uni, count = 0.0, 0.0, 0
    for chunk in rows.split(32):
        logits = model(chunk).logits[:, :-1].float()
        target = chunk[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        uni += -unigram_logp[target].sum().item()
        count += target.numel()
    model.train()
    return total / count, uni / count


def _is_build_file(name: str) -> bool:
    """Whether `name` is one `build` writes at the top of a model directory."""
    return (name in (CARD_FILE, CHECKPOINTS_DIR, "config.json", "generation_config.json",
                     "model.safetensors") or name.startswith(TOKENIZER_PREFIXES))


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any training, an `out_dir` that `build` could not fill without replacing
    something it did not make: a file, a non-empty directory that is not a zoo build (or holds
    files no build writes), a zoo build without `overwrite`, the package's shipped models, or
    an unwritable place."""
    if out_dir.resolve().is_relative_to(MODELS_DIR.resolve()):
        raise SaelabError(f"{out_dir} is inside saelab's shipped models ({MODELS_DIR}); builds go "
                          "elsewhere (the default is the user's zoo directory)")
    check_output_dir(out_dir, overwrite=True)  # a file, an unwritable place
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return
    if CARD_FILE not in entries:
        raise SaelabError(f"output directory {out_dir} is not empty and is not a zoo build (no "
                          f"{CARD_FILE}; it holds {_some(entries)}); zoo build replaces nothing "
                          "else: pick a new or empty directory")
    foreign = [e for e in entries if not _is_build_file(e)]
    if foreign:
        raise SaelabError(f"the zoo build at {out_dir} also holds files no build writes "
                          f"({_some(foreign)}); move them out or pick a new directory")
    if not overwrite:
        raise SaelabError(f"a zoo model is already built at {out_dir}; pass --overwrite to replace "
                          "it, or --out a new path")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Put the finished build `tmp` at `out_dir`, re-checking `out_dir` (something may have
    appeared there while training): rename onto a missing or empty directory, or swap out
    the previous zoo build and delete it only once the new one is in place."""
    check_out_dir(out_dir, overwrite)
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        _rename(tmp, out_dir, out_dir)  # rename(2) replaces an empty directory, refuses a non-empty one
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    try:
        _rename(out_dir, old, out_dir)  # onto the empty directory just made
    except SaelabError:
        old.rmdir()
        raise
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)


def _rename(src: Path, dst: Path, out_dir: Path) -> None:
    try:
        src.rename(dst)
    except OSError as e:  # something changed at `out_dir` since the check
        raise SaelabError(f"cannot put the finished zoo build at {out_dir} ({e.strerror}); "
                          "nothing there was replaced") from None


def build(recipe: ZooRecipe, out_dir: Path | None = None, heldout_rows: int = 512,
          overwrite: bool = False) -> Path:
    """Train `recipe` and write its directory (default: the user's zoo directory, where
    `zoo:NAME` finds it), atomically: built in a temp dir, then renamed. A previous zoo build
    there is replaced only with `overwrite` (see the module docstring)."""
    out_dir = Path(out_dir) if out_dir is not None else user_dir() / recipe.name
    check_out_dir(out_dir, overwrite)
    from transformers import GPT2Config, GPT2LMHeadModel  # seconds to import: after the check

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        torch.manual_seed(recipe.seed)
        torch.set_flush_denormal(True)  # denormal weights/grads slow CPU training several-fold
        if recipe.corpus == "tasks":
            tokenizer = task_corpus.word_tokenizer(tmp)
            batches = task_corpus.batches(
                tokenizer, recipe.batch_size, recipe.context_length, recipe.seed,
                recipe.stdlib_fraction, recipe.copy_steps, copy_fraction=recipe.copy_fraction,
                gt_all_starts=recipe.gt_all_starts, pack_rows=recipe.pack_rows,
                gt_end_years=recipe.gt_end_years, gt_weight=recipe.gt_weight)
        else:
            tokenizer = byte_tokenizer(tmp)
            batches = TokenData(BUILTIN_STDLIB, "train", recipe.context_length,
                                recipe.seed).batches(tokenizer, recipe.batch_size,
                                                     buffer_rows=recipe.shuffle_rows)
        vocab_size, eot = len(tokenizer), tokenizer.eos_token_id
        config = GPT2Config(  # type: ignore[call-arg]  # n_ctx goes through **kwargs; the stub omits it
            vocab_size=vocab_size, n_positions=recipe.context_length, n_embd=recipe.d_model,
            n_layer=recipe.n_layer, n_head=recipe.n_head, n_inner=recipe.d_mlp,
            n_ctx=recipe.context_length,  # transformer-lens 3.x reads n_ctx, not n_positions
            activation_function="relu", bos_token_id=eot, eos_token_id=eot,
            pad_token_id=eot, tie_word_embeddings=recipe.tie_embeddings,
            initializer_range=recipe.init_std,
            # GPT2Config's default dropout (0.1 on embeddings, residual and attention) costs a
            # model this small and this briefly trained much of what it could learn
            embd_pdrop=recipe.dropout, resid_pdrop=recipe.dropout, attn_pdrop=recipe.dropout,
        )
        model = GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1, betas=(0.9, 0.95))
        steps = recipe.tokens // (recipe.batch_size * recipe.context_length)
        counts = torch.ones(vocab_size, dtype=torch.float64)  # add-one smoothed unigram
        start = time.perf_counter()
        bar = tqdm(total=steps * recipe.batch_size * recipe.context_length, unit="tok",
                   unit_scale=True, desc=f"zoo {recipe.name}")
        keep = checkpoint_steps(steps, recipe.checkpoints) if recipe.checkpoints else []
        for step in range(steps):
            if step in keep:
                _save_checkpoint(model, tmp, step, step * recipe.batch_size * recipe.context_length)
            batch = next(batches)
            counts += torch.bincount(batch[:, 1:].flatten(), minlength=vocab_size)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * lr_factor(step, steps, steps // 20, recipe.decay_fraction)
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(batch.numel())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        if keep:
            _save_checkpoint(model, tmp, steps, steps * recipe.batch_size * recipe.context_length)
        seconds = time.perf_counter() - start
        held = TokenData(BUILTIN_STDLIB, "heldout", recipe.context_length, recipe.seed)
        pairs = zip(held.rows(tokenizer, epochs=1), range(heldout_rows), strict=False)
        rows = torch.stack([r for r, _ in pairs])
        model_loss, unigram_loss = _heldout_losses(model, rows, (counts / counts.sum()).log())
        model.save_pretrained(str(tmp))
        write_json(tmp / CARD_FILE, {
            "name": recipe.name,
            "recipe": dataclasses.asdict(recipe),
            "data": ("synthetic circuit tasks (saelab.zoo.task_corpus) + " if recipe.corpus == "tasks"
                     else "") + f"{BUILTIN_STDLIB} (train split), Python {platform.python_version()}",
            "heldout_tokens": int(rows[:, 1:].numel()),
            "heldout_loss_nats": round(model_loss, 4),
            "unigram_loss_nats": round(unigram_loss, 4),
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
            **({"tasks": task_corpus.task_scores(model.eval(), tokenizer)}
               if recipe.corpus == "tasks" else {}),
        })
        tmp.chmod(0o755)  # mkdtemp and some writers use owner-only modes; this ships as data
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
