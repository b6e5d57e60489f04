"""Scaling out and sweeps: DDP ranks, trainer presets, precision, Hydra multirun and Optuna.

Runs with several ranks are subprocesses: `strategy=ddp` inside the pytest process would relaunch
pytest.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import ROOT, TINY_RUN, run_module, scalars, text_samples
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

import gpt2_lightning.train  # noqa: F401  registers native_precision, which default.yaml names
from gpt2_lightning.callbacks import native_precision
from gpt2_lightning.model import Block
from gpt2_lightning.tokenizer import get_tokenizer

# Short trials: no validation before training, one validation at the end (step 3).
SHORT = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "val_before_fit=false"]


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture
def one_batch_corpus(tmp_path) -> Path:
    """220 one-token words: 4 training windows of 32 tokens (+1) and 2 validation windows.

    With 2 ranks x data.batch_size=2 against one process x 4, both see every training window in
    every step (drop_last, one batch an epoch), whatever order their samplers shuffle them in,
    so the two runs must take the same steps. The 2 validation windows go one to each rank: the
    synced val/loss must then equal the single process's mean over both.
    """
    words = " the of and to in is it that was for on as with by at from".split()
    text = "".join(f" {words[(i * i + 3 * i) % len(words)]}" for i in range(220))
    assert len(get_tokenizer().encode_ordinary(text)) == 220  # each " word" is one token
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_two_ddp_ranks_train_like_one_process_with_twice_the_batch(
    run_train, tmp_path, one_batch_corpus
):
    common = [
        f"data.path={one_batch_corpus}",
        "data.val_fraction=0.35",  # 77 tokens: 2 windows; the other 143 tokens: 4 windows
        "model.dropout=0.0",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "eval=perplexity",  # each rank scores its share of the windows; the counts are summed
        f"eval.path={one_batch_corpus}",
    ]
    ddp = run_train(
        *common,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.batch_size=2",
        run_dir=tmp_path / "ddp",
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stderr
    single = run_train(*common, "data.batch_size=4", run_dir=tmp_path / "single")
    assert single.returncode == 0, single.stderr

    # One run folder: rank 1 was relaunched into it, without a .hydra/ of its own.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob(".hydra")) == [
        Path("ddp/.hydra"),
        Path("single/.hydra"),
    ]
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").is_file()
    assert ddp.stdout.count("--- sample") == 1  # the summary comes from global rank 0 only
    assert len(text_samples(tmp_path / "ddp")) == 2  # after validations 0 and 3, rank 0 only

    a, b = last_checkpoint(tmp_path / "ddp"), last_checkpoint(tmp_path / "single")
    assert a["global_step"] == b["global_step"] == 3
    for name, tensor in b["state_dict"].items():
        assert (a["state_dict"][name] - tensor).abs().max() < 1e-5, name
    ddp_val, single_val = (
        scalars(tmp_path / "ddp")["val/loss"],
        scalars(tmp_path / "single")["val/loss"],
    )
    assert sorted(ddp_val) == sorted(single_val) == [0, 2]
    for step, loss in single_val.items():
        assert ddp_val[step] == pytest.approx(loss, abs=1e-5)
    ddp_eval, single_eval = (scalars(tmp_path / run)["eval/loss"] for run in ("ddp", "single"))
    assert sorted(ddp_eval) == sorted(single_eval) == [0, 2]
    for step, loss in single_eval.items():
        assert ddp_eval[step] == pytest.approx(loss, abs=1e-5)


@pytest.mark.slow
def test_ddp_resume_matches_an_uninterrupted_run(run_train, tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    corpus.write_text("\n".join(" ".join(words[i % 12 :] + words[: i % 12]) for i in range(60)))
    common = [
        f"data.path={corpus}",
        "model.dropout=0.1",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.batch_size=2",
        "scheduler.total_steps=8",
    ]
    straight = run_train(*common, "trainer.max_steps=8", run_dir=tmp_path / "straight")
    first = run_train(*common, "trainer.max_steps=3", run_dir=tmp_path / "first")  # mid-epoch
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr + first.stderr
    resumed = run_train(
        *common,
        "trainer.max_steps=8",
        f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
        run_dir=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 8
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def test_multirun_gives_each_job_its_own_folder(tmp_path, token_cache):
    result = run_module(
        "gpt2_lightning.train",
        "-m",
        *TINY_RUN,
        *SHORT,
        f"data.cache_dir={token_cache}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "optimizer.lr=1e-4,3e-4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for num, lr in enumerate([1e-4, 3e-4]):
        job = tmp_path / "sweep" / str(num)
        ckpt = last_checkpoint(job)
        assert ckpt["global_step"] == 3
        assert ckpt["hyper_parameters"]["optimizer"]["lr"] == lr
        assert sorted(scalars(job)["val/loss"]) == [2]
        # each job's train.log holds its own run's lines only
        assert (job / "train.log").read_text().count("`Trainer.fit` stopped") == 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]


def test_multirun_with_ddp_is_refused_in_one_line(tmp_path, token_cache):
    result = run_module(
        "gpt2_lightning.train",
        "-m",
        *TINY_RUN,
        f"data.cache_dir={token_cache}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer.strategy=ddp",
        "optimizer.lr=1e-4,3e-4",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in output(result)
    errors = [line for line in output(result).splitlines() if line.startswith("error:")]
    assert errors == [
        "error: a Hydra multirun cannot use DDPStrategy, which starts its other ranks by running "
        "this command again (each would re-run the whole sweep): use trainer.strategy=ddp_spawn, "
        "or run the jobs one by one"
    ]
    assert "Initializing distributed" not in output(result)  # refused before any rank started
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))


SEARCHED = ["data.batch_size", "optimizer.lr", "optimizer.weight_decay", "scheduler.warmup_steps"]


def optuna_sweep(
    token_cache: Path, sweep_dir: Path, *overrides: str
) -> subprocess.CompletedProcess:
    # data.batch_size is searched: set on the command line, the plugin would hold it fixed.
    tiny = [arg for arg in TINY_RUN if not arg.startswith("data.batch_size=")]
    return run_module(
        "gpt2_lightning.train",
        *tiny,
        *SHORT,
        f"data.cache_dir={token_cache}",
        "hparams_search=optuna",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
        cwd=sweep_dir.parent,
    )


def study_trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    return optuna.load_study(study_name="gpt2_lightning", storage=storage).trials


def test_optuna_sweep_writes_the_best_trial(token_cache, tmp_path):
    result = optuna_sweep(token_cache, tmp_path / "sweep", "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert sorted(best["best_params"]) == SEARCHED
    assert math.isfinite(best["best_value"]) and 9.0 < best["best_value"] < 11.0
    trials = study_trials(tmp_path / "sweep")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert best["best_value"] == min(t.value for t in trials)
    for trial in trials:  # the objective is the val/loss each trial's run logged last
        assert trial.value == pytest.approx(
            scalars(tmp_path / "sweep" / str(trial.number))["val/loss"][2]
        )
        assert 1e-4 <= trial.params["optimizer.lr"] <= 1e-2
        assert trial.params["data.batch_size"] in (4, 8, 16)


def test_optuna_sweep_resumes_its_study(token_cache, tmp_path):
    first = optuna_sweep(token_cache, tmp_path / "first", "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr
    before = study_trials(tmp_path / "first")
    # The plugin opens an existing study (load_if_exists) and runs n_trials more trials in it.
    # A new sweep folder keeps the first run's job folders 0/ and 1/ intact; a new sampler seed
    # keeps the seeded sampler from drawing the first trials again.
    again = optuna_sweep(
        token_cache,
        tmp_path / "again",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'first' / 'optuna.db'}",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.sampler.seed=2",
    )
    assert again.returncode == 0, again.stderr
    assert "Using an existing study with name 'gpt2_lightning'" in again.stderr
    after = study_trials(tmp_path / "first")
    assert [t.number for t in after] == [0, 1, 2]
    assert [(t.params, t.value) for t in after[:2]] == [(t.params, t.value) for t in before]
    assert after[2].params not in [t.params for t in before]
    best = yaml.safe_load((tmp_path / "again" / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(t.value for t in after)  # over the whole study
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "0",
        "optimization_results.yaml",
    ]


def test_optuna_sweep_survives_failed_and_unvalidated_trials(token_cache, tmp_path):
    # The search is over one choice, and with sampler seed 0 trial 0 draws "bogus", trial 1
    # "norm". gradient_clip_algorithm=bogus makes the Trainer refuse it: trial 0 is marked FAIL
    # and the sweep goes on. Trial 1 stops before its first scheduled validation (step 3); the
    # one at its last step gives it a finite objective.
    result = optuna_sweep(
        token_cache,
        tmp_path / "sweep",
        "hydra.sweeper.params=null",
        "+trainer.gradient_clip_algorithm=choice(norm,bogus)",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=2",
    )
    assert result.returncode == 0, result.stderr
    outcomes = [
        (t.params["+trainer.gradient_clip_algorithm"], t.state, t.value)
        for t in study_trials(tmp_path / "sweep")
    ]
    assert outcomes[0] == ("bogus", optuna.trial.TrialState.FAIL, None)
    assert outcomes[1][:2] == ("norm", optuna.trial.TrialState.COMPLETE)
    assert 9.0 < outcomes[1][2] < 11.5  # validated at step 2
    assert "Failed experiment: error: trainer: `gradient_clip_algorithm` bogus" in output(result)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == outcomes[1][2]


def test_optuna_sweep_without_a_completed_trial_ends_in_one_line(token_cache, tmp_path):
    # Every dropout in (1.5, 2) is invalid: each trial fails before training, and the plugin's
    # request for the best trial at the end used to raise Optuna's "Record does not exist".
    result = optuna_sweep(
        token_cache, tmp_path / "sweep", "hydra.sweeper.n_trials=2", "model.dropout=interval(1.5,2)"
    )
    assert result.returncode == 1
    assert "Traceback" not in output(result)
    assert output(result).count("Failed experiment: error: model.dropout=1.") == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no trial of this Optuna sweep completed, so it has no best value: the 'Failed "
        "experiment' lines above say why each one failed"
    )
    states = [t.state for t in study_trials(tmp_path / "sweep")]
    assert states == [optuna.trial.TrialState.FAIL] * 2
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()


def test_bf16_mixed_run_ends_with_a_finite_loss(run_train, tmp_path):
    result = run_train("trainer.precision=bf16-mixed", *SHORT)
    assert result.returncode == 0, result.stderr
    assert "Using bfloat16 Automatic Mixed Precision (AMP)" in result.stderr
    losses = scalars(tmp_path / "run")["train/loss"]
    assert sorted(losses) == [0, 1, 2]
    assert all(math.isfinite(loss) and 9.0 < loss < 11.5 for loss in losses.values())
    assert (
        last_checkpoint(tmp_path / "run")["state_dict"]["model.tok_emb.weight"].dtype
        == torch.float32
    )


@pytest.mark.slow
def test_compiled_run_ends_with_a_finite_loss(run_train, tmp_path):
    result = run_train("compile=true", *SHORT)
    assert result.returncode == 0, result.stderr
    losses = scalars(tmp_path / "run")["train/loss"]
    assert sorted(losses) == [0, 1, 2]
    assert all(math.isfinite(loss) and 9.0 < loss < 11.5 for loss in losses.values())
    # compiled in place: the checkpoint has the plain parameter names
    assert "model.tok_emb.weight" in last_checkpoint(tmp_path / "run")["state_dict"]


@pytest.mark.slow
def test_multirun_with_ddp_spawn_runs_each_job_on_two_ranks(tmp_path, token_cache):
    short = [arg for arg in SHORT if not arg.startswith("trainer.max_steps=")]
    result = run_module(
        "gpt2_lightning.train",
        "-m",
        *TINY_RUN,
        *short,
        f"data.cache_dir={token_cache}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer.devices=2",
        "trainer.strategy=ddp_spawn",
        "trainer.max_steps=3,4",  # validation every 3 steps: job 1 ends between two
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # Job 0 validated its last step inside fit; job 1 starts its processes again to validate
    # step 4 (the worker's counts reach this process through callback_metrics).
    assert result.stderr.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 3
    summaries = [line.split()[1] for line in result.stdout.splitlines() if line[:6] == "steps:"]
    assert summaries == ["3", "4"]
    # Lightning plots a validation after step n at n - 1, and the one after fit follows suit
    # (as in a single process: test_run_validates_its_final_step_and_runs_without_a_logger)
    for num, steps, logged_at in ((0, 3, [2]), (1, 4, [2, 3])):
        assert last_checkpoint(tmp_path / "sweep" / str(num))["global_step"] == steps
        assert sorted(scalars(tmp_path / "sweep" / str(num))["val/loss"]) == logged_at


def compose_trainer(preset: str):
    with initialize_config_dir(str(ROOT / "gpt2_lightning" / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"trainer={preset}"]).trainer


def test_trainer_presets_override_the_default():
    default = compose_trainer("default")
    presets = {name: compose_trainer(name) for name in ("cpu", "gpu", "ddp", "fsdp")}
    assert {name: (t.accelerator, t.precision) for name, t in presets.items()} == {
        "cpu": ("cpu", "32-true"),
        "gpu": ("gpu", "bf16-mixed"),
        "ddp": ("auto", native_precision("auto")),  # default.yaml's: by the device
        "fsdp": ("gpu", "bf16-mixed"),
    }
    assert (presets["ddp"].strategy, presets["ddp"].devices) == ("ddp", 2)
    for trainer in presets.values():  # the rest comes from default.yaml
        assert trainer.max_steps == default.max_steps
        assert trainer.val_check_interval == default.val_check_interval


def test_fsdp_preset_shards_and_checkpoints_each_block():
    trainer = compose_trainer("fsdp")
    assert trainer.gradient_clip_val is None  # Lightning's FSDP refuses clipping by norm
    strategy = instantiate(trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
