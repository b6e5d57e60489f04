"""Bad input to `python -m gpt2_lightning.train`: one clear line, exit 1, nothing damaged.

Every case fails before the first training step, so each run costs about the import of Lightning.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_module, scalars
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2_lightning.cli import check_command_line
from gpt2_lightning.module import GPTLightningModule
from gpt2_lightning.train import check_run
from gpt2_lightning.weights import WeightsError, read_checkpoint


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a run that failed cleanly."""
    assert result.returncode == 1, output(result)
    assert "Traceback" not in output(result)
    lines = [line for line in output(result).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output(result)
    return lines[0]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.ckpt"))


def test_unknown_model_size_lists_the_valid_ones(run_train, tmp_path):
    line = error_line(run_train("model=7B"))
    assert line == "error: model=7B is unknown: valid are 124M, 355M, 774M, 1558M, tiny"
    assert not (tmp_path / "run").exists()  # nothing ran, no run folder


def test_unknown_option_in_a_sweep_is_refused_before_any_job(run_train, tmp_path):
    sweep = f"hydra.sweep.dir={tmp_path}/sweep"
    result = run_train("-m", "model=tiny,7B", "trainer=cpu,gpus", sweep)
    line = error_line(result)
    assert line == "error: model=7B is unknown: valid are 124M, 355M, 774M, 1558M, tiny"
    assert not (tmp_path / "sweep").exists()


def test_null_group_choice_names_the_way_to_drop_a_group(run_train):
    line = error_line(run_train("logger=[tensorboard,cvs]"))
    assert line == "error: logger=cvs is unknown: valid are csv, tensorboard"
    line = error_line(run_train("logger=null"))  # Hydra itself would print a traceback
    assert line == "error: logger=null is not an option: valid are csv, tensorboard, or ~logger"


def test_unknown_key_lists_the_keys_there_are(run_train, tmp_path):
    line = error_line(run_train("optimizer.learning_rate=1e-3"))
    assert line == (
        "error: optimizer.learning_rate=1e-3: optimizer has no key 'learning_rate' (it has: lr, "
        "weight_decay, betas, eps); to add a new key, write +optimizer.learning_rate=1e-3"
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


def refusal(args: list[str]) -> str | None:
    """What the check before Hydra says of a train command line, or None if it lets it through."""
    try:
        check_command_line("train", args)
    except SystemExit as stop:
        return str(stop.code)
    return None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["foo=1"], "foo=1: the config has no key 'foo' (it has: seed, compile, ckpt_path,"),
        (["-m", "seed=1,2", "foo=3,4"], "foo=3,4: the config has no key 'foo'"),
        (["-m", "trainer.foo=range(1,3)"], "trainer.foo=range(1,3): trainer has no key 'foo'"),
        (["optimizer.lr=[1,2"], "'optimizer.lr=[1,2' is not an override Hydra can read"),
        (["~foo"], "Could not delete from config. 'foo' does not exist."),
        (["callbacks.nope.x=1"], "callbacks.nope.x=1: callbacks has no key 'nope' (it has: model"),
        (["seed.x=1"], "seed.x=1: seed is 1337, which has no keys"),
        (["model.nope=1", "trainer.nope=2"], "model.nope=1: the config has no key 'model.nope'"),
        (["optimizer.betas.5=1"], "Error merging override optimizer.betas.5=1 (list index out"),
        (
            ["eval.path=x.jsonl"],
            "eval.path=x.jsonl: no eval is chosen: add eval=<one of hellaswag, multiple_choice, "
            "perplexity>",
        ),
    ],
)
def test_command_line_is_checked_before_hydra_starts(args, message):
    line = refusal(args)
    assert line is not None and line.startswith(f"error: {message}")
    assert "\n" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["model=tiny", "seed=3", "+trainer.detect_anomaly=true"],
        ["-m", "model=tiny,124M", "optimizer.lr=range(1,3)", "+foo=1,2"],
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2"],
        # values are checked by the jobs, where the classes that use them are built
        ["-m", "seed=1,2", "data.batch_size=0"],
        ["-m", "data.batch_size=0,4"],
        ["-m", "model.emb_dim=60,64", "model.num_heads=8"],
        ["-m", "model.context_length=16,64", "data.context_length=32"],
        ["-m", "data=text,default"],
        ["hparams_search=optuna", "data.batch_size=choice(0,4)"],
        ["-m", "+bs=0,8", "data.batch_size=${bs}"],
        # flags are Hydra's: --cfg job prints the config even when it lacks data.path
        ["--cfg", "job", "data=text"],
        # what only Hydra's run can resolve or report is left to it
        ["hydra.job.chdir=true", "data.path=${hydra:runtime.cwd}/corpus.txt"],
        ["data.cache_dir=${run_dir}/tokens"],
        ["model.emb_dim=${nope}"],
        ["~seed"],
        ["sample=null"],
        ["model=${oc.env:SIZE,tiny}"],
        ["model=tiny.yaml"],
    ],
)
def test_command_line_that_jobs_may_run_passes(args):
    assert refusal(args) is None  # Hydra and the jobs may run it: the pre-check lets it through


def test_a_mistake_every_job_makes_ends_the_sweep_in_one_line(tmp_path, token_cache):
    result = run_module(
        "gpt2_lightning.train",
        "-m",
        "seed=1,2",
        "data.batch_size=0",
        f"data.cache_dir={token_cache}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in output(result)
    errors = [line for line in output(result).splitlines() if line.startswith("error:")]
    assert errors == ["error: data.batch_size=0 is invalid: must be a positive integer"]
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))  # each job failed before its first step


def test_interpolation_error_is_one_line_naming_the_key(run_train):
    line = error_line(run_train("model.emb_dim=${nope}"))
    assert line == "error: Interpolation key 'nope' not found (at model.emb_dim)"


def test_missing_data_path(run_train, tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    line = error_line(run_train(f"data.path={missing}"))
    assert f"data.path={str(missing)!r} does not exist" in line
    assert "give a text or record file (.txt, .jsonl, .json, .parquet), a folder or glob" in line
    assert checkpoints(tmp_path / "run") == []


def test_empty_corpus(run_train, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    line = error_line(run_train(f"data.path={corpus}"))
    assert f"data.path={str(corpus)!r} holds no text: the corpus is empty" in line
    assert checkpoints(tmp_path / "run") == []


def test_corpus_shorter_than_one_window(run_train, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Too short to train on.")  # 7 tokens with its <|endoftext|>; a window is 33
    line = error_line(run_train(f"data.path={corpus}"))
    assert f"data.path={str(corpus)!r}: 7 tokens are too few for one training window" in line
    assert "of 33 tokens" in line
    assert "lower model.context_length or data.val_fraction" in line
    assert checkpoints(tmp_path / "run") == []


def test_num_heads_that_does_not_divide_emb_dim(run_train, tmp_path):
    line = error_line(run_train("model.emb_dim=32", "model.num_heads=3"))
    assert "emb_dim=32 is not divisible by num_heads=3" in line
    assert "choose num_heads that divides emb_dim" in line
    assert checkpoints(tmp_path / "run") == []


def compose_train(*overrides: str):
    with initialize_config_dir(str(ROOT / "gpt2_lightning" / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("val_before_fit=1", "val_before_fit=1 is invalid: use true or false"),
        ("seed=abc", "seed='abc' is invalid: must be an integer"),
        ("seed=-1", "seed=-1 is invalid: must be an integer in [0, 2**32)"),
        ("trainer.max_steps=abc", "trainer.max_steps='abc' is invalid"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is invalid"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is invalid"),
    ],
)
def test_a_bad_key_of_the_run_is_named_before_anything_is_built(override, message):
    check_run(compose_train("run_dir=run"))  # the defaults pass
    with pytest.raises(ValueError) as error:
        check_run(compose_train("run_dir=run", override))
    assert str(error.value).startswith(message)


def module_of(*overrides: str) -> GPTLightningModule:
    """The LightningModule the config describes, built as train() builds it."""
    cfg = OmegaConf.to_container(compose_train(*overrides).module, resolve=True)  # as _convert_
    return GPTLightningModule(**{key: cfg[key] for key in cfg if not key.startswith("_")})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compile=maybe"], "compile='maybe' is invalid: use true or false"),
        (["model.dropout=abc"], "model.dropout='abc' is invalid: must be in [0, 1)"),
        (["model.context_length=abc"], "model.context_length='abc' is invalid"),
        (["model.num_heads=3"], "model.emb_dim=128 is not divisible by num_heads=3"),
    ],
)
def test_bad_model_setting_is_named_as_on_the_command_line(overrides, message):
    with pytest.raises(ValueError) as error:
        module_of(*overrides)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sample.max_new_tokens=-1", "error: sample.max_new_tokens=-1 is invalid"),
        ("sample.temperature=-1", "error: sample.temperature=-1 is invalid"),
        ("data.context_length=64", "error: data.context_length=64 is longer than model.context"),
        ("model.vocab_size=100", "error: model.vocab_size=100 is too small for the GPT-2 tokeni"),
        ("trainer.val_check_interval=2.5", "error: trainer: `val_check_interval` should be an"),
    ],
)
def test_a_bad_setting_fails_the_run_in_one_line_before_the_first_step(
    run_train, tmp_path, override, message
):
    assert error_line(run_train(override)).startswith(message)
    assert checkpoints(tmp_path / "run") == []


@pytest.mark.parametrize("group", ["data=text", "experiment=gpt2_124M"])
def test_data_path_is_required_where_the_config_says_so(run_train, tmp_path, group):
    line = error_line(run_train(group))
    assert line == "error: data.path is required here: set it on the command line, data.path=..."
    assert checkpoints(tmp_path / "run") == []


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    module = module_of()
    saved = {"model": {**module.hparams.model, "num_layers": 6, "dropout": 0.3}}
    with pytest.raises(ValueError) as error:
        module.on_load_checkpoint({"hyper_parameters": saved, "lr_schedulers": []})
    assert str(error.value).startswith(
        "ckpt_path holds a model with num_layers=6, not model.num_layers=4:"
    )
    saved["model"]["num_layers"] = 4  # dropout may differ
    module.on_load_checkpoint({"hyper_parameters": saved, "lr_schedulers": []})
    torch.save({"hyper_parameters": saved, "state_dict": {}, "global_step": 7}, tmp_path / "a.ckpt")
    assert read_checkpoint(tmp_path / "a.ckpt", "ckpt_path")["global_step"] == 7
    with pytest.raises(
        WeightsError, match=r"is a folder: give a .ckpt file in it, e.g. .*last.ckpt"
    ):
        read_checkpoint(tmp_path, "ckpt_path")


def test_bad_trainer_argument_gets_lightnings_reason_in_one_line(run_train, tmp_path):
    line = error_line(run_train("trainer.devices=0"))
    assert line.startswith("error: trainer: `Trainer(devices=0)` value is not a valid input")
    assert checkpoints(tmp_path / "run") == []


def test_bad_type_in_the_config_is_one_line_naming_the_key(run_train, tmp_path):
    line = error_line(run_train("optimizer.lr=abc"))
    assert line == "error: optimizer.lr='abc' is invalid: must be a number >= 0"
    assert checkpoints(tmp_path / "run") == []


def test_missing_checkpoint(run_train, tmp_path):
    missing = tmp_path / "gone" / "last.ckpt"
    line = error_line(run_train(f"ckpt_path={missing}"))
    assert f"ckpt_path={str(missing)!r} does not exist" in line
    assert "give a .ckpt written by a training run" in line
    assert checkpoints(tmp_path / "run") == []


def test_corrupt_checkpoint_is_refused_and_left_as_it_was(run_train, tmp_path):
    # The run's own last.ckpt, damaged: resuming from it must fail without touching it.
    run_dir = tmp_path / "run"
    corrupt = run_dir / "checkpoints" / "last.ckpt"
    corrupt.parent.mkdir(parents=True)
    garbage = np.random.default_rng(0).bytes(4096)
    corrupt.write_bytes(garbage)
    line = error_line(run_train(f"ckpt_path={corrupt}"))
    assert f"ckpt_path={str(corrupt)!r} is not a readable Lightning checkpoint" in line
    assert corrupt.read_bytes() == garbage
    assert checkpoints(run_dir) == [corrupt]


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_module("gpt2_lightning.train", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "model:" in lines
    assert "  emb_dim: 128" in lines  # the default model is tiny
    assert "  _target_: gpt2_lightning.data.TextDataModule" in lines
    assert list(tmp_path.iterdir()) == []  # printing the config runs nothing


def test_runs_from_another_directory_with_relative_paths(run_train, tmp_path):
    # cwd is tmp_path: data.path and hydra.run.dir resolve there; conf/ comes with the package.
    text = " ".join(f"Sentence {i} of a small corpus written for this test." for i in range(60))
    (tmp_path / "corpus.txt").write_text(text)
    result = run_train(
        "data.path=corpus.txt",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        run_dir=Path("relative_run"),
    )
    assert result.returncode == 0, output(result)
    assert "Traceback" not in output(result)
    last = tmp_path / "relative_run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert (tmp_path / "relative_run" / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists()


def test_a_run_folder_under_a_regular_file_is_one_line(run_train, tmp_path):
    # Hydra makes the folder before the program runs: its own report is a traceback
    (tmp_path / "afile").write_text("")
    line = error_line(run_train(run_dir=tmp_path / "afile" / "run"))
    assert line == (
        f"error: hydra.run.dir={tmp_path}/afile/run: {tmp_path}/afile is a file, not a folder"
    )
    assert (tmp_path / "afile").read_text() == ""


def test_a_sweep_folder_is_checked_as_a_run_folder(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    sweep = tmp_path / "afile" / "sweep"
    message = f"error: hydra.sweep.dir={sweep}: {tmp_path}/afile is a file, not a folder"
    assert refusal(["-m", "seed=1,2", f"hydra.sweep.dir={sweep}"]) == message
    assert refusal(["hparams_search=optuna", f"hydra.sweep.dir={sweep}"]) == message  # no -m
    assert refusal([f"hydra.sweep.dir={sweep}"]) is None  # one run: its folder is hydra.run.dir
    # root writes anywhere: stand in for a folder this user may not write in
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert refusal([f"hydra.run.dir={tmp_path}/run"]) == (
        f"error: hydra.run.dir={tmp_path}/run: this user cannot write in {tmp_path}"
    )


def test_a_checkpoint_folder_that_cannot_be_written_is_found_before_the_first_step(
    run_train, tmp_path
):
    (tmp_path / "afile").write_text("")  # a path under a regular file: root cannot write there
    folder = tmp_path / "afile" / "checkpoints"
    result = run_train(f"callbacks.model_checkpoint.dirpath={folder}")
    assert error_line(result) == f"error: cannot write checkpoints in {folder}: Not a directory"
    assert checkpoints(tmp_path) == []
    assert "train/loss" not in scalars(tmp_path / "run")  # not a step trained
