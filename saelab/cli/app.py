"""The `saelab` command line: parse flags, call the library, print a summary.

Bad input (a `SaelabError`) prints one line and exits with code 2; nothing on disk is touched.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path

import typer

from saelab.browse.site import BrowseConfig
from saelab.cli.options import argument, config_fields, field_options, from_flags, given, with_options
from saelab.data.cache import CacheConfig
from saelab.errors import SaelabError, SaelabWarning
from saelab.evals.circuits.discover import CircuitsConfig
from saelab.evals.evaluate import EvalConfig
from saelab.evals.sparsity.run import SparsityCommandConfig
from saelab.formats.export import ExportConfig
from saelab.training.config import TrainConfig
from saelab.zoo import DEFAULT_MODEL
from saelab.zoo.build import ZooBuildConfig

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer: click itself; same classes, another module
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]

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
    *field_options(TrainConfig.panels()),
]))


def _print_train_summary(s: dict) -> None:
    target = s.get("target_hook")
    kind = "SAE" if target is None else "skip transcoder" if s.get("skip") else "transcoder"
    _print_summary(f"Trained {s['allocator']} {kind} -> {s['dictionary']}", {
        "model / hook": f"{s['model']} / {s['hook']}" + (f" -> {target}" if target else ""),
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


def cache_cmd(out: Path, **flags) -> None:
    """Cache activations of one or more hooks to disk (safetensors shards + JSON manifest)."""
    from saelab.data.cache import build_cache
    from saelab.data.tokens import TokenData
    from saelab.models import load_model
    from saelab.storage.files import check_output_dir

    cfg = from_flags(CacheConfig, flags)
    check_output_dir(out, cfg.overwrite)
    from saelab.distributed import init

    world = init(cfg.device)  # under torchrun: each process caches its own documents and rows
    m = load_model(cfg.model, cfg.device, processing=cfg.processing)
    hooks = list(cfg.hooks) or [m.default_hook]
    share = cfg.tokens // world.size + (world.rank < cfg.tokens % world.size)
    data_part = TokenData(cfg.data, cfg.split, m.check_context(cfg.context_length), cfg.seed, world.rank,
                          world.size)
    manifest = build_cache(m, data_part, hooks, out, share, shard_rows=cfg.shard_rows, dtype=cfg.dtype,
                           overwrite=cfg.overwrite, with_grads=cfg.with_grads, world=world)
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


app.command("cache")(with_options(cache_cmd, [
    argument("out", Path, "Directory to write shards and manifest.json into."),
    *field_options(config_fields(CacheConfig)),
]))


def eval_cmd(dictionary: Path, **flags) -> None:
    """Evaluate a dictionary: FVU, L0, dead/dense latents, spliced CE loss, KL; JSON + markdown + PNGs
    (with --probes, also sparse probing and absorption on exact Python labels)."""
    from saelab.evals import evaluate, format_summary, write_report
    from saelab.storage.files import check_output_dir

    cfg = from_flags(EvalConfig, flags)
    target = Path(cfg.out) if cfg.out else dictionary
    own = cfg.out is None or _same_dir(target, dictionary)  # the dictionary's report is its own to replace
    check_output_dir(target, cfg.overwrite or own)
    probed = _probes(dictionary, cfg) if cfg.probes else None  # first: data that is not Python fails before the eval's pass
    circuit_sae = _circuit_dictionary(dictionary, cfg) if cfg.task is not None else None  # likewise
    report = evaluate(str(dictionary), **cfg.settings())
    paths = write_report(report, target)  # on disk before the circuit part can fail
    if probed is not None:
        from saelab.evals.probes import format_probes_summary, write_probes_report

        paths += write_probes_report(probed, target)
    if circuit_sae is not None:
        report["circuit"] = _dictionary_circuit(circuit_sae, report, cfg)
        write_report(report, target)
    typer.echo(format_summary(report))
    if probed is not None:
        typer.echo(format_probes_summary(probed))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {target}")


def _probes(dictionary: Path, cfg: EvalConfig) -> dict:
    from saelab.evals.probes import probes

    settings = {k: v for k, v in cfg.settings().items() if k != "tokens"}
    return probes(str(dictionary), tokens=cfg.probe_tokens, labels=cfg.probe_labels, **settings)


def _circuit_dictionary(dictionary: Path, cfg: EvalConfig):
    """The dictionary `saelab eval --task` builds circuits of, refused in one line (a run
    directory, a transcoder) before the eval's pass."""
    from saelab.evals.circuits.bases import check_not_transcoder
    from saelab.formats import load_one

    sae = load_one(dictionary, cfg.device)
    check_not_transcoder(sae.cfg.hook, sae)
    return sae


def _dictionary_circuit(sae, report: dict, cfg: EvalConfig) -> dict:
    """`saelab eval --task`: the dictionary's circuit faithfulness in the model it was evaluated in."""
    from saelab.evals.circuits.recovery import dictionary_circuit
    from saelab.models import load_model

    model = load_model(report["model"], cfg.device, processing=report["processing"])
    assert cfg.task is not None
    return dictionary_circuit(model, sae, cfg.task)


app.command("eval")(with_options(eval_cmd, [
    argument("dictionary", Path, "A dictionary directory (sae.safetensors + cfg.json)."),
    *field_options(config_fields(EvalConfig)),
]))


def _same_dir(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.samefile(b)


def export_cmd(dictionary: str, out: Path, **flags) -> None:
    """Convert a dictionary between saelab's, SAELens's and sparsify's on-disk formats."""
    from saelab.formats.export import export

    cfg = from_flags(ExportConfig, flags)
    sae = export(dictionary, out, cfg)
    typer.echo(f"exported {sae.cfg.allocator} dictionary ({sae.cfg.n_latents} x {sae.cfg.d_in}) "
               f"as {cfg.format} -> {out}")


app.command("export")(with_options(export_cmd, [
    argument("dictionary", str, "A saelab, SAELens or sparsify dictionary directory, or "
                                "hf:OWNER/NAME (or hf:OWNER/NAME/FOLDER) on the hub."),
    argument("out", Path, "Directory to write the exported dictionary into."),
    *field_options(config_fields(ExportConfig)),
]))


def info(target: str) -> None:
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
        from saelab.formats.sparsify import load_run

        _print_summary(f"Run directory {path}", {
            hook: f"{s.cfg.allocator}, {s.cfg.n_latents} x {s.cfg.d_in}, k={s.cfg.k}"
            for hook, s in load_run(path).items()})
    elif (path / MANIFEST).exists():
        cache = Manifest.read(path)
        _print_summary(f"Activation cache {path}", {
            "model": cache.model, "hooks": json.dumps(cache.hooks), "rows": f"{cache.rows:,}",
            "shards": len(cache.shards), "dtype": cache.dtype, "data": json.dumps(cache.data),
        })
    else:
        from saelab.models import load_model

        model = load_model(target)
        typer.echo(f"{target}: {model.n_layers} layers, context {model.context_length}, {model.backend}")
        typer.echo("hooks:")
        for name in model.hook_names:
            typer.echo(f"  {name}")


app.command()(with_options(info, [
    argument("target", str, "A dictionary directory, a run directory of them (one per hook), a cache "
                            "directory, or a model spec (zoo:NAME, a local HF directory, hf:NAME)."),
]))


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


def zoo_build(name: str, **flags) -> None:
    """Train a zoo model from its seeded recipe on the stdlib corpus and write its HF directory."""
    from saelab.zoo.build import build

    cfg = from_flags(ZooBuildConfig, flags)
    path = build(cfg.recipe(name), cfg.out, overwrite=cfg.overwrite)
    typer.echo((path / "zoo_card.json").read_text())


zoo_app.command("build")(with_options(zoo_build, [
    argument("name", str, "Recipe name (see `saelab zoo list`)."),
    *field_options(config_fields(ZooBuildConfig)),
]))


def sparsity_cmd(no_modes: bool = False, **flags) -> None:
    """Measure lazy-neuron MLP activation sparsity per layer (density, dead/always-on neurons, union over batches) and the loss of sparsifying it further."""
    from saelab.evals.sparsity import format_summary, run, write_report
    from saelab.storage.files import check_output_dir

    cfg = from_flags(SparsityCommandConfig, {**flags, **({"modes": ()} if no_modes else {})})
    check_output_dir(Path(cfg.out), cfg.overwrite)
    report = run(cfg.model, data=cfg.token_data(), config=cfg.sparsity, device=cfg.device)
    paths = write_report(report, cfg.out)
    typer.echo(format_summary(report))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {cfg.out}")


app.command("sparsity")(with_options(sparsity_cmd, [
    *field_options(config_fields(SparsityCommandConfig)),
    inspect.Parameter("no_modes", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=Opt(
        False, "--no-modes", help="Only measure: skip the sparsification sweep, whatever --mode says. (default: false)",
        rich_help_panel="Measurement")),
]))


def browse(dictionary: Path, **flags) -> None:
    """Build a static feature browser (open index.html from disk): per latent its density, histogram, top and sampled contexts, next-token effects and nearest latents."""
    from saelab.browse import build_site

    cfg = from_flags(BrowseConfig, flags)
    s = build_site(dictionary, cfg.out_dir(dictionary), **cfg.settings())
    _print_summary(f"Feature browser -> {s['site']}", {
        "dictionaries": ", ".join(s["dictionaries"]),
        "tokens": f"{s['tokens']:,} in {s['pass_seconds']:.1f} s ({s['tokens_per_s']:,} tok/s)",
        "latent pages": f"{s['pages']:,}",
        "open": f"file://{Path(s['site']).resolve()}",
    })


app.command()(with_options(browse, [
    argument("dictionary", Path, "A dictionary directory, or a run directory with one dictionary "
                                 "per hook (one site, a section per hook)."),
    *field_options(config_fields(BrowseConfig)),
]))


def circuits(**flags) -> None:
    """Find a task's circuit (SAE codes of per-head outputs, or with --method exact patching, EAP
    or EAP-IG on heads, neurons or a dictionary) and score it against patching."""
    from saelab.evals.circuits import discover, format_summary, write_report
    from saelab.storage.files import check_output_dir

    cfg = from_flags(CircuitsConfig, flags)
    check_output_dir(Path(cfg.out), cfg.overwrite)
    if cfg.method != "codes":
        _attribution_circuits(cfg)
        return
    result = discover(cfg.model, cfg.task, task_file=cfg.task_file, config=cfg.discover, device=cfg.device)
    paths = write_report(result, cfg.out)
    typer.echo(format_summary(result))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {cfg.out}")


def _attribution_circuits(cfg: CircuitsConfig) -> None:
    """`saelab circuits --method patching|eap|eap-ig`: scores, agreement, faithfulness."""
    import dataclasses

    from saelab.evals.circuits.recovery import recover
    from saelab.evals.circuits.recovery_report import format_summary, write_report
    from saelab.models import load_model
    from saelab.tasks import load_task_file

    task = load_task_file(cfg.task_file) if cfg.task_file else cfg.task
    attr = cfg.attribution
    if attr.attr_metric is None and cfg.discover.metric is not None:  # --metric serves both
        attr = dataclasses.replace(attr, attr_metric=cfg.discover.metric)
    report = recover(load_model(cfg.model, cfg.device), task, cfg.basis, cfg.method, attr)
    paths = write_report(report, cfg.out)
    typer.echo(format_summary(report))
    typer.echo(f"wrote {', '.join(p.name for p in paths)} -> {cfg.out}")


app.command()(with_options(circuits, field_options(config_fields(CircuitsConfig))))


def _check_environment() -> None:
    """Settings read from the environment fail here, as one line, not deep inside a run."""
    from saelab.kernels import backend

    try:
        backend.requested()
    except ValueError as e:
        raise SaelabError(str(e)) from None


def _usage_line(e: UsageError) -> str:
    """Click's usage error as one line, naming the command so `--help` is easy to find."""
    ctx = getattr(e, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(e.format_message().split()) + where


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A SaelabWarning as one line on stderr; other libraries' warnings as Python shows them."""
    if issubclass(category, SaelabWarning):
        typer.echo(f"saelab: warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors too);
    saelab's warnings are one line too."""
    warnings.showwarning = _show_warning
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
