"""The LightningModule: GPT plus its loss, metrics, optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, grad_norm, rank_zero_warn
from torchmetrics import MeanMetric

from gpt2_lightning.checks import is_integer, is_number
from gpt2_lightning.model import GPT, GPTConfig
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.weights import load_weights


class WarmupCosine:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to min_ratio (1: constant).
    Built from the run's config: a resumed run does not take it back from its checkpoint."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = ("cosine", "constant")


def check_optimization(optimizer: dict[str, Any], scheduler: dict[str, Any]) -> None:
    """Raise ValueError naming the first optimizer or scheduler setting that is invalid."""
    for group, settings, keys in (
        ("optimizer", optimizer, ("lr", "weight_decay", "betas", "eps")),
        ("scheduler", scheduler, ("name", "warmup_steps")),
    ):
        missing = [key for key in keys if key not in settings]
        if missing:
            raise ValueError(
                f"{group} has no {', '.join(missing)}: give {', '.join(keys)} (as in conf/{group}/)"
            )
    lr, decay, betas, eps = (optimizer[k] for k in ("lr", "weight_decay", "betas", "eps"))
    if not is_number(lr) or lr < 0:
        raise ValueError(f"optimizer.lr={lr!r} is invalid: must be a number >= 0")
    if not is_number(decay) or decay < 0:
        raise ValueError(f"optimizer.weight_decay={decay!r} is invalid: must be a number >= 0")
    if not (
        isinstance(betas, list | tuple)
        and len(betas) == 2
        and all(is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(
            f"optimizer.betas={betas!r} is invalid: must be two numbers in [0, 1), e.g. [0.9,0.95]"
        )
    if not is_number(eps) or eps <= 0:
        raise ValueError(f"optimizer.eps={eps!r} is invalid: must be a number > 0")
    name, warmup = scheduler["name"], scheduler["warmup_steps"]
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name!r} is unknown: valid are {', '.join(SCHEDULES)}")
    if not is_integer(warmup) or warmup < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup!r} is invalid: must be an integer >= 0")
    if name == "cosine":
        if "min_lr" in scheduler:  # the name of the floor before 2026-11-25 (README changelog)
            raise ValueError(
                f"scheduler.min_lr={scheduler['min_lr']!r} is no longer read: give the floor as "
                "scheduler.min_lr_ratio, a fraction of optimizer.lr (e.g. 0.1)"
            )
        total, ratio = scheduler.get("total_steps"), scheduler.get("min_lr_ratio", 0.1)
        if not is_integer(total) or total < 1:
            raise ValueError(
                f"scheduler.total_steps={total!r} is invalid: the cosine schedule needs a "
                "positive horizon (set trainer.max_steps or scheduler.total_steps)"
            )
        if not is_number(ratio) or not 0 <= ratio <= 1:
            raise ValueError(f"scheduler.min_lr_ratio={ratio!r} is invalid: must be in [0, 1]")
        if warmup >= total:
            rank_zero_warn(
                f"scheduler.warmup_steps={warmup} is not below scheduler.total_steps={total}: the "
                "learning rate warms up to optimizer.lr at the end of the run and never decays"
            )


class GPTLightningModule(L.LightningModule):
    """Trains GPT on next-token prediction.

    Arguments are plain dicts (the composed Hydra groups), saved as hyperparameters so a
    checkpoint can be read with torch.load(weights_only=True) and rebuilt without Hydra.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        compile: bool = False,
        init_from: str | None = None,
    ):
        super().__init__()
        check_optimization(optimizer, scheduler)
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} is invalid: use true or false")
        pretrained = None
        if init_from is not None:
            # Fine-tuning: the architecture comes from the weights, only dropout is this run's;
            # the checkpoints record it (GPT.from_checkpoint and a resume read it from there).
            pretrained = load_weights(str(init_from))
            model = {**pretrained.cfg.to_dict(), "dropout": model.get("dropout", 0.0)}
        try:
            cfg = GPTConfig(**model)
        except (TypeError, ValueError) as error:  # named as on the command line
            raise ValueError(f"model.{error}") from None
        self.save_hyperparameters()
        self.model = GPT(cfg)
        if pretrained is not None:
            self.model.load_state_dict(pretrained.state_dict())
        if compile:
            # In place, so parameter names (and checkpoints) are the same as without compile.
            self.model.compile()
        self.val_loss = MeanMetric()  # token-weighted mean, synced across ranks
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor (MFU)
        self.validated_at_step: int | None = None  # the global step of the last validation

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)  # (B, T, vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))
        self.validated_at_step = self.global_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before Lightning loads the weights: another architecture would be a size mismatch
        # traceback. Dropout may differ (a resumed run may change it).
        for key, value in checkpoint["hyper_parameters"]["model"].items():
            ours = self.hparams.model.get(key)
            if key != "dropout" and ours != value:
                raise ValueError(
                    f"ckpt_path holds a model with {key}={value!r}, not model.{key}={ours!r}: "
                    "resume with the run's model settings, or start a new run from its weights "
                    "with init_from=<the .ckpt>"
                )
        # Only the step count comes back: LambdaLR would restore its multiplier's attributes, and
        # a run resumed with a larger trainer.max_steps would stay on the old, finished curve.
        for state in checkpoint.get("lr_schedulers", []):
            if "lr_lambdas" in state:
                state["lr_lambdas"] = [None] * len(state["lr_lambdas"])

    def on_train_start(self) -> None:
        # After a resume the optimizer holds the lr of the checkpoint's schedule: set this run's,
        # so that a new horizon applies from the first step (the same number when unchanged).
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
            for group, base, factor in zip(
                scheduler.optimizer.param_groups, scheduler.base_lrs, factors, strict=True
            ):
                group["lr"] = base * factor

    def on_train_end(self) -> None:
        # Read after fit (validate_final_step): ddp_spawn's processes hand back only the weights
        # and callback_metrics, so the counts travel in the latter.
        self.trainer.callback_metrics.update(
            {
                "fit/global_step": torch.tensor(self.global_step),
                "fit/validated_at_step": torch.tensor(
                    -1 if self.validated_at_step is None else self.validated_at_step
                ),
            }
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the clip threshold is compared with.
        self.log("train/grad_norm", grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"])

    def _scaled(self) -> bool:
        """Whether the precision plugin scales the loss (16-mixed's GradScaler)."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        return getattr(plugin, "scaler", None) is not None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's MixedPrecision refuses to clip a fused optimizer's gradients in case a loss
        # scaler had left them for the optimizer to unscale; bf16-mixed has no scaler, and there
        # its parent's clipping, which it would call next, is right.
        plugin = self.trainer.precision_plugin
        if type(plugin) is not MixedPrecision or plugin.scaler is not None or not gradient_clip_val:
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    def setup(self, stage: str) -> None:
        # The model against the data it will see; then the FLOPs of one batch, measured on the
        # meta device, for the ThroughputMonitor's MFU where the device's peak is known.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        vocab = get_tokenizer().n_vocab  # the data's ids: an IndexError in the first step else
        if self.model.cfg.vocab_size < vocab:
            raise ValueError(
                f"model.vocab_size={self.model.cfg.vocab_size} is too small for the GPT-2 "
                f"tokenizer's {vocab} ids: use >= {vocab}"
            )
        if datamodule.context_length > self.model.cfg.context_length:
            raise ValueError(
                f"data.context_length={datamodule.context_length} is longer than "
                f"model.context_length={self.model.cfg.context_length}: windows must fit the "
                "model (data's follows the model's by default)"
            )
        with torch.device("meta"):
            model = GPT(self.model.cfg)
            x = torch.zeros(datamodule.batch_size, datamodule.context_length, dtype=torch.long)
        self.flops_per_batch = measure_flops(model, lambda: model(x), lambda y: y.sum())

    def configure_optimizers(self):
        opt = self.hparams.optimizer
        # Weight decay on matrices (linear and embedding weights) only; biases and norm gains
        # are left alone, as in GPT-2 and nanoGPT.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {
                "name": "decay",  # LearningRateMonitor logs lr-AdamW/<name>
                "params": [p for p in params if p.dim() >= 2],
                "weight_decay": opt["weight_decay"],
            },
            {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # Fused: one kernel for all parameters (the 124M optimizer step 3.5x faster on CPU). With
        # a loss scaler (16-mixed) Lightning refuses to clip a fused optimizer's gradients (the
        # optimizer would unscale them itself): there AdamW keeps its default.
        fused = self.device.type in ("cuda", "cpu") and not self._scaled()
        optimizer = torch.optim.AdamW(
            groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], fused=fused
        )
        sched = self.hparams.scheduler
        cosine = sched["name"] == "cosine"
        factor = WarmupCosine(
            sched["warmup_steps"],
            sched["total_steps"] if cosine else 1,
            sched.get("min_lr_ratio", 0.1) if cosine else 1.0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        schedule = {"scheduler": scheduler, "interval": "step"}  # stepped every optimizer step
        return {"optimizer": optimizer, "lr_scheduler": schedule}
