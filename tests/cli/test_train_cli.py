"""`saelab train` is generated from TrainConfig: every field has a flag (booleans --x/--no-x),
its help shows the field's documentation and default, and flags override a config file."""

import dataclasses

import pytest
import typer

import saelab.cli.pipeline
from saelab.cli.app import app, main
from saelab.errors import SaelabError
from saelab.training import TrainConfig
from saelab.training.config import GROUPS


def _train_options() -> dict[str, object]:
    cmd = typer.main.get_command(app).commands["train"]
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_field_has_a_flag_with_its_doc():
    options = _train_options()
    for _, f in TrainConfig.fields().values():
        flag = "--" + f.name.replace("_", "-")
        assert flag in options, flag
        assert f.metadata["doc"] in options[flag].help, flag
        if f.type == "bool":
            assert "--no-" + flag[2:] in options, flag
    assert {"--adam-eps", "--ema-decay", "--log-every", "--config", "--resume"} <= set(options)
    assert "(default: 6.25e-10)" in options["--adam-eps"].help
    assert "(default: expansion * d_in)" in options["--n-latents"].help


@pytest.fixture
def captured(monkeypatch):
    """The config `saelab train` would run, captured instead of training."""
    seen = []
    monkeypatch.setattr(saelab.cli.pipeline, "train_and_evaluate",
                        lambda cfg, resume=False: seen.append(cfg) or {})
    return seen


def test_flags_override_a_config_file_and_no_flags_switch_off(captured, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("overwrite: true\nwandb: true\nk: 16\nadam_eps: 1e-8\nlog_every: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(f), "--no-overwrite", "--no-wandb", "--ema-decay", "0.5",
              "--hook", "a", "--hook", "b", "--out", "x/"])
    assert e.value.code == 0
    (cfg,) = captured
    assert (cfg.run.overwrite, cfg.run.wandb, cfg.sae.k, cfg.optim.adam_eps, cfg.run.log_every,
            cfg.optim.ema_decay) == (False, False, 16, 1e-8, 3, 0.5)
    assert cfg.source.hook == ["a", "b"] and cfg.run.out == "x"  # paths read as paths, as before


def test_no_flags_give_the_dataclass_defaults(captured):
    with pytest.raises(SystemExit):
        main(["train", "--hook", "one", "--wandb"])
    (cfg,) = captured
    assert cfg == TrainConfig.of(hook="one", wandb=True)


def test_groups_hold_every_field_once_and_flat_names_round_trip(tmp_path):
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(TrainConfig.fields())  # flat names are unique
    cfg = TrainConfig.of(k=8, lr=1e-3, out="runs/x", hook=["a", "b"])
    assert (cfg.sae.k, cfg.optim.lr, cfg.run.out, cfg.source.hook) == (8, 1e-3, "runs/x", ["a", "b"])
    assert TrainConfig.of(**cfg.flat()) == cfg
    assert cfg.replace(seed=3).run.seed == 3 and cfg.replace(seed=3).sae == cfg.sae
    grouped = tmp_path / "g.yaml"  # a config file may be grouped as the dataclasses are
    grouped.write_text("sae:\n  k: 8\n  allocator: relu\noptim:\n  lr: 1e-3\nout: runs/x\n")
    assert TrainConfig.from_file_and_flags(str(grouped), {"hook": ["a", "b"]}) == cfg.replace(
        allocator="relu")
    with pytest.raises(SaelabError, match="TrainConfig.sae must be a DictionaryConfig"):
        TrainConfig(sae={"k": 8})
