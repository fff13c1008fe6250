"""`saelab train` is generated from TrainConfig: every field has a flag (booleans --x/--no-x),
its help shows the field's documentation and default, and flags override a config file."""

import dataclasses

import pytest
import typer

import saelab.pipeline
from saelab.cli import app, main
from saelab.training import TrainConfig


def _train_options() -> dict[str, object]:
    cmd = typer.main.get_command(app).commands["train"]
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_field_has_a_flag_with_its_doc():
    options = _train_options()
    for f in dataclasses.fields(TrainConfig):
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
    monkeypatch.setattr(saelab.pipeline, "train", lambda cfg, resume=False: seen.append(cfg) or {})
    return seen


def test_flags_override_a_config_file_and_no_flags_switch_off(captured, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("overwrite: true\nwandb: true\nk: 16\nadam_eps: 1e-8\nlog_every: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(f), "--no-overwrite", "--no-wandb", "--ema-decay", "0.5",
              "--hook", "a", "--hook", "b", "--out", "x/"])
    assert e.value.code == 0
    (cfg,) = captured
    assert (cfg.overwrite, cfg.wandb, cfg.k, cfg.adam_eps, cfg.log_every, cfg.ema_decay) == (
        False, False, 16, 1e-8, 3, 0.5)
    assert cfg.hook == ["a", "b"] and cfg.out == "x"  # paths read as paths, as before


def test_no_flags_give_the_dataclass_defaults(captured):
    with pytest.raises(SystemExit):
        main(["train", "--hook", "one", "--wandb"])
    (cfg,) = captured
    assert cfg == TrainConfig(hook="one", wandb=True)
