"""`python -m gpt2_lightning.train [key=value ...]`: compose the config, train, sample.

lightning-hydra-template's shape: compose -> instantiate the data, the module, callbacks, loggers
and the Trainer from conf/ -> validate -> fit -> summary -> the optimized_metric (val/loss) sweeps
optimize. Every knob lives in conf/ (`--cfg job`)."""

from __future__ import annotations

import math
import sys
import time

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gpt2_lightning.callbacks import (
    AtomicCheckpointIO,
    ProgressBar,
    RunSummary,
    StopOnCtrlC,
    logged_metric,
    native_precision,
    quiet_notices,
    validate_final_step,
)
from gpt2_lightning.checks import check_integer, is_integer, is_number
from gpt2_lightning.cli import check_command_line, one_line_errors
from gpt2_lightning.weights import read_checkpoint

OmegaConf.register_new_resolver("native_precision", native_precision)  # conf/trainer/default.yaml


def check_run(cfg: DictConfig) -> None:
    """The keys read here, and the Trainer's that Lightning lets through to fail deep in fit."""
    OmegaConf.to_container(cfg, resolve=True)  # names a key that does not resolve; instantiate not
    if not isinstance(cfg.val_before_fit, bool):
        raise ValueError(f"val_before_fit={cfg.val_before_fit!r} is invalid: use true or false")
    if not is_integer(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed!r} is invalid: must be an integer in [0, 2**32)")
    for key, low in (("max_steps", -1), ("accumulate_grad_batches", 1)):
        check_integer(f"trainer.{key}", cfg.trainer.get(key, low), low)
    interval = cfg.trainer.get("val_check_interval")
    if is_number(interval) and interval <= 0:
        raise ValueError(
            f"trainer.val_check_interval={interval!r} is invalid: must be a number of batches "
            ">= 1, a fraction of an epoch in (0, 1], a duration or null"
        )


def refuse_relaunch_in_multirun(trainer: L.Trainer) -> None:
    """Refuse a multirun whose strategy starts its ranks by running this command again (ddp): in
    a Hydra multirun each of them would run the whole sweep again instead of joining one job."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise ValueError(
            f"a Hydra multirun cannot use {type(trainer.strategy).__name__}, which starts its "
            "other ranks by running this command again (each would re-run the whole sweep): "
            "use trainer.strategy=ddp_spawn, or run the jobs one by one"
        )


def objects(group: DictConfig | None) -> list:
    """The objects of a config group (callbacks, logger); `~group` drops them all."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def train(cfg: DictConfig) -> float:
    """Train as cfg says; return the final value of the metric optimized_metric names."""
    check_run(cfg)
    quiet_notices()
    resumed_at = read_checkpoint(cfg.ckpt_path, "ckpt_path")["global_step"] if cfg.ckpt_path else 0
    summary = RunSummary(**cfg.sample, seed=cfg.seed, resumed_at=resumed_at)
    L.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.module)
    cfg.model = module.hparams.model  # init_from: the weights' architecture, which data follows
    datamodule = instantiate(cfg.data)
    callbacks, loggers = objects(cfg.get("callbacks")), objects(cfg.get("logger"))
    callbacks += [instantiate(cfg.eval)] if cfg.get("eval") else []  # conf/eval/: the group's node
    if not loggers:  # LearningRateMonitor refuses to run without a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # and Lightning a bar it must hide
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    stop = StopOnCtrlC()
    trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, stop], logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    refuse_relaunch_in_multirun(trainer)

    start, first_val = time.perf_counter(), None
    try:
        if cfg.val_before_fit and not cfg.ckpt_path:
            first_val = trainer.validate(module, datamodule, verbose=False)[0]["val/loss"]
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        steps = validate_final_step(trainer, module, datamodule)
    except SIGTERMException:  # Lightning finished the step, and LastCheckpoint saved last.ckpt
        sys.exit(stop.exit_code)
    summary.report(trainer, module, steps, first_val, time.perf_counter() - start)
    return logged_metric(trainer, cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float:
    value = train(cfg)
    # Optuna fails the whole sweep on a NaN (a run that diverged): count it as the worst instead.
    worst = -math.inf if "max" in str(HydraConfig.get().sweeper.get("direction")) else math.inf
    return value if math.isfinite(value) else worst


if __name__ == "__main__":
    check_command_line("train", sys.argv[1:])
    main()
