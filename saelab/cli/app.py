"""The `saelab` command line: parse flags, call the library, print a summary.

Bad input (a `SaelabError`) prints one line and exits with code 2; nothing on disk is touched.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from saelab.cli.options import field_options, given, with_options
from saelab.errors import SaelabError
from saelab.training.config import TrainConfig
from saelab.zoo import DEFAULT_MODEL

app = typer.Typer(
    help="saelab: train, load and evaluate sparse autoencoders on transformer activations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="Small models saelab trains itself and ships (work offline).",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

Opt = typer.Option


def _print_summary(title: str, rows: dict) -> None:
    width = max(len(k) for k in rows)
    typer.echo(f"\n{title}")
    for k, v in rows.items():
        shown = f"{v:.4g}" if isinstance(v, float) else v
        typer.echo(f"  {k:<{width}}  {shown}")


def train_command(config: Path | None = None, resume: Path | None = None, **flags) -> None:
    """Train an SAE. With no flags: a TopK SAE on the shipped zoo model, offline, in minutes."""
    from saelab.cli.pipeline import train_and_evaluate
    from saelab.distributed import is_main_process
    from saelab.training import resume_config

    values = given(flags)
    if resume is not None:
        if values or config:
            raise SaelabError(f"--resume continues a run with its own config; drop "
                              f"{sorted(values) or ['--config']}")
        result = train_and_evaluate(resume_config(resume), resume=True)
    else:
        result = train_and_evaluate(TrainConfig.from_file_and_flags(str(config) if config else None, values))
    for one in result.values() if is_main_process() else []:  # rank 0 evaluated and prints
        _print_train_summary(one.summary)


app.command("train")(with_options(train_command, [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None, default=Opt(
        None, help="YAML/JSON file of training fields; flags override it.")),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None, default=Opt(
        None, help="Continue the run in this directory from its checkpoint, exactly; its own "
                   "config is used and other flags must be left out.")),
    *field_options(TrainConfig.panels(), TrainConfig.fields_doc()),
]))


def _print_train_summary(s: dict) -> None:
    _print_summary(f"Trained {s['allocator']} SAE -> {s['dictionary']}", {
        "model / hook": f"{s['model']} / {s['hook']}",
        "latents x k": f"{s['n_latents']} x {s['k']} (d_in {s['d_in']})",
        "train tokens": f"{s['train_tokens']:,} in {s['train_seconds']:.1f} s "
                        f"({s['tokens_per_s']:,.0f} tok/s)",
        "held-out FVU": s["heldout_fvu"],
        "explained variance": s["heldout_explained_variance"],
        "L0": s["heldout_l0"],
        "dead latents": f"{s['heldout_dead_frac']:.2%} never active in {s['heldout_tokens']:,} held-out "
                        f"tokens, {s['heldout_rare_frac']:.2%} active on 1-9 of them",
        "dead in training": _training_dead(s),
        "spliced CE": f"{s['heldout_ce_sae']:.4f} vs clean {s['heldout_ce_clean']:.4f} "
                      f"(delta {s['heldout_delta_loss']:+.4f}, CE recovered {s['heldout_ce_loss_recovered']:.3f})",
        "eval report": f"{s['dictionary']}/eval.md (+ eval.json, PNGs)",
        "load it with": f"saelab.load({s['dictionary']!r})",
    })


def _training_dead(s: dict) -> str:
    """The trainer's own dead count (AuxK's window), or why there is none."""
    window = s["train_dead_window"]
    if s["train_dead_frac"] is None:
        return f"n/a (the run was shorter than its {window:,}-token dead window)"
    return f"{s['train_dead_frac']:.2%} not active in the last {window:,} training tokens"


@app.command("cache")
def cache_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write shards and manifest.json into.")],
    model: Annotated[str, Opt(help="Model spec: zoo:NAME, a local HF directory, or hf:NAME on the hub.")] = DEFAULT_MODEL,
    hook: Annotated[list[str] | None, Opt(help="Hook to capture; repeat for several (one forward pass). [default: blocks.{n_layers//2}.hook_resid_post]")] = None,
    processing: Annotated[str, Opt(help="The model's weight processing: folded (LayerNorm folded, writing weights centred), centred (writing weights centred only) or raw (the Hugging Face model's own activations).")] = "folded",
    data: Annotated[str, Opt(help="Token data: builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME.")] = "builtin:stdlib",
    split: Annotated[str, Opt(help="Data split: train or heldout.")] = "train",
    tokens: Annotated[int, Opt(help="Activation rows (token positions) to cache.")] = 1_000_000,
    context_length: Annotated[int | None, Opt(help="Tokens per row, BOS included. [default: min(model context, 128)]")] = None,
    shard_rows: Annotated[int, Opt(help="Rows per shard file.")] = 65536,
    dtype: Annotated[str, Opt(help="Storage dtype: float32, float16 or bfloat16.")] = "float32",
    seed: Annotated[int, Opt(help="Seed for the document order.")] = 0,
    device: Annotated[str, Opt(help="Torch device.")] = "cpu",
    with_grads: Annotated[bool, Opt("--with-grads", help="Also store the gradient of the next-token loss w.r.t. each activation (for gradient_topk).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty directory.")] = False,
) -> None:
    """Cache activations of one or more hooks to disk (safetensors shards + JSON manifest)."""
    from saelab.checks import check_device, check_number
    from saelab.data.cache import DTYPES, build_cache
    from saelab.data.tokens import SPLITS, TokenData
    from saelab.models import check_processing, load_model
    from saelab.storage.files import check_output_dir

    check_processing(processing)
    for name, value, low in (("--tokens", tokens, 1), ("--shard-rows", shard_rows, 1),
                             ("--context-length", context_length, 2), ("--seed", seed, 0)):
        check_number(name, value, low)
    if split not in SPLITS:
        raise SaelabError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if dtype not in DTYPES:
        raise SaelabError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    check_device(device)
    check_output_dir(out, overwrite)
    from saelab.distributed import init

    world = init(device)  # under torchrun: each process caches its own documents and rows
    m = load_model(model, device, processing=processing)
    hooks = hook or [m.default_hook]
    share = tokens // world.size + (world.rank < tokens % world.size)
    data_part = TokenData(data, split, m.check_context(context_length), seed, world.rank, world.size)
    manifest = build_cache(m, data_part, hooks, out, share, shard_rows=shard_rows, dtype=dtype,
                           overwrite=overwrite, with_grads=with_grads, world=world)
    world.close()
    if not world.is_main:
        return
    _print_summary(f"Cached {manifest.rows:,} rows -> {out}", {
        "model": f"{manifest.model} ({manifest.processing})",
        "hooks": ", ".join(f"{h} (d={d})" for h, d in manifest.hooks.items()),
        "shards": len(manifest.shards),
        "dtype": manifest.dtype,
        "gradients": "stored" if manifest.with_grads else "no",
    })


@app.command("eval")
def eval_cmd(
    dictionary: Annotated[Path, typer.Argument(help="A dictionary directory (sae.safetensors + cfg.json).")],
    tokens: Annotated[int | None, Opt(help="Held-out tokens to evaluate on (whole rows until at least this many); also the dead-latent window. [default: the end-of-run eval's window in cfg.json, else 32768]")] = None,
    data: Annotated[str | None, Opt(help="Token data whose held-out split is used: builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME. [default: the data cfg.json says the SAE was trained on]")] = None,
    context_length: Annotated[int | None, Opt(help="Tokens per row. [default: the SAE's training context from cfg.json, else min(model context, 128)]")] = None,
    model: Annotated[str | None, Opt(help="Model spec to evaluate in. [default: the one cfg.json names]")] = None,
    batch_rows: Annotated[int, Opt(help="Rows per forward pass.")] = 32,
    out: Annotated[Path | None, Opt(help="Where to write eval.json, eval.md and the PNGs, a new or empty directory. [default: the dictionary directory, whose report they replace]")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty --out directory.")] = False,
    device: Annotated[str, Opt(help="Torch device.")] = "cpu",
) -> None:
    """Evaluate a dictionary: FVU, L0, dead/dense latents, spliced CE loss, KL; JSON + markdown + PNGs."""
    from saelab.checks import check_device, check_number
    from saelab.evals import evaluate, format_summary, write_report
    from saelab.storage.files import check_output_dir

    for name, value, low in (("--tokens", tokens, 1), ("--batch-rows", batch_rows, 1),
                             ("--context-length", context_length, 2)):
        check_number(name, value, low)
    check_device(device)
    target = out or dictionary
    own = out is None or _same_dir(out, dictionary)  # the dictionary's report is its own to replace
    check_output_dir(target, overwrite or own)
    report = evaluate(str(dictionary), tokens=tokens, model=model, data=data,
                      context_length=context_length, batch_rows=batch_rows, device=device)
    paths = write_report(report, target)
    typer.echo(format_summary(report))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {target}")


def _same_dir(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.samefile(b)


@app.command("export")
def export_cmd(
    dictionary: Annotated[str, typer.Argument(help="A saelab, SAELens or sparsify dictionary directory, or hf:OWNER/NAME[/FOLDER] on the hub.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the exported dictionary into.")],
    format: Annotated[str, Opt("--format", help="saelens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors, TopK only) or saelab.")] = "saelens",
    context_size: Annotated[int | None, Opt(help="SAELens metadata: context size the SAE was trained with.")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty directory.")] = False,
) -> None:
    """Convert a dictionary between saelab's, SAELens's and sparsify's on-disk formats."""
    import saelab
    from saelab.checks import check_number
    from saelab.formats.saelens import export_saelens
    from saelab.formats.sparsify import export_sparsify
    from saelab.storage.files import check_output_dir

    if format not in ("saelens", "sparsify", "saelab"):
        raise SaelabError(f"unknown export format {format!r}; use saelens, sparsify or saelab")
    check_number("--context-size", context_size, 1)
    check_output_dir(out, overwrite)
    sae = saelab.load(dictionary)
    if isinstance(sae, dict):
        raise SaelabError(f"{dictionary} is a run directory of {len(sae)} dictionaries; "
                          "export one hook's subdirectory at a time")
    if format == "saelens":
        export_saelens(sae, out, context_size=context_size, overwrite=overwrite)
    elif format == "sparsify":
        export_sparsify(sae, out, overwrite=overwrite)
    else:
        sae.save(check_output_dir(out, overwrite))
    typer.echo(f"exported {sae.cfg.allocator} dictionary ({sae.cfg.n_latents} x {sae.cfg.d_in}) "
               f"as {format} -> {out}")


@app.command()
def info(
    target: Annotated[str, typer.Argument(help="A dictionary directory, a run directory of them (one per hook), a cache directory, or a model spec (zoo:NAME, a local HF directory, hf:NAME).")],
) -> None:
    """Describe a dictionary, a run directory, an activation cache, or a model (its hook names)."""
    from saelab.data.cache import MANIFEST, Manifest
    from saelab.formats.sparsify import is_run_dir
    from saelab.sae import CONFIG_FILE

    path = Path(target)
    if (path / CONFIG_FILE).exists():
        try:
            typer.echo(json.dumps(json.loads((path / CONFIG_FILE).read_text()), indent=2))
        except json.JSONDecodeError as e:
            raise SaelabError(f"{path / CONFIG_FILE} is not valid JSON ({e})") from None
    elif is_run_dir(path):  # before the model spec: a sparsify run also holds a config.json
        import saelab

        _print_summary(f"Run directory {path}", {
            hook: f"{s.cfg.allocator}, {s.cfg.n_latents} x {s.cfg.d_in}, k={s.cfg.k}"
            for hook, s in saelab.load(path).items()})
    elif (path / MANIFEST).exists():
        m = Manifest.read(path)
        _print_summary(f"Activation cache {path}", {
            "model": m.model, "hooks": json.dumps(m.hooks), "rows": f"{m.rows:,}",
            "shards": len(m.shards), "dtype": m.dtype, "data": json.dumps(m.data),
        })
    else:
        from saelab.models import load_model

        m = load_model(target)
        typer.echo(f"{target}: {m.n_layers} layers, context {m.context_length}, {m.backend}")
        typer.echo("hooks:")
        for name in m.hook_names:
            typer.echo(f"  {name}")


@zoo_app.command("list")
def zoo_list() -> None:
    """Show the installed zoo models (shipped and user-built), where each lives, and how well
    they model held-out text."""
    from saelab import zoo

    shipped = set(zoo.shipped_models())
    for name, path in zoo.installed_models().items():
        c = zoo.card(name)
        r = c.get("recipe", {})
        default = " (default)" if f"zoo:{name}" == DEFAULT_MODEL else ""
        typer.echo(
            f"zoo:{name}{default}  {r.get('n_layer')} layers x {r.get('n_head')} heads, "
            f"d_model {r.get('d_model')}, context {r.get('context_length')}, "
            f"held-out loss {c.get('heldout_loss_nats')} nats/token "
            f"(unigram baseline {c.get('unigram_loss_nats')})  "
            f"[{'shipped' if name in shipped else 'built'}: {path}]"
        )
        for task, t in c.get("tasks", {}).items():
            typer.echo(f"    task {task}: accuracy {t['accuracy']:.1%}, mean logit diff "
                       f"{t['logit_diff']:.2f} (counterfactual {t['counterfactual_logit_diff']:.2f})")
    buildable = sorted(set(zoo.RECIPES) - set(zoo.installed_models()))
    if buildable:
        typer.echo("buildable with `saelab zoo build NAME`: " + ", ".join(buildable))


@zoo_app.command("build")
def zoo_build(
    name: Annotated[str, typer.Argument(help="Recipe name (see `saelab zoo list`).")],
    out: Annotated[Path | None, Opt(help="Output directory, new or empty. [default: NAME in the user's zoo directory, $SAELAB_ZOO_DIR or ~/.cache/saelab/zoo, where zoo:NAME finds it]")] = None,
    tokens: Annotated[int | None, Opt(help="Override the recipe's training tokens.")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a previous zoo build at the output directory (only that: a directory holding other files is refused).")] = False,
) -> None:
    """Train a zoo model from its seeded recipe on the stdlib corpus and write its HF directory."""
    import dataclasses

    from saelab import zoo
    from saelab.checks import check_number
    from saelab.zoo.build import build

    if name not in zoo.RECIPES:
        raise SaelabError(f"unknown zoo recipe {name!r}; available: {', '.join(zoo.RECIPES)}")
    check_number("--tokens", tokens, 1)
    recipe = zoo.RECIPES[name]
    if tokens is not None:
        recipe = dataclasses.replace(recipe, tokens=tokens)
    path = build(recipe, out, overwrite=overwrite)
    typer.echo((path / "zoo_card.json").read_text())


@app.command("sparsity")
def sparsity_cmd(
    model: Annotated[str, Opt(help="Model spec: zoo:NAME, a local HF directory, or a hub name.")] = DEFAULT_MODEL,
    data: Annotated[str, Opt(help="Token data whose held-out split is measured: builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME.")] = "builtin:stdlib",
    tokens: Annotated[int, Opt(help="Held-out tokens to measure on (whole rows until at least this many).")] = 65536,
    threshold: Annotated[float | None, Opt(help="A neuron is active when |h| > this. [default: 0 (exact zeros) for ReLU MLPs, 0.01 for GELU/SiLU]")] = None,
    context_length: Annotated[int | None, Opt(help="Tokens per row. [default: min(model context, 128)]")] = None,
    batch_rows: Annotated[int, Opt(help="Rows per forward pass; union-of-active groups are drawn within one pass.")] = 32,
    mode: Annotated[list[str] | None, Opt(help="Sparsification mode to sweep; repeat for several: relu, threshold, cats, topk, stat_topk. [default: all]")] = None,
    density: Annotated[list[float] | None, Opt(help="Target density in (0, 1] for the sweep; repeat for several. [default: 0.5 0.25 0.1 0.05 0.02]")] = None,
    no_modes: Annotated[bool, Opt("--no-modes", help="Only measure; skip the sparsification sweep.")] = False,
    sweep_tokens: Annotated[int, Opt(help="Held-out tokens per sweep point.")] = 16384,
    calibration_tokens: Annotated[int, Opt(help="Train tokens the threshold and CATS quantiles are calibrated on.")] = 16384,
    no_predictor: Annotated[bool, Opt("--no-predictor", help="Skip training and scoring the low-rank active-set predictor.")] = False,
    predictor_tokens: Annotated[int, Opt(help="Train tokens the active-set predictor is fit on.")] = 16384,
    predictor_rank: Annotated[int | None, Opt(help="Rank of each layer's predictor. [default: d_model // 4]")] = None,
    target_recall: Annotated[float, Opt(help="Share of truly active neurons the predictor's cut keeps, in (0, 1] (set on train tokens).")] = 0.95,
    checkpoints: Annotated[bool, Opt("--checkpoints", help="Also measure the model's training checkpoints (kept by `saelab zoo build` in DIR/checkpoints) and plot density against step.")] = False,
    checkpoint_tokens: Annotated[int, Opt(help="Held-out tokens per checkpoint.")] = 8192,
    out: Annotated[Path, Opt(help="Where to write sparsity.json, sparsity.md and the PNGs.")] = Path("runs/sparsity"),
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty --out directory.")] = False,
    device: Annotated[str, Opt(help="Torch device.")] = "cpu",
) -> None:
    """Measure lazy-neuron MLP activation sparsity per layer (density, dead/always-on neurons, union over batches) and the loss of sparsifying it further."""
    from saelab.checks import check_device, check_number
    from saelab.data.tokens import TokenData
    from saelab.evals.sparsity import format_summary, run, write_report
    from saelab.evals.sparsity.modes import DEFAULT_DENSITIES, MODES
    from saelab.storage.files import check_output_dir

    for name, value in (("--tokens", tokens), ("--batch-rows", batch_rows), ("--sweep-tokens", sweep_tokens),
                        ("--calibration-tokens", calibration_tokens), ("--predictor-tokens", predictor_tokens),
                        ("--predictor-rank", predictor_rank), ("--checkpoint-tokens", checkpoint_tokens)):
        check_number(name, value, 1)
    check_number("--context-length", context_length, 2)
    check_number("--threshold", threshold, 0)
    check_number("--target-recall", target_recall, 0, 1, strict_minimum=True)
    for d in density or ():
        check_number("--density", d, 0, 1, strict_minimum=True)
    check_device(device)
    check_output_dir(out, overwrite)
    data_arg = TokenData(data, "heldout", context_length) if context_length else data
    report = run(model, data=data_arg, tokens=tokens, threshold=threshold, batch_rows=batch_rows,
                 modes=() if no_modes else tuple(mode or MODES),
                 densities=tuple(density or DEFAULT_DENSITIES), sweep_tokens=sweep_tokens,
                 calibration_tokens=calibration_tokens, predictor=not no_predictor,
                 predictor_tokens=predictor_tokens, predictor_rank=predictor_rank,
                 target_recall=target_recall, checkpoints=checkpoints,
                 checkpoint_tokens=checkpoint_tokens, device=device)
    paths = write_report(report, out)
    typer.echo(format_summary(report))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {out}")


@app.command()
def browse(
    dictionary: Annotated[Path, typer.Argument(help="A dictionary directory, or a run directory with one dictionary per hook (one site, a section per hook).")],
    tokens: Annotated[int, Opt(help="Held-out tokens to gather contexts from (whole rows until at least this many).")] = 262_144,
    latents: Annotated[str | None, Opt(help="Latents to include, e.g. 0-99,512. [default: all]")] = None,
    out: Annotated[Path | None, Opt(help="Output directory for the site. [default: DICTIONARY/browse]")] = None,
    data: Annotated[str | None, Opt(help="Token data whose held-out split is read: builtin:stdlib, a .txt/.jsonl file or directory, or hf:NAME. [default: the dictionary's training data]")] = None,
    model: Annotated[str | None, Opt(help="Model spec. [default: the one cfg.json names]")] = None,
    top_k: Annotated[int, Opt(help="Top-activating contexts per latent.")] = 12,
    samples: Annotated[int, Opt(help="Sampled activations per latent, shown split at their quantiles.")] = 16,
    batch_rows: Annotated[int, Opt(help="Rows per forward pass.")] = 32,
    device: Annotated[str, Opt(help="Torch device.")] = "cpu",
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty --out directory.")] = False,
) -> None:
    """Build a static feature browser (open index.html from disk): per latent its density, histogram, top and sampled contexts, next-token effects and nearest latents."""
    from saelab.browse import StatsConfig, build_site
    from saelab.checks import check_device, check_number

    for name, value in (("--tokens", tokens), ("--top-k", top_k), ("--samples", samples),
                        ("--batch-rows", batch_rows)):
        check_number(name, value, 1)
    check_device(device)
    s = build_site(dictionary, out or dictionary / "browse", tokens=tokens, latents=latents, data=data,
                   model=model, cfg=StatsConfig(top_k=top_k, samples=samples), batch_rows=batch_rows,
                   device=device, overwrite=overwrite)
    _print_summary(f"Feature browser -> {s['site']}", {
        "dictionaries": ", ".join(s["dictionaries"]),
        "tokens": f"{s['tokens']:,} in {s['pass_seconds']:.1f} s ({s['tokens_per_s']:,} tok/s)",
        "latent pages": f"{s['pages']:,}",
        "open": f"file://{Path(s['site']).resolve()}",
    })




@app.command()
def circuits(
    model: Annotated[str, Opt(help="Model spec: zoo:NAME, a local HF directory, or a hub name.")] = "zoo:tasks-4l",
    task: Annotated[str, Opt(help="Task: ioi, greater-than, docstring or induction (ignored with --task-file).")] = "ioi",
    task_file: Annotated[Path | None, Opt(help='Your own task: JSONL, one {"prompt", "counterfactual", "answer", "wrong"} object a line.')] = None,
    train_prompts: Annotated[int, Opt(help="Prompts (each with its counterfactual) the shared SAE trains on per trial.")] = 10,
    prompts: Annotated[int, Opt(help="Held-out prompts (each with its counterfactual) scored per trial, disjoint from the training prompts.")] = 100,
    trials: Annotated[int, Opt(help="Independent trials (fresh prompts and SAE seed); AUCs are reported as mean +- std.")] = 10,
    sae: Annotated[str, Opt(help="Shared SAE: relu (L1, as O'Neill & Bui) or topk (k=1, the argmax code).")] = "relu",
    position: Annotated[str, Opt(help="Head outputs at the prompt's last position (last, where the metric is read) or averaged over it (mean, as O'Neill & Bui).")] = "last",
    n_latents: Annotated[int, Opt(help="Latents of the shared SAE.")] = 200,
    l1: Annotated[float, Opt(help="L1 coefficient of the relu SAE.")] = 0.02,
    epochs: Annotated[int, Opt(help="Full-batch Adam steps of the SAE.")] = 500,
    truth_prompts: Annotated[int, Opt(help="Prompts patched for the ground truth (generated tasks).")] = 64,
    ablation: Annotated[str, Opt(help="Ground truth by counterfactual patching or mean ablation.")] = "counterfactual",
    no_edges: Annotated[bool, Opt("--no-edges", help="Skip edge path patching and edge scores.")] = False,
    out: Annotated[Path, Opt(help="Directory for circuits.json, circuits.md and the PNGs.")] = Path("runs/circuits"),
    overwrite: Annotated[bool, Opt("--overwrite", help="Allow writing into a non-empty --out directory.")] = False,
    seed: Annotated[int, Opt(help="Seed of prompts and SAEs.")] = 0,
    device: Annotated[str, Opt(help="Torch device.")] = "cpu",
) -> None:
    """Find a task's circuit from SAE codes of per-head outputs and score it against patching."""
    from saelab.checks import check_device, check_number
    from saelab.evals.circuits import DiscoverConfig, discover, format_summary, write_report
    from saelab.storage.files import check_output_dir

    for name, value in (("--train-prompts", train_prompts), ("--prompts", prompts), ("--trials", trials),
                        ("--n-latents", n_latents), ("--epochs", epochs), ("--truth-prompts", truth_prompts)):
        check_number(name, value, 1)
    check_number("--l1", l1, 0)
    check_number("--seed", seed, 0)
    check_device(device)
    cfg = DiscoverConfig(train_prompts=train_prompts, prompts=prompts, trials=trials, sae=sae,
                         position=position, n_latents=n_latents, l1=l1, epochs=epochs, truth_prompts=truth_prompts,
                         edges=not no_edges, ablation=ablation, seed=seed)
    check_output_dir(out, overwrite)
    result = discover(model, task, task_file=str(task_file) if task_file else None, config=cfg,
                      device=device)
    paths = write_report(result, out)
    typer.echo(format_summary(result))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {out}")


def _check_environment() -> None:
    """Settings read from the environment fail here, as one line, not deep inside a run."""
    from saelab.kernels import backend

    try:
        backend.requested()
    except ValueError as e:
        raise SaelabError(str(e)) from None


def _usage_line(e: Exception) -> str:
    """Click's usage error as one line, naming the command so `--help` is easy to find."""
    ctx = getattr(e, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(e.format_message().split()) + where


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors too)."""
    try:
        from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer >= 0.26 vendors click
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError
    try:
        _check_environment()
        code = app(args=args, prog_name="saelab", standalone_mode=False)
    except NoArgsIsHelpError as e:  # a bare `saelab` or group: the help text, as before
        typer.echo(e.format_message(), err=True)
        sys.exit(2)
    except UsageError as e:
        typer.echo(f"saelab: error: {_usage_line(e)}", err=True)
        sys.exit(2)
    except SaelabError as e:
        typer.echo(f"saelab: error: {e}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
