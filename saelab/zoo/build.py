"""Train a zoo model from its recipe and write it as a Hugging Face directory.

Run with `saelab zoo build NAME`. The text is the running interpreter's standard library source
(`builtin:stdlib`, train split), so the build needs no network; the card records the Python
version because a different stdlib gives a (slightly) different model.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from saelab.data import BUILTIN_STDLIB, TokenData
from saelab.io import write_json
from saelab.schedule import lr_factor
from saelab.zoo import ZooRecipe, user_dir
from saelab.zoo import tasks as task_corpus

EOT = "<|endoftext|>"
EOT_ID = 256


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


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Steps whose model `build` keeps: 0, steps / 2^n, ..., steps / 2, and steps."""
    return sorted({0, steps, *(steps >> i for i in range(1, n + 1))})


def _save_checkpoint(model, built: Path, step: int, tokens_seen: int) -> None:
    """`built/checkpoints/step-N`: a loadable HF directory (weights + the tokenizer's files)."""
    path = built / CHECKPOINTS_DIR / f"step-{step:07d}"
    model.save_pretrained(str(path))
    for f in built.glob("*.json"):
        if f.name.startswith(("tokenizer", "special_tokens")):
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


def build(recipe: ZooRecipe, out_dir: Path | None = None, heldout_rows: int = 512) -> Path:
    """Train `recipe` and write its directory (default: the user's zoo directory, where
    `zoo:NAME` finds it), atomically: built in a temp dir, then renamed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir) if out_dir is not None else user_dir() / recipe.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        torch.manual_seed(recipe.seed)
        torch.set_flush_denormal(True)  # denormal weights/grads slow CPU training several-fold
        if recipe.corpus == "tasks":
            tokenizer = task_corpus.word_tokenizer(tmp)
            batches = task_corpus.batches(tokenizer, recipe.batch_size, recipe.context_length,
                                          recipe.seed, recipe.stdlib_fraction, recipe.copy_steps)
        else:
            tokenizer = byte_tokenizer(tmp)
            batches = TokenData(BUILTIN_STDLIB, "train", recipe.context_length,
                                recipe.seed).batches(tokenizer, recipe.batch_size,
                                                     buffer_rows=recipe.shuffle_rows)
        vocab_size, eot = len(tokenizer), tokenizer.eos_token_id
        config = GPT2Config(
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
        write_json(tmp / "zoo_card.json", {
            "name": recipe.name,
            "recipe": dataclasses.asdict(recipe),
            "data": ("synthetic circuit tasks (saelab.zoo.tasks) + " if recipe.corpus == "tasks"
                     else "") + f"{BUILTIN_STDLIB} (train split), Python {platform.python_version()}",
            "heldout_tokens": int(rows[:, 1:].numel()),
            "heldout_loss_nats": round(model_loss, 4),
            "unigram_loss_nats": round(unigram_loss, 4),
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
            **({"tasks": task_corpus.task_scores(model.eval(), tokenizer)}
               if recipe.corpus == "tasks" else {}),
        })
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)  # mkdtemp and some writers use owner-only modes; this ships as data
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
