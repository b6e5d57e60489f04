"""What Lightning lacks: text samples, RNG state for exact resume, a last.ckpt of the final step,
checkpoints written atomically (a failed write in one line), Ctrl-C as a stop after the step,
tokens/s in the progress bar, glibc's allocator kept warm, evaluation after each validation, and
the run summary."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt2_lightning.checks import check_integer
from gpt2_lightning.evaluate import (
    STYLES,
    TASKS,
    corpus_tokens,
    load_choice_items,
    load_hellaswag,
    perplexity,
    score_choices,
)
from gpt2_lightning.files import atomic_file, remove_orphans
from gpt2_lightning.generate import check_sampling, generate
from gpt2_lightning.tokenizer import get_tokenizer


def batch_size(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Windows in a batch (ThroughputMonitor's batch_size_fn)."""
    return batch[0].size(0)


def batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Tokens in a batch (ThroughputMonitor's length_fn: its "items" are our tokens)."""
    return batch[0].numel()


def sample_text(
    model: torch.nn.Module,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    """The prompt and its continuation, sampled with its own generator (global RNG untouched)."""
    enc = get_tokenizer()
    device = next(model.parameters()).device
    idx = torch.tensor([enc.encode(prompt, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator
    )
    return enc.decode(out[0].tolist())


def shards_weights(strategy: Strategy) -> bool:
    """Whether each rank holds only a shard of the weights (FSDP, ModelParallelStrategy): then no
    rank can run the model alone, and rank 0 would wait for the others' shards forever."""
    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


class TextSample(L.Callback):
    """After each validation, sample from a prompt and log the text to TensorBoard.

    Its own seeded generator leaves the training RNG alone (exact resume holds). Skipped, with one
    warning, when the strategy shards the weights.
    """

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 40,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
    ):
        check_sampling(max_new_tokens, temperature, top_k)  # now, not after the first validation
        self.settings = dict(
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        self.last_text: str | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if shards_weights(trainer.strategy):
            rank_zero_warn(  # warnings.warn underneath: shown once, not after every validation
                f"text samples are skipped under {type(trainer.strategy).__name__}: each rank "
                "holds a shard of the weights; sample from a checkpoint with "
                "`python -m gpt2_lightning.generate checkpoint=<run>/checkpoints/last.ckpt`"
            )
            return
        self.last_text = sample_text(pl_module.model, **self.settings)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                # Markdown: indented four spaces, TensorBoard shows the text as written
                shown = "    " + self.last_text.replace("\n", "\n    ")
                experiment.add_text("sample", shown, global_step=trainer.global_step)


class Evaluation(L.Callback):
    """After each validation (the one before fit and the final one too), a task of
    gpt2_lightning.evaluate scored on the model and logged through pl_module.log as eval/*
    scalars (TensorBoard, callback_metrics: a checkpoint or a sweep can follow them):

    - hellaswag, multiple_choice: eval/<style>/acc and eval/<style>/acc_norm for each style
      (completion, harness);
    - perplexity: eval/loss (nats per token), eval/ppl and eval/bpb (bits per byte).

    The items or the corpus are read once, here: a wrong path fails before training starts.
    Under DDP each rank scores its share and the counts are summed across ranks (evaluate's
    rank_split), so every rank logs the same values. The model's mode is restored after.
    """

    def __init__(
        self,
        task: str,
        path: str | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        styles: Sequence[str] = STYLES,
        stride: int | None = None,
        cache_dir: str | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"eval.task={task!r} is unknown: use {', '.join(TASKS)}")
        check_integer("eval.limit", limit, 1, none=True)
        check_integer("eval.batch_size", batch_size, 1)
        if stride is not None:
            check_integer("eval.stride", stride, 1)
        styles = list(styles)
        if not styles or any(style not in STYLES for style in styles):
            raise ValueError(
                f"eval.styles={styles!r} is invalid: use a list of {', '.join(STYLES)}"
            )
        if task == "multiple_choice" and path is None:
            raise ValueError(
                "eval=multiple_choice needs eval.path=<a .jsonl file: ctx, endings, label>"
            )
        self.task, self.batch_size, self.styles, self.stride = task, batch_size, styles, stride
        try:
            if task == "perplexity":  # path None: the embedded corpus
                self.tokens = corpus_tokens(path, cache_dir)[:limit]
                self.count = len(self.tokens) - 1  # targets: every token after the first
            else:  # hellaswag's path None: downloaded once
                load = load_hellaswag if task == "hellaswag" else load_choice_items
                self.items = load(path, limit)
                self.count = len(self.items)
        except ValueError as error:  # the library's messages name its own keys
            raise ValueError(re.sub(r"\b(data\.)?path=", "eval.path=", str(error))) from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if shards_weights(trainer.strategy):  # a rank cannot run the model alone
            raise ValueError(
                f"eval={self.task} cannot run under {type(trainer.strategy).__name__}, where each "
                "rank holds a shard of the weights: evaluate a checkpoint instead, with "
                "`python -m gpt2_lightning.evaluate checkpoint=<run>/checkpoints/last.ckpt`"
            )

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The task's numbers, named as they are logged (without the eval/ prefix)."""
        if self.task == "perplexity":
            found = perplexity(model, self.tokens, self.stride, self.batch_size)
            return {metric: found[metric] for metric in ("loss", "ppl", "bpb")}
        results = {}
        for style in self.styles:
            found = score_choices(model, self.items, style, self.batch_size)
            results |= {f"{style}/{metric}": found[metric] for metric in ("acc", "acc_norm")}
        return results

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.evaluate(pl_module.model).items():
            pl_module.log(f"eval/{name}", value, sync_dist=False)  # already the same on all ranks

    def summary(self, metrics: dict[str, Any]) -> str:
        """The run summary's line: the last values logged, read from callback_metrics (which
        ddp_spawn's processes hand back too)."""
        if self.task == "perplexity":
            formats = {"loss": ".4f", "ppl": ".2f", "bpb": ".4f"}
            if not all(f"eval/{name}" in metrics for name in formats):
                return f"{self.task} (not run)"
            values = ", ".join(
                f"{name} {float(metrics[f'eval/{name}']):{spec}}" for name, spec in formats.items()
            )
            return f"{self.task} {values} on {self.count:,} tokens"
        names = [f"eval/{style}/acc_norm" for style in self.styles]
        if not all(name in metrics for name in names):
            return f"{self.task} (not run)"
        values = ", ".join(
            f"{float(metrics[name]):.4f} ({style})"
            for name, style in zip(names, self.styles, strict=True)
        )
        return f"{self.task} acc_norm {values} on {self.count:,} items"


def logged_metric(trainer: L.Trainer, name: str) -> float:
    """The last value of a scalar the run logged (optimized_metric: what a sweep optimizes)."""
    if name not in trainer.callback_metrics:
        logged = ", ".join(sorted(k for k in trainer.callback_metrics if not k.startswith("fit/")))
        raise ValueError(
            f"optimized_metric={name!r} was not logged by this run: it logged {logged}"
        )
    return float(trainer.callback_metrics[name])


class RNGState(L.Callback):
    """Saves the torch/numpy/python RNG states (dropout, the next epoch's shuffle) in checkpoints,
    which Lightning does not, and puts them back at the first training batch after a resume:
    earlier hooks run before the data loader's iterator is made, which draws random numbers."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # plain lists and numbers, so torch.load(weights_only=True) reads the checkpoint
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(state), gauss],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))


NONE_YET = "none yet"  # what AtomicCheckpointIO says of the last good checkpoint before the first


class CheckpointWriteError(OSError):
    """A checkpoint folder or file that cannot be written (a full disk, a folder under a file, no
    permission): its message is the one line the user sees."""


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always holds the final step: upstream writes it at the end
    only if no "last" was saved earlier, leaving an older one when a run stops between two
    validations. Before the first step it makes sure its folder can be written (upstream finds out
    at the first save) and removes the temporary files of checkpoint writers that were killed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._saving_at_train_end = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if "://" in self.dirpath:  # s3://, gs://, ...: Lightning's fsspec writer
            return
        folder = Path(self.dirpath)
        try:  # on every rank: one failing alone would leave the others waiting for it
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            reason = error.strerror or error
            raise CheckpointWriteError(f"cannot write checkpoints in {folder}: {reason}") from error
        if trainer.is_global_zero and (freed := remove_orphans(folder)):
            rank_zero_info(f"removed orphaned temporary files: {freed / 1e6:.1f} MB in {folder}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Until this run writes its own, the last good checkpoint is the one it resumed from
        # (trainer.ckpt_path is known once the checkpoint is restored, just before this hook).
        io = trainer.strategy.checkpoint_io
        if trainer.ckpt_path and isinstance(io, AtomicCheckpointIO) and io.last_written == NONE_YET:
            io.last_written = f"{trainer.ckpt_path}, which this run resumed from"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._saving_at_train_end = True
            try:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            finally:
                self._saving_at_train_end = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # last.ckpt only: upstream also writes a file named like the best ones, with a loss not
        # measured on its weights. Nothing for a KeyboardInterrupt in one process: it is a second
        # Ctrl-C (StopOnCtrlC turns the first into a stop after the step), mid-step, where the
        # data loader is a batch ahead of the weights. Nor after a write that failed: it would
        # fail again.
        second_ctrl_c = isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1
        failed_write = isinstance(exception, CheckpointWriteError)
        if self._should_save_on_exception(trainer) and not (second_ctrl_c or failed_write):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # When max_steps stops a run mid-epoch, the fit loop has counted the epoch as completed by
        # on_train_end: a resumed run would number its epochs one too high (and a
        # DistributedSampler shuffle by the wrong one). Record it as in progress.
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if self._saving_at_train_end and batches_done < trainer.num_training_batches:
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["completed"] -= 1
                counts["processed"] -= 1
            checkpoint["epoch"] -= 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file beside the checkpoint: Lightning's
    sits in the system's temp folder, and a move from a tmpfs /tmp is a copy that a crash can leave
    half done, where a rename in the folder is all or nothing. The file gets the umask's mode. A
    write that fails is a CheckpointWriteError naming the file, the reason and the last checkpoint
    written; the older ones are left as they were."""

    def __init__(self):
        super().__init__()
        self.last_written = NONE_YET

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # s3://, gs://, ...: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(path)) as out:
                torch.save(checkpoint, out)
        except (OSError, RuntimeError) as error:
            # torch.save raises a RuntimeError on top of a failed write's OSError (its context)
            reason = error if isinstance(error, OSError) else error.__context__
            if not isinstance(reason, OSError):
                raise
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {reason.strerror or reason}; the last good one "
                f"is {self.last_written}"
            ) from error
        if "global_step" in checkpoint:  # not ddp_spawn's hand-over of the weights
            self.last_written = f"{path} (step {checkpoint['global_step']})"


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar as one bar of the run's steps: step of max_steps (a resumed run
    starts where it stopped), loss, val/loss, tokens/s and the time left; a validation inside
    fit shows in that bar instead of stacking one below it. Where its output is not a terminal
    (a log file, CI, nohup, tee), redrawn bars would be hundreds of lines of escape codes: there
    it prints a plain line every log_every steps and per validation."""

    def __init__(self, refresh_rate: int = 1, log_every: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self.log_every = log_every
        self.plain = not sys.stdout.isatty()  # where Lightning's bars write
        self._printed_step = -1
        if self.plain:
            self.disable()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: the run folder says it
        per_device = trainer.logged_metrics.get("train/device/items_per_sec")  # items = tokens
        if per_device is not None:
            items["tok/s"] = f"{float(per_device) * trainer.world_size:,.0f}"
        return items

    def _steps(self, trainer: L.Trainer) -> bool:
        return not self.plain and trainer.max_steps > 0  # else Lightning's bar of each epoch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._steps(trainer):
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.initial = bar.n = trainer.global_step  # tqdm's rate and time left count from it
            bar.set_description("train")  # and redraws

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def init_validation_tqdm(self) -> Tqdm:
        inside_fit = self.trainer.state.fn == "fit" and self._steps(self.trainer)
        if inside_fit:
            self.train_progress_bar.set_description("validating")  # and no bar of its own
        return Tqdm(
            desc=self.validation_description,
            disable=self.is_disabled or inside_fit,
            leave=False,  # gone when it ends: not one more line per validation
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any):
        if self._steps(trainer):
            bar = self.train_progress_bar
            if trainer.global_step != bar.n:  # micro-batches of gradient accumulation share a step
                bar.n = trainer.global_step
                bar.set_postfix(self.get_metrics(trainer, pl_module))  # and redraws
            return
        super().on_train_batch_end(trainer, pl_module, *args)
        step, last = trainer.global_step, trainer.global_step == trainer.max_steps
        if not self.plain or step == self._printed_step or not (step % self.log_every == 0 or last):
            return  # several micro-batches (gradient accumulation) share a step
        self._printed_step = step
        metrics = self.get_metrics(trainer, pl_module)
        loss, speed = metrics.get("train/loss"), metrics.get("tok/s")
        line = f"step {step}/{trainer.max_steps}"
        line += f"  loss {loss:.3f}" if isinstance(loss, float) else ""
        self._print(trainer, line + (f"  tok/s {speed}" if speed else ""))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and self._steps(trainer):
            self.train_progress_bar.set_description("train")
        val = trainer.callback_metrics.get("val/loss")
        if self.plain and not trainer.sanity_checking and val is not None:
            step = f"step {trainer.global_step}/{trainer.max_steps}"
            self._print(trainer, f"{step}  val/loss {val:.3f}")

    @staticmethod
    def _print(trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, flush=True)


class LossCurve(L.Callback):
    """Draws train and val loss against the step, with the learning rate below, into a PNG in the
    run folder (loss.png), after each validation and at the end: a run's curve at a glance, without
    TensorBoard. Rank zero only; the steps of this invocation (a resumed run starts at its step)."""

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename
        self.train: dict[int, float] = {}
        self.val: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train[trainer.global_step] = float(loss)
            self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        self.val[trainer.global_step] = float(loss)
        if self.train:  # the validation before training has nothing to draw against yet
            self.draw(Path(trainer.default_root_dir) / self.filename)

    def draw(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        figure, (top, bottom) = plt.subplots(
            2, 1, figsize=(7, 4.8), dpi=100, sharex=True, height_ratios=[3, 1]
        )
        top.plot(list(self.train), list(self.train.values()), label="train", linewidth=1)
        top.plot(list(self.val), list(self.val.values()), "o-", label="val", markersize=4)
        top.set_ylabel("loss (nats per token)")
        top.legend()
        top.grid(alpha=0.3)
        last_train = self.train[max(self.train)]
        last_val = self.val[max(self.val)] if self.val else float("nan")
        top.set_title(
            f"step {max(self.train)}: train loss {last_train:.3f}, val loss {last_val:.3f}"
        )
        bottom.plot(list(self.lr), list(self.lr.values()), color="gray", linewidth=1)
        bottom.set_ylabel("learning rate")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)


# What torchdata and Lightning print that a user cannot act on: deprecations inside their code,
# the model summary's note that it sizes bf16 weights as fp32, and an advert for a cloud logger.
NOTICES = (
    r"'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Precision bf16-mixed is not supported by the model summary",
)


def _no_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_notices() -> None:
    """Leave NOTICES and Lightning's litlogger tip out of a run's output and train.log."""
    for message in NOTICES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advert)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory rather than unmap each large block (the logits and their
    gradient, hundreds of MB a step, would page-fault afresh every step); as the environment's
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, ctypes.c_int(2**31 - 1))
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))


class KeepFreedMemory(L.Callback):
    """keep_freed_memory() in every process that trains (DDP ranks too)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        keep_freed_memory()


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """Where the run's last.ckpt goes (None without a checkpoint callback)."""
    callback = trainer.checkpoint_callback
    return Path(callback.dirpath) / "last.ckpt" if callback and callback.dirpath else None


class StopOnCtrlC(L.Callback):
    """The first Ctrl-C stops training as SIGTERM does, after the step with last.ckpt saved (a
    KeyboardInterrupt comes mid-step, with the data loader a batch ahead of the weights); a
    second one interrupts at once. After either, says where to resume from; exit_code is what the
    process ends with (128 + the signal, as a shell reports it).

    One process only: every rank of a DDP run gets the Ctrl-C, and two SIGTERMs on a rank left
    the ranks waiting on each other; there Ctrl-C stays Lightning's.
    """

    def __init__(self):
        self.pressed = False
        self._previous = None

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGINT if self.pressed else signal.SIGTERM)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 and self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # Lightning is not running a stage (tokenizing, ...)
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one interrupts
        print("\nCtrl-C: stopping after this step (again to stop at once)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)  # to Lightning's SIGTERM handler, as a scheduler's

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.is_global_zero:
            return
        how = "Ctrl-C" if self.pressed else "SIGTERM"
        if trainer.global_step == 0:
            hint = "before the first step: nothing to resume, run the command again"
        else:
            hint = (
                f"at step {trainer.global_step}: resume with ckpt_path={last_checkpoint(trainer)}"
            )
        print(f"stopped by {how} {hint}", file=sys.stderr)


def validate_final_step(
    trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
) -> int:
    """Validate the final weights if fit did not end with a validation (max_steps not a multiple
    of val_check_interval), so the summary, the curve and a sweep's objective end at the last
    step; return the number of steps trained.

    After fit, not inside it: asking fit to stop early (should_stop) also ends the epoch, and a
    resumed run would start the next one. Plotted at steps - 1, where Lightning plots a validation
    after a step inside fit (ddp_spawn, which starts its processes again with this trainer's
    counts, would plot it at 0).
    """
    # ddp_spawn fits in other processes, and this trainer's step count stays 0: the counts come
    # back in callback_metrics (GPTLightningModule.on_train_end)
    steps = int(trainer.callback_metrics.get("fit/global_step", trainer.global_step))
    validated = int(trainer.callback_metrics.get("fit/validated_at_step", -1))
    if validated != steps and not trainer.interrupted:
        trainer.fit_loop.epoch_loop._batches_that_stepped = steps - 1
        trainer.validate(module, datamodule, verbose=False)
    return steps


def cpu_bf16(cpuinfo: str | None = None) -> str | None:
    """The CPU's flag for native bf16 products (amx_bf16, avx512_bf16) in /proc/cpuinfo, or None
    (none there, or no such file: not Linux)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    found = set(flags.group(1).split()) if flags else set()
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in found), None)


def native_precision(accelerator: str = "auto") -> str:
    """trainer.precision=auto: bf16-mixed where the device multiplies bf16 natively (a GPU from
    Ampere on, a CPU with AMX or AVX512-BF16), else 32-true, since there bf16 is far slower."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_bf16() else "32-true"


def precision_note(trainer: L.Trainer) -> str:
    """Which precision a run trained in, and whether its device has native bf16."""
    if trainer.strategy.root_device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return f"{trainer.precision} (this GPU {'has' if native else 'lacks'} native bf16)"
    flag = cpu_bf16()
    native = f"this CPU has native bf16: {flag}" if flag else "this CPU has no native bf16"
    return f"{trainer.precision} ({native})"


class RunSummary:
    """What a run prints at its end: a sample, the steps, the val loss, where its files are."""

    def __init__(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int,
        resumed_at: int = 0,
    ):
        try:
            check_sampling(max_new_tokens, temperature, top_k)  # now, not after training
        except ValueError as error:
            raise ValueError(f"sample.{error}") from None
        self.sample = dict(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k
        )
        self.seed = seed
        self.resumed_at = resumed_at

    def report(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        steps: int,
        first_val: float | None,
        seconds: float,
    ) -> None:
        if not trainer.is_global_zero:
            return
        last = last_checkpoint(trainer)
        if shards_weights(trainer.strategy):  # rank 0 holds a shard: it cannot sample alone
            text = f"(skipped: run python -m gpt2_lightning.generate checkpoint={last})"
        else:
            text = sample_text(module.model, **self.sample, seed=self.seed)
        val = float(trainer.callback_metrics.get("val/loss", float("nan")))
        since = f"{first_val:.3f} -> " if first_val is not None else ""
        resumed = f" ({steps - self.resumed_at} in this run)" if self.resumed_at else ""
        print(f"\n--- sample (prompt {self.sample['prompt']!r}) ---\n{text}\n---")
        print(f"steps:      {steps}{resumed} in {seconds:.0f} s")
        print(f"val loss:   {since}{val:.3f}")
        print(f"precision:  {precision_note(trainer)}")
        for callback in trainer.callbacks:
            if isinstance(callback, Evaluation):
                print(f"eval:       {callback.summary(trainer.callback_metrics)}")
        print(f"checkpoint: {last if last and last.is_file() else '(none written)'}")
        if any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            print(f"tensorboard --logdir {Path(trainer.default_root_dir)}")
