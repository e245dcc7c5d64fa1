"""The trainer's single sources of truth: FinetuneConfig for the CLI's defaults and choices,
CheckpointPaths for a checkpoint's folder and file names."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nybble import cli
from nybble.train import config as C

#: `nybble finetune` parameters that are not FinetuneConfig fields of the same name.
CLI_TO_FIELD = {"output": "output_dir", "rank": "r"}
#: Parameters with no FinetuneConfig counterpart (or none with a default).
CLI_ONLY = {"model_dir", "data", "output", "example"}
CHOICES = {"quant": C.QUANT_METHODS, "optim": C.OPTIMIZERS, "schedule": C.SCHEDULES, "dtype": C.DTYPES}


def _params():
    return {p.name: p for p in cli.finetune.params}


def test_cli_defaults_are_finetune_configs():
    defaults = C.config_defaults()
    fields = {f.name for f in dataclasses.fields(C.FinetuneConfig)}
    checked = set()
    for name, param in _params().items():
        field = CLI_TO_FIELD.get(name, name)
        if name in CLI_ONLY:
            continue
        assert field in fields, f"--{name} sets no FinetuneConfig field"
        if name == "target_modules":  # repeatable; none given means FinetuneConfig's "all-linear"
            assert param.multiple
        elif field in cli._EXAMPLE_DEFAULTS:  # None: FinetuneConfig's default, or the example's
            assert param.default is None, name
            assert field in cli._FINETUNE_DEFAULTS and cli._FINETUNE_DEFAULTS[field] == defaults[field]
        else:
            assert param.default == defaults[field] and type(param.default) is type(defaults[field]), name
        checked.add(field)
    # every setting with a default that the command line offers is checked above
    assert checked >= {"quant", "optim", "lr", "schedule", "dtype", "seed", "log_every", "progress", "r"}


def test_cli_choices_are_the_trainers():
    from nybble.train import trainer

    params = _params()
    choice_params = {n for n, p in params.items() if isinstance(p.type, click.Choice)}
    assert choice_params == set(CHOICES)
    for name, allowed in CHOICES.items():
        assert tuple(params[name].type.choices) == allowed, name
        assert C.config_defaults()[name] in allowed, name
    # the trainer validates against the same tuples the CLI offers
    assert trainer.OPTIMIZERS is C.OPTIMIZERS and trainer.SCHEDULES is C.SCHEDULES
    assert trainer.QUANT_METHODS is C.QUANT_METHODS and trainer.DTYPES is C.DTYPES
    assert trainer.FinetuneConfig is C.FinetuneConfig


def test_cli_without_options_builds_the_default_config(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import nybble.train

    seen = []
    monkeypatch.setattr(nybble.train, "finetune", lambda cfg, log=print: seen.append(cfg))
    r = CliRunner().invoke(cli.main, ["finetune", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 0, r.output
    expected = C.FinetuneConfig(model_dir=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"),
                                output_dir=cli.DEFAULT_FINETUNE_OUTPUT)
    assert seen == [expected]


def test_cli_help_states_the_configs_defaults():
    text = CliRunner().invoke(cli.main, ["finetune", "--help"], terminal_width=200).output
    d = C.config_defaults()
    assert f"LoRA rank [default: {d['r']}; example {cli._EXAMPLE_DEFAULTS['r']}]" in text
    assert cli._shown(2e-4) == "2e-4" and cli._shown(16.0) == "16" and cli._shown(0.05) == "0.05"


def test_cli_does_not_import_torch():
    code = "import sys, nybble.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------- checkpoint paths


def test_checkpoint_paths_name_every_file(tmp_path):
    pytest.importorskip("torch")
    from nybble.train.trainer import CheckpointPaths

    p = CheckpointPaths.at_step(tmp_path, 3)
    assert p.folder == tmp_path / "checkpoint-000003"
    assert p.adapter == p.folder
    assert p.optimizer == p.folder / "optimizer.pt"
    assert p.rng(0) == p.folder / "rng_rank0.pt" and p.rng(7) == p.folder / "rng_rank7.pt"
    assert p.trainer_state == p.folder / "trainer_state.json"
    assert p.trainer_state_tmp.parent == p.folder
    assert CheckpointPaths.step_of(p.folder) == 3
    assert CheckpointPaths.step_of(tmp_path / "checkpoint-1234567") == 1234567
    assert CheckpointPaths.step_of(tmp_path / "checkpoint-x") is None
    assert CheckpointPaths.step_of(tmp_path / "example_train.jsonl") is None
    assert not p.is_complete()
    p.folder.mkdir()
    p.trainer_state.write_text("{}")
    assert p.is_complete()


def test_latest_and_find_checkpoint(tmp_path):
    pytest.importorskip("torch")
    from nybble.train.trainer import CheckpointPaths, find_checkpoint, latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 4):
        p = CheckpointPaths.at_step(tmp_path, step)
        p.folder.mkdir()
        p.trainer_state.write_text("{}")
    CheckpointPaths.at_step(tmp_path, 12).folder.mkdir()  # an interrupted save: no trainer_state.json
    (tmp_path / "checkpoint-000099").write_text("")  # a file, not a folder
    (tmp_path / "checkpoint-latest").mkdir()
    assert latest_checkpoint(tmp_path) == CheckpointPaths.at_step(tmp_path, 10).folder
    for word in ("latest", "auto", ""):
        assert find_checkpoint(word, tmp_path) == CheckpointPaths.at_step(tmp_path, 10).folder
    assert find_checkpoint(str(tmp_path / "checkpoint-000002"), tmp_path) == tmp_path / "checkpoint-000002"
    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* folder in"):
        find_checkpoint("latest", tmp_path / "empty")


def test_save_checkpoint_writes_what_checkpoint_paths_names(tmp_path):
    torch = pytest.importorskip("torch")
    import nybble
    from nybble.train.trainer import CheckpointPaths, latest_checkpoint, make_optimizer, make_schedule, save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    nybble.quantize_model(model, skip_modules=())
    nybble.add_lora(model, r=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw_32bit", 1e-3)
    sched = make_schedule(opt, "constant", 10, 0.0)
    cfg = C.FinetuneConfig(model_dir="m", data="d", output_dir=str(tmp_path))
    paths = CheckpointPaths.at_step(tmp_path, 5)
    save_checkpoint(paths.folder, model, opt, sched, 5, cfg, rank=0, world=1)
    names = {p.name for p in paths.folder.iterdir()}
    assert {paths.optimizer.name, paths.rng(0).name, paths.trainer_state.name} <= names
    assert paths.trainer_state_tmp.name not in names
    assert any(n.startswith("adapter_") for n in names)
    assert json.loads(paths.trainer_state.read_text())["step"] == 5
    assert latest_checkpoint(tmp_path) == paths.folder


def test_checkpoint_names_are_spelled_in_one_place():
    pytest.importorskip("torch")
    from nybble.train import trainer

    source = inspect.getsource(trainer)
    home = inspect.getsource(trainer.CheckpointPaths)
    rest = source.replace(home, "")
    for literal in ('"optimizer.pt"', "rng_rank", '"trainer_state.json"', ".trainer_state.json.tmp", "checkpoint-{"):
        assert literal in home, literal
        assert literal not in rest, f"{literal} spelled outside CheckpointPaths"
    assert Path(inspect.getsourcefile(trainer)).name == "trainer.py"
