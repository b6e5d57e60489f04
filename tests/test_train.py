"""The main job: a real training run, its checkpoints and TensorBoard logs, and exact resume."""

from __future__ import annotations

import csv
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_RUN,
    dead_pid,
    in_a_terminal,
    resume_against_straight,
    run_module,
    scalars,
    temp_file,
    text_samples,
)

from gpt2_lightning.model import GPT
from gpt2_lightning.module import WarmupCosine


def test_cli_run_writes_checkpoint_tensorboard_and_summary(run_train, tmp_path):
    result = run_train()
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["model"]["emb_dim"] == 32
    assert (run / ".hydra" / "config.yaml").is_file()
    log = (run / "train.log").read_text()  # Lightning's lines, in Hydra's log file
    assert "Seed set to 1337" in log and "`Trainer.fit` stopped: `max_steps=6` reached." in log

    logged = scalars(run)
    assert sorted(logged["train/loss"]) == [0, 1, 2, 3, 4, 5]  # every step
    # Lightning logs at the number of optimizer steps taken before the batch: 0-based
    assert sorted(logged["val/loss"]) == [0, 2, 5]  # before training, then every 3 steps
    for step, loss in logged["val/loss"].items():
        assert logged["val/ppl"][step] == pytest.approx(math.exp(loss), rel=1e-4)
    assert logged["val/loss"][0] == pytest.approx(math.log(50257), abs=0.3)
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay", "train/grad_norm"} <= set(logged)
    assert len(text_samples(run)) == 3

    assert "val loss:" in result.stdout and "last.ckpt" in result.stdout
    assert "tensorboard --logdir" in result.stdout
    model = GPT.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.cfg.num_layers == 2


def test_run_validates_its_final_step_and_runs_without_a_logger(run_train, tmp_path):
    # 4 steps, validation every 3: without the final validation the last would be at step 3
    result = run_train("logger=csv", "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    val = [(int(row["step"]), float(row["val/loss"])) for row in rows if row["val/loss"]]
    # before training, after step 3, and after step 4, at 3: Lightning plots a validation after
    # step n at n - 1, and the one after fit follows suit
    assert [step for step, _ in val] == [0, 2, 3]
    summary = re.search(r"val loss: +([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert summary is not None, result.stdout
    assert float(summary[2]) == pytest.approx(val[-1][1], abs=1e-3)  # the summary's is the last
    assert "tensorboard" not in result.stdout  # no TensorBoard logger, no hint

    result = run_train("~logger", "trainer.max_steps=4", run_dir=tmp_path / "quiet")
    assert result.returncode == 0, result.stderr  # LearningRateMonitor is left out
    assert sorted(p.name for p in (tmp_path / "quiet").iterdir()) == [
        ".hydra",
        "checkpoints",
        "loss.png",
        "train.log",
    ]


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """About 900 tokens: with 32-token windows and batch 4 an epoch is 5 batches."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex it".split()
    lines = [
        " ".join(words[(i * 7) % len(words) :] + words[: (i * 7) % len(words)]) for i in range(60)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize(
    "precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)]
)  # bf16-mixed: what the default run takes on a CPU with native bf16
def test_exact_resume_matches_an_uninterrupted_run(run_train, tmp_path, small_corpus, precision):
    given = [f"trainer.precision={precision}", f"data.path={small_corpus}"]
    runs = resume_against_straight(run_train, tmp_path, given, stop=7, steps=16)
    # An epoch is 6 batches: the resume point (step 7) is mid-epoch 1, steps 13-16 are epoch 2.
    assert runs["straight"]["ckpt"]["epoch"] == runs["resumed"]["ckpt"]["epoch"] == 2
    straight_val = runs["straight"]["scalars"]["val/loss"]
    resumed_val = runs["resumed"]["scalars"]["val/loss"]
    # after batches 9, 12, 15 and 16 (Lightning plots a validation after step n at n - 1)
    assert sorted(resumed_val) == [8, 11, 14, 15]
    assert {s: straight_val[s] for s in resumed_val} == resumed_val


def test_a_run_resumed_with_more_steps_decays_over_the_new_horizon(run_train, tmp_path):
    common = ["scheduler.warmup_steps=1", "trainer.val_check_interval=4"]
    first = run_train(*common, "trainer.max_steps=4", run_dir=tmp_path / "first")
    assert first.returncode == 0, first.stderr
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = run_train(*common, "trainer.max_steps=8", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr
    assert "steps:      8 (4 in this run)" in resumed.stdout
    lr = scalars(tmp_path / "run")["lr-AdamW/decay"]
    # total_steps follows trainer.max_steps: the resumed steps are on the 8-step curve (the
    # checkpoint's 4-step one had already reached its floor, 0.1 x lr, at step 4)
    expected = {step: 6e-3 * WarmupCosine(1, 8, 0.1)(step) for step in range(4, 8)}  # optimizer.lr
    assert lr == pytest.approx(expected)
    assert lr[4] > 2 * 6e-4


def test_sigterm_writes_last_checkpoint_at_the_step_reached(run_train, tmp_path):
    result = run_train(
        "trainer.max_steps=50",
        "+callbacks.sigterm._target_=tests.signals.SigtermAt",
        "+callbacks.sigterm.step=4",
    )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    umask = os.umask(0)
    os.umask(umask)
    assert last.stat().st_mode & 0o777 == 0o666 & ~umask  # written by AtomicCheckpointIO
    assert result.returncode == 143  # 128 + SIGTERM, as a shell reports a terminated process
    assert "stopped by SIGTERM at step 4" in result.stderr
    assert "Traceback" not in result.stderr
    # last.ckpt only: no file named like the best ones (step000004-val<the step-3 loss>.ckpt)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(names) == 2 and names[0] == "last.ckpt" and names[1].startswith("step000003-val")


def test_ctrl_c_stops_after_the_step_with_an_exact_checkpoint(run_train, tmp_path):
    result = run_train(
        "trainer.max_steps=50",
        "+callbacks.sigint._target_=tests.signals.SigintAt",
        "+callbacks.sigint.step=4",
    )
    assert result.returncode == 130, result.stderr  # 128 + SIGINT
    assert "Ctrl-C: stopping after this step" in result.stderr
    assert f"stopped by Ctrl-C at step 4: resume with ckpt_path={tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    # A KeyboardInterrupt would have come mid-step: a batch fetched (ready) but not completed,
    # and a data loader a batch ahead of the weights.
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["ready"] == progress["completed"] == 4


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(run_train, tmp_path):
    result = run_train(
        "trainer.max_steps=50",
        "+callbacks.sigint._target_=tests.signals.SigintAt",
        "+callbacks.sigint.step=4",
        "+callbacks.sigint.times=2",
    )
    assert result.returncode != 0
    # the step-3 validation's checkpoints stay; nothing of the interrupted step 5 is written
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def test_sigterm_before_the_first_step_says_there_is_nothing_to_resume(run_train, tmp_path):
    result = run_train(
        "+callbacks.sigterm._target_=tests.signals.SigtermInFirstValidation",
        "trainer.limit_val_batches=3",
    )
    assert result.returncode == 143, result.stderr  # was 0 when it came during a validation
    assert "stopped by SIGTERM before the first step: nothing to resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_older_ones_stay(run_train, tmp_path):
    result = run_train(
        "+callbacks.disk_full._target_=tests.signals.DiskFullAfter",
        "+callbacks.disk_full.step=4",
        "callbacks.model_checkpoint.save_top_k=1",  # step 6's would replace step 3's
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    folder = tmp_path / "run" / "checkpoints"
    # the step-6 checkpoint fails, and last.ckpt is not written again in on_exception
    assert len(lines) == 1 and re.fullmatch(
        rf"error: cannot write checkpoint {folder}/step000006-val[0-9.]+\.ckpt: No space left on "
        rf"device; the last good one is {folder}/last\.ckpt \(step 3\)",
        lines[0],
    ), result.stderr
    # the step-3 checkpoints are whole, and the half-written temporary file is gone
    names = sorted(path.name for path in folder.iterdir())
    assert len(names) == 2 and names[0] == "last.ckpt" and names[1].startswith("step000003-val")
    for name in names:
        assert torch.load(folder / name, weights_only=True)["global_step"] == 3


def test_a_full_disk_in_a_resumed_run_names_the_checkpoint_it_resumed_from(run_train, tmp_path):
    first = run_train("trainer.max_steps=3", run_dir=tmp_path / "first")
    assert first.returncode == 0, first.stderr
    resumed_from = tmp_path / "first" / "checkpoints" / "last.ckpt"
    result = run_train(
        f"ckpt_path={resumed_from}",
        "+callbacks.disk_full._target_=tests.signals.DiskFullAfter",
        "+callbacks.disk_full.step=4",  # before this run's first checkpoint, at step 6
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].endswith(
        f"the last good one is {resumed_from}, which this run resumed from"
    ), result.stderr
    assert torch.load(resumed_from, weights_only=True)["global_step"] == 3


def test_a_run_removes_the_temporary_files_of_killed_checkpoint_writers(run_train, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    temp_file(folder, dead_pid(), 2_500_000)  # a checkpoint writer killed mid-write
    being_written = temp_file(folder, os.getpid(), 100)  # its writer still runs
    result = run_train("trainer.max_steps=1")
    assert result.returncode == 0, result.stderr
    freed = [line for line in result.stderr.splitlines() if line.startswith("removed orphaned")]
    assert freed == [f"removed orphaned temporary files: 2.5 MB in {folder}"]
    assert sorted(path.name for path in folder.iterdir()) == [being_written.name, "last.ckpt"]


def test_init_from_hf_folder_takes_its_config_and_weights(run_train, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=48, n_layer=1, n_head=3, n_positions=24, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    # lr 0: the run must end with exactly the weights it started from
    result = run_train(f"init_from={tmp_path / 'hf'}", "optimizer.lr=0")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    model_cfg = ckpt["hyper_parameters"]["model"]
    assert (model_cfg["emb_dim"], model_cfg["num_layers"], model_cfg["num_heads"]) == (48, 1, 3)
    assert model_cfg["context_length"] == 24
    expected = GPT.from_pretrained(tmp_path / "hf").state_dict()
    for name, tensor in expected.items():
        assert torch.equal(ckpt["state_dict"][f"model.{name}"], tensor), name

    # The fine-tune resumes with its own command: the architecture comes from the checkpoint
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    again = run_train(
        f"init_from={tmp_path / 'hf'}",
        "optimizer.lr=0",
        "trainer.max_steps=8",
        f"ckpt_path={last}",
        run_dir=tmp_path / "again",
    )
    assert again.returncode == 0, again.stderr
    resumed = torch.load(tmp_path / "again" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8 and resumed["hyper_parameters"]["model"] == model_cfg


def test_a_run_whose_output_is_not_a_terminal_prints_plain_lines(run_train, tmp_path):
    # subprocess pipes, as a log file, CI, nohup and tee give: no bar is redrawn
    result = run_train(
        "trainer.enable_progress_bar=true",
        "callbacks.progress_bar.log_every=2",
        "trainer.enable_model_summary=true",
        "trainer.precision=bf16-mixed",  # the model summary's bf16 note
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\x1b[" not in output and "\r" not in output  # no escape codes, no redrawn lines
    # nor the notices of torchdata and Lightning that a user cannot act on
    for notice in ("deprecated", "litlogger", "not supported by the model summary"):
        assert notice not in output
    assert "Trainable params" in output  # the summary itself stays
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    trained = [line.split()[1] for line in lines if "  loss " in line]
    validated = [line.split()[1] for line in lines if "val/loss" in line]
    assert trained == ["2/6", "4/6", "6/6"]  # a line every 2 steps
    assert validated == ["0/6", "3/6", "6/6"]  # before training, then every 3 steps


# The default run's val loss in the README (AMD EPYC Zen 4, bf16-mixed, Python 3.11.7, seed 1337;
# seed 1 gave 5.900). Seeds, CPUs and precisions moved it by up to ~0.1 (docs/training.md), hence
# the margin below. Issue #18's goal, 5.0, is not reached.
DOCUMENTED_VAL_LOSS = 5.921


def test_in_a_terminal_one_bar_counts_the_steps_and_validation_stacks_none(tmp_path, token_cache):
    args = [*TINY_RUN, f"data.cache_dir={token_cache}", "trainer.max_steps=8"]
    run = [sys.executable, "-m", "gpt2_lightning.train", *args, "trainer.enable_progress_bar=true"]
    first = in_a_terminal([*run, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    fit = first[
        first.index("train:") : first.index("`Trainer.fit` stopped")
    ]  # after val_before_fit
    drawn = [part for part in re.split(r"[\r\n]", fit) if "|" in part]
    assert drawn and all(part.startswith(("train:", "validating:")) for part in drawn)
    assert re.search(r"train: 100%\|.*\| 8/8 \[.*<00:00.*val/loss=", fit)  # time left, val/loss
    assert "validating:  38%" in fit  # step 3 of 8 (val_check_interval=3), in the same bar
    # A resumed run's bar starts at the step it resumed from, not at 0 of an epoch.
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resume = [*run, "trainer.max_steps=12", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}"]
    again = in_a_terminal(resume, tmp_path)
    assert re.search(r"train:  67%\|.*\| 8/12 ", again) and "| 0/12 " not in again


def test_a_run_draws_its_loss_curve_into_the_run_folder(run_train, tmp_path):
    result = run_train()
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "run" / "loss.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (700, 480)  # figsize (7, 4.8) at 100 dpi


@pytest.mark.slow
def test_the_default_run_reaches_its_documented_loss(tmp_path, token_cache):
    # README command 1: no arguments but where to write. Its summary is the README's.
    result = run_module(
        "gpt2_lightning.train", f"data.cache_dir={token_cache}", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr
    summary = re.search(r"val loss: +([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert summary is not None, result.stdout
    assert float(summary[1]) == pytest.approx(10.82, abs=0.02)  # ln(50257) = 10.82: untrained
    assert float(summary[2]) <= DOCUMENTED_VAL_LOSS + 0.15  # any seed-, CPU- or precision-drift
