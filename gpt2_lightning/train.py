"""`python -m gpt2_lightning.train [key=value ...]`: compose the config, train, sample.

Every knob lives in conf/ (see `--cfg job` for the composed config); this file only wires the
instantiated pieces together, the shape of lightning-hydra-template's train.py.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import CompactHydraException, HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gpt2_lightning.callbacks import AtomicCheckpointIO, ProgressBar, sample_text, shards_weights
from gpt2_lightning.cli import CONF, compose_config, composition_error, one_line, parse, unknown_key
from gpt2_lightning.generate import check_sampling
from gpt2_lightning.model import GPTConfig
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.weights import WeightsError, load_weights


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning each large block to the OS.

    Every step allocates and frees the (B, T, 50257) logits and their gradient, hundreds of MB.
    By default glibc maps such blocks fresh and unmaps them on free, so each step pays for page
    faults on all of it; keeping them in the heap makes a tiny-model CPU step ~1.7x faster here.
    Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, ctypes.c_int(2**31 - 1))
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))


def log_lightning_to_file() -> None:
    """Write Lightning's log lines (devices, seed, checkpoints, why fit stopped) to train.log too.

    Lightning gives its loggers their own console handler and stops them propagating when it is
    imported, before Hydra sets up logging, so Hydra's log file would otherwise stay empty. The
    file handlers are replaced, not added: each job of a multirun has its own train.log.
    """
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        kept = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        logger.handlers = kept + files


def check_checkpoint(path: str, model: DictConfig | None) -> dict[str, Any]:
    """Fail early, with one line, on a ckpt_path that does not exist, cannot be read, or holds
    another architecture than the config's model (resume needs the same one); otherwise the
    checkpoint's model settings and step: {"model": {...}, "global_step": n}. model=None
    compares nothing."""
    if Path(path).is_dir():
        raise ValueError(
            f"ckpt_path={path!r} is a folder: give a .ckpt file in it, e.g. "
            f"{Path(path) / 'last.ckpt'}"
        )
    if not Path(path).is_file():
        raise ValueError(
            f"ckpt_path={path!r} does not exist: give a .ckpt written by a training run, "
            "e.g. outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    try:
        # mmap: checks the archive without reading the tensors into memory
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved_model, step = saved["hyper_parameters"]["model"], int(saved.get("global_step", 0))
    except Exception as error:
        raise ValueError(
            f"ckpt_path={path!r} is not a readable Lightning checkpoint "
            f"({type(error).__name__}): give a .ckpt written by a training run"
        ) from None
    for key, value in saved_model.items() if model is not None else ():
        if key != "dropout" and model.get(key) != value:
            raise ValueError(
                f"ckpt_path={path!r} holds a model with {key}={value!r}, not model.{key}="
                f"{model.get(key)!r}: resume with the run's model settings, or start a new run "
                "from its weights with init_from=<the .ckpt>"
            )
    return {"model": saved_model, "global_step": step}


def check_config_choices(args: list[str]) -> None:
    """Refuse, in one line, a config-group choice that conf/ does not have (model=125M, ...).

    Hydra's own message for it is a dozen lines (options, search path, a hint); this check reads
    the overrides with Hydra's parser, sweeps included, and leaves everything else to Hydra.
    Config folders added with --config-dir or hydra.searchpath may hold more options: skipped then.
    """
    if any(re.match(r"(-cd|--config-dir|-cp|--config-path|hydra\.searchpath)\b", a) for a in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a])
    except HydraException:
        return  # not an override Hydra can read: its own message says why
    for override in overrides:
        group = CONF / override.key_or_group
        if not group.is_dir() or override.is_delete():
            continue
        if override.is_sweep_override():
            if override.value_type != ValueType.SIMPLE_CHOICE_SWEEP:
                continue  # choice(), glob(), range(): left to Hydra
            values = [v for v in override.sweep_string_iterator() if not v.startswith("[")]
        else:
            value = override.value()  # one option, or a list of them (logger=[tensorboard,csv])
            values = value if isinstance(value, list) else [value]
        name = override.key_or_group
        options = ", ".join(sorted((f.stem for f in group.glob("*.yaml")), key=natural_order))
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # model=${oc.env:SIZE}: Hydra resolves it
            if value is None:
                raise ValueError(f"{name}=null is not an option: valid are {options}, or ~{name}")
            if not (group / f"{str(value).removesuffix('.yaml')}.yaml").is_file():
                raise ValueError(f"{name}={value} is unknown: valid are {options}")


def check_overrides(args: list[str]) -> None:
    """Compose the command line once before Hydra does, and refuse in one line, before a run
    folder is made or a sweep starts, what would fail there: a key the config does not have or an
    override Hydra cannot read (Hydra's own messages take several lines), and a setting that every
    job of a sweep would fail on (each failed Optuna trial would be tried again, and a sweep in
    which all fail ends with the plugin's traceback).

    Hydra's compose API gives the config that Hydra will give train(). A swept key's values are
    left to the jobs, except the first of a list (x=a,b), which shows whether the key exists.
    Anything this check cannot judge for sure is left to Hydra and train(): command lines with
    flags (--cfg, --help, --config-dir, ...), errors that are not ours, interpolations.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    texts = [a for a in args if not a.startswith("-")]
    if any(t.startswith("hydra.searchpath") for t in texts):
        return
    fixed, given, swept = [], {}, {}
    for text in texts:
        override = parse(text)
        if not override.is_sweep_override():
            fixed.append(text)
        elif override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            first = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
            fixed.append(first)
            given[first] = text
            swept[override.key_or_group] = override
        else:
            swept[override.key_or_group] = override
    try:
        cfg = compose_config("train", fixed)
    except HydraException as error:
        raise ValueError(composition_error("train", error, fixed, given)) from None
    except Exception:
        return  # Hydra's own report will say what is wrong
    for key, override in swept.items():  # range(), interval(), ...: does the key exist?
        if override.get_key_element().startswith("+") or key.startswith("hydra") or "/" in key:
            continue
        try:
            missing = OmegaConf.select(cfg, key, default=KeyError) is KeyError
        except OmegaConfBaseException:
            return
        if missing:
            raise ValueError(unknown_key("train", key, override.input_line, fixed))
    # The checks every job makes, made once. In a sweep a mistake may be one of some jobs only:
    # it is left to them when it names a key that varies (a swept key, or one in the search
    # space of Optuna that the command line does not pin) or when interpolations may hide one.
    pinned = {o.split("=", 1)[0].lstrip("+~") for o in fixed if o not in given}
    varied = set(swept) | (set(cfg.hydra.sweeper.get("params") or {}) - pinned)
    if (varied and any("${" in o for o in fixed)) or cfg.init_from or cfg.hydra.job.chdir:
        return  # init_from: the model comes from the weights; chdir: paths are the run's
    try:
        check_settings(cfg)
        check_model(cfg)
        try:
            instantiate(cfg.data)  # checks its sizes and data.path; reads no text yet
        except InstantiationException as error:
            raise user_error(error) or error from None
    except OmegaConfBaseException:
        return  # e.g. ${hydra:...}, which only resolves inside Hydra's run
    except ValueError as error:
        if not _involves(str(error), varied):
            raise
    except Exception:
        return


def _involves(message: str, keys: set[str]) -> bool:
    """Whether an error message names one of keys, a key inside or around one, or its last part
    (GPTConfig names model.num_heads num_heads)."""
    if "experiment" in keys:
        return True
    named = set(re.findall(r"[a-z_]+(?:\.[a-z_]+)*", message))
    inside = [(n, k) for n in named for k in keys]
    return any(
        n == k or n.startswith(f"{k}.") or k.startswith(f"{n}.") or k.endswith(f".{n}")
        for n, k in inside
    )


def natural_order(name: str) -> tuple[int, str]:
    """124M before 355M before 1558M, then names without a number."""
    number = re.match(r"\d+", name)
    return (int(number.group()) if number else 1 << 62, name)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(cfg: DictConfig) -> None:
    """Fail in one line, before anything is built, on a setting that would otherwise fail deep
    inside a run (a division by zero in Lightning's loop, a sample after the first validation)
    or be misread (compile=maybe taken as true)."""
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ValueError(
            "data.path is required here (data=text, or an experiment for your corpus): give a "
            "text file, a folder of *.txt files or a glob, e.g. data.path=my_texts/"
        )
    if cfg.data.get("val_fraction") == 0:
        raise ValueError(
            "data.val_fraction=0 leaves nothing to validate on, and a run validates (before "
            "training, every trainer.val_check_interval steps, at the end): give a fraction in "
            "(0, 1)"
        )
    for key in ("compile", "val_before_fit"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key}={cfg[key]!r} is invalid: use true or false")
    if not _integer(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed!r} is invalid: must be an integer in [0, 2**32)")
    try:
        check_sampling(cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_k)
    except ValueError as error:
        raise ValueError(f"sample.{error}") from None
    max_steps = cfg.trainer.get("max_steps", -1)
    if not _integer(max_steps) or max_steps < -1:
        raise ValueError(
            f"trainer.max_steps={max_steps!r} is invalid: must be an integer >= 0 (-1: no limit)"
        )
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if not _integer(accumulate) or accumulate < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate!r} is invalid: must be an integer >= 1"
        )
    interval = cfg.trainer.get("val_check_interval")
    fraction_over_one = isinstance(interval, float) and interval > 1
    if interval is not None and (
        isinstance(interval, bool | str) or interval <= 0 or fraction_over_one
    ):
        raise ValueError(
            f"trainer.val_check_interval={interval!r} is invalid: must be a number of batches "
            ">= 1, a fraction of an epoch in (0, 1], or null"
        )


def check_model(cfg: DictConfig) -> None:
    """The model settings, named as on the command line, and against the data they will see."""
    try:
        model = GPTConfig(**cfg.model)
    except OmegaConfBaseException:
        raise  # an interpolation that does not resolve: OmegaConf names the key
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    vocab = get_tokenizer().n_vocab
    if model.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} is too small for the GPT-2 tokenizer's {vocab} "
            f"ids: use >= {vocab}"
        )
    length = cfg.data.context_length
    if _integer(length) and length > model.context_length:
        raise ValueError(
            f"data.context_length={length} is longer than model.context_length="
            f"{model.context_length}: windows must fit the model (data's follows the model's "
            "by default)"
        )


def check_not_relaunched_in_multirun(trainer: L.Trainer) -> None:
    """Refuse a multirun whose strategy starts its ranks by running this command again (ddp, fsdp).

    Lightning starts rank 1, 2, ... as `python -m gpt2_lightning.train <the same arguments>`; in a
    Hydra multirun each of them would run the whole sweep again instead of joining one job.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise ValueError(
            f"a Hydra multirun cannot use {type(trainer.strategy).__name__}, which starts its "
            "other ranks by running this command again (each would re-run the whole sweep): "
            "use trainer.strategy=ddp_spawn, or run the jobs one by one"
        )


class CreateSweepDir(Callback):
    """Hydra callback: create the sweep folder before the Optuna sweeper opens the study in it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # SQLite creates its file but not the folder, and Hydra creates it only when launching.
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


class _CtrlC:
    pressed = False


@contextmanager
def stop_after_the_step_on_ctrl_c(enabled: bool = True) -> Iterator[_CtrlC]:
    """The first Ctrl-C stops training as SIGTERM does: after the current step, with last.ckpt
    saved. A KeyboardInterrupt comes in the middle of a step, and the checkpoint Lightning saves
    for it has a data loader one batch ahead of its weights (the resumed run skips a batch). A
    second Ctrl-C interrupts at once.

    For one process only (enabled=False leaves Ctrl-C to Lightning): every rank of a DDP run
    gets the Ctrl-C, and Lightning's SIGTERM handler, which rank 0 also forwards to the others,
    broadcasts from inside the handler: two SIGTERMs on a rank left the ranks waiting on each
    other (tried here).
    """
    ctrl_c = _CtrlC()
    if not enabled:
        yield ctrl_c
        return

    def handler(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # Lightning is not running a stage (setup, tokenizing, ...)
        ctrl_c.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one interrupts
        print("\nCtrl-C: stopping after this step (again to stop at once)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)  # to Lightning's SIGTERM handler, as a scheduler's

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


def run_stages(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    cfg: DictConfig,
) -> tuple[float | None, int]:
    """The validation before training, training, and a validation of the final step if training
    did not end with one; the first val/loss (None if none) and the number of steps."""
    first_val = None
    if cfg.val_before_fit and not cfg.ckpt_path:
        first_val = trainer.validate(module, datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    # Read from callback_metrics (module.on_train_end): under ddp_spawn, fit ran in other
    # processes and this trainer's own step count is still 0.
    steps = int(trainer.callback_metrics.get("fit/global_step", trainer.global_step))
    validated = int(trainer.callback_metrics.get("fit/validated_at_step", -1))
    if validated != steps and not trainer.interrupted:
        # max_steps is not a multiple of val_check_interval: validate the final weights too, so
        # the summary, the TensorBoard curve and a sweep's objective end at the last step. After
        # fit, not inside it: asking fit to stop early (should_stop) would also end the epoch,
        # and a resumed run would start the next one. Its point is plotted at steps - 1, where
        # Lightning plots a validation after a step inside fit (and ddp_spawn, which starts its
        # processes again with this trainer's counts, would plot it at 0).
        trainer.fit_loop.epoch_loop._batches_that_stepped = steps - 1
        trainer.validate(module, datamodule, verbose=False)
    return first_val, steps


def train(cfg: DictConfig) -> float:
    """Train as cfg says; return the final val/loss (the objective of sweeps)."""
    log_lightning_to_file()
    check_settings(cfg)
    resumed_at = 0
    if cfg.ckpt_path:
        if cfg.init_from:
            # Resuming a fine-tune with its own command: its architecture came from init_from,
            # and the checkpoint holds it (init_from's weights are not read again).
            saved = check_checkpoint(cfg.ckpt_path, None)
            with open_dict(cfg):
                cfg.model = {**saved["model"], "dropout": cfg.model.dropout}
        resumed_at = check_checkpoint(cfg.ckpt_path, cfg.model)["global_step"]
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    pretrained = None
    if cfg.init_from and not cfg.ckpt_path:
        # Fine-tuning: the architecture comes from the weights; only dropout stays ours.
        pretrained = load_weights(str(cfg.init_from))
        with open_dict(cfg):
            cfg.model = {**pretrained.cfg.to_dict(), "dropout": cfg.model.dropout}
    check_model(cfg)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    if pretrained is not None:
        module.model.load_state_dict(pretrained.state_dict())
    # ~callbacks / ~logger on the command line drop the whole group
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it must hide
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    try:
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
        )
    except InstantiationException as error:
        # Lightning's own checks of its arguments (devices=0, accelerator=tpu, ...)
        cause = error.__cause__
        if isinstance(cause, TypeError | MisconfigurationException | ModuleNotFoundError):
            raise ValueError(f"trainer: {cause}") from None
        raise
    check_not_relaunched_in_multirun(trainer)

    start = time.perf_counter()
    last_ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    with stop_after_the_step_on_ctrl_c(enabled=trainer.world_size == 1) as ctrl_c:
        try:
            first_val, steps = run_stages(trainer, module, datamodule, cfg)
        except SIGTERMException:
            # Lightning finished the step (or the validation batch) and, in training,
            # LastCheckpoint(save_on_exception) wrote last.ckpt.
            how, code = ("Ctrl-C", 130) if ctrl_c.pressed else ("SIGTERM", 128 + signal.SIGTERM)
            if trainer.is_global_zero:
                if trainer.global_step == resumed_at == 0:
                    hint = "before the first step: nothing to resume, run the command again"
                else:
                    hint = f"at step {trainer.global_step}: resume with ckpt_path={last_ckpt}"
                print(f"stopped by {how} {hint}", file=sys.stderr)
            sys.exit(code)  # 128 + the signal: what a shell reports for a process it ended
    last_val = float(trainer.callback_metrics.get("val/loss", float("nan")))

    if trainer.is_global_zero:
        if shards_weights(trainer.strategy):  # rank 0 holds a shard: it cannot sample alone
            text = f"(skipped: run python -m gpt2_lightning.generate checkpoint={last_ckpt})"
        else:
            text = sample_text(module.model, **cfg.sample, seed=cfg.seed)
        since = f"{first_val:.3f} -> " if first_val is not None else ""
        print(f"\n--- sample (prompt {cfg.sample.prompt!r}) ---\n{text}\n---")
        resumed = f" ({steps - resumed_at} in this run)" if cfg.ckpt_path else ""
        print(f"steps:      {steps}{resumed} in {time.perf_counter() - start:.0f} s")
        print(f"val loss:   {since}{last_val:.3f}")
        print(f"checkpoint: {last_ckpt if last_ckpt.is_file() else '(none written)'}")
        if any(isinstance(logger, TensorBoardLogger) for logger in loggers):
            print(f"tensorboard --logdir {cfg.run_dir}")
    return last_val


EXPECTED_ERRORS = (ValueError, OSError, WeightsError, OmegaConfBaseException)


def user_error(error: BaseException) -> BaseException | None:
    """The config mistake behind error, or None for a bug."""
    # instantiate wraps what a constructor raised (a bad data.path, model.num_heads, ...).
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, EXPECTED_ERRORS) else None


class JobConfigError(CompactHydraException):
    """A config mistake inside a multirun job; Hydra prints it as its message alone."""


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        val_loss = train(cfg)
    except (*EXPECTED_ERRORS, InstantiationException) as error:
        cause = user_error(error)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # A failed job, not the end of the process: Optuna marks the trial FAIL and goes on;
            # the basic sweeper stops, and Hydra prints this one line (a compact error).
            raise JobConfigError(f"error: {one_line(cause)}") from None
        # Hydra prints escaping exceptions as tracebacks; expected mistakes get one line.
        print(f"error: {one_line(cause)}", file=sys.stderr)
        sys.exit(1)
    # The sweep's objective. Optuna fails the whole sweep on a NaN (a run that diverged); such a
    # run counts as the worst instead.
    return val_loss if math.isfinite(val_loss) else math.inf


if __name__ == "__main__":
    try:
        check_config_choices(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        main()
    except KeyboardInterrupt:  # outside a step (see stop_after_the_step_on_ctrl_c)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
