"""GPTLightningModule: it learns, its schedule, and its optimizer and schedule settings."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpt2_lightning.data import TextDataModule
from gpt2_lightning.module import GPTLightningModule


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Lightning trains the model; Hydra composes the config. " * 12)
    L.seed_everything(0)
    data = TextDataModule(path=str(path), context_length=16, batch_size=4, val_fraction=0.0)
    data.cache_dir = str(tmp_path / "cache")
    model = dict(vocab_size=50257, context_length=16, emb_dim=32, num_layers=2, num_heads=2)
    module = GPTLightningModule(
        model=model,
        optimizer=dict(lr=3e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8),
        scheduler=dict(name="constant", warmup_steps=0),
    )
    data.setup()
    batch = next(iter(data.train_dataloader()))
    before = module.loss(batch).item()
    trainer = L.Trainer(
        max_steps=80,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    one_batch = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    trainer.fit(module, train_dataloaders=one_batch)
    after = module.loss(batch).item()
    assert before > 10.0
    assert after < 1.0


TINY_MODEL = dict(vocab_size=64, context_length=8, emb_dim=16, num_layers=1, num_heads=2)
ADAMW = dict(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
COSINE = dict(name="cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)


def learning_rates(scheduler_settings: dict, steps: int) -> list[float]:
    """The learning rate of each of the first steps under the module's schedule."""
    module = GPTLightningModule(model=TINY_MODEL, optimizer=ADAMW, scheduler=scheduler_settings)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_warms_up_then_decays_to_the_ratio_of_the_peak():
    lrs = learning_rates(COSINE, 12)
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3])  # warmup, then the peak
    assert lrs[6] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    assert lrs[10:] == pytest.approx([1e-4, 1e-4])  # 0.1 x the peak, then held


def test_the_old_min_lr_key_is_named_with_its_replacement():
    old = {k: v for k, v in COSINE.items() if k != "min_lr_ratio"}
    with pytest.raises(ValueError, match=r"^scheduler.min_lr=0.0003 is no longer read: .*ratio"):
        GPTLightningModule(model=TINY_MODEL, optimizer=ADAMW, scheduler={**old, "min_lr": 3e-4})


@pytest.mark.parametrize(
    ("group", "key", "value", "message"),
    [
        ("optimizer", "lr", "abc", "optimizer.lr='abc' is invalid: must be a number >= 0"),
        ("optimizer", "weight_decay", -1, "optimizer.weight_decay=-1 is invalid"),
        ("optimizer", "betas", [0.9], "optimizer.betas=[0.9] is invalid: must be two numbers"),
        ("optimizer", "betas", [2, 3], "optimizer.betas=[2, 3] is invalid"),
        ("optimizer", "eps", 0, "optimizer.eps=0 is invalid: must be a number > 0"),
        ("scheduler", "name", "linear", "scheduler.name='linear' is unknown: valid are cosine"),
        ("scheduler", "warmup_steps", -5, "scheduler.warmup_steps=-5 is invalid"),
        ("scheduler", "min_lr_ratio", 2, "scheduler.min_lr_ratio=2 is invalid: must be in [0, 1]"),
        ("scheduler", "total_steps", 0, "scheduler.total_steps=0 is invalid"),
    ],
)
def test_bad_optimizer_or_schedule_setting_is_named(group, key, value, message):
    settings = {"optimizer": dict(ADAMW), "scheduler": dict(COSINE)}
    settings[group][key] = value
    with pytest.raises(ValueError) as error:
        GPTLightningModule(model=TINY_MODEL, **settings)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("group", "key", "message"),
    [
        ("optimizer", "weight_decay", "optimizer has no weight_decay: give lr, weight_decay,"),
        ("scheduler", "warmup_steps", "scheduler has no warmup_steps: give name, warmup_steps"),
        ("scheduler", "total_steps", "scheduler.total_steps=None is invalid: the cosine"),
    ],
)
def test_a_missing_optimizer_or_schedule_setting_is_named(group, key, message):
    settings = {"optimizer": dict(ADAMW), "scheduler": dict(COSINE)}
    del settings[group][key]
    with pytest.raises(ValueError) as error:  # was a KeyError
        GPTLightningModule(model=TINY_MODEL, **settings)
    assert str(error.value).startswith(message)


def test_a_warmup_as_long_as_the_run_is_warned_about():
    scheduler = {**COSINE, "warmup_steps": 10, "total_steps": 10}
    with pytest.warns(UserWarning, match=r"scheduler.warmup_steps=10 is not below scheduler.tot"):
        GPTLightningModule(model=TINY_MODEL, optimizer=ADAMW, scheduler=scheduler)
    with warnings.catch_warnings(record=True) as caught:  # a warmup shorter than the run: none
        warnings.simplefilter("always")
        GPTLightningModule(model=TINY_MODEL, optimizer=ADAMW, scheduler=COSINE)
    assert [str(w.message) for w in caught if "warmup" in str(w.message)] == []


def test_constant_schedule_warms_up_then_holds_the_peak():
    lrs = learning_rates(dict(name="constant", warmup_steps=2), 5)
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_adamw_is_fused_and_its_gradients_clipped_in_full_and_bf16_precision(precision):
    """bf16-mixed has no loss scaler, so the fused optimizer and Lightning's clipping by norm work
    together there as in fp32 (Lightning's mixed-precision plugin would refuse them)."""
    norms = []

    class ClippedNorm(L.Callback):  # after the step the gradients are still the clipped ones
        def on_train_batch_end(self, trainer, module, *args):
            grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            norms.append(torch.stack(grads).norm().item())

    L.seed_everything(0)
    module = GPTLightningModule(model=TINY_MODEL, optimizer=ADAMW, scheduler=COSINE)
    ids = torch.randint(0, 64, (4, 9))
    trainer = L.Trainer(
        max_steps=2,
        precision=precision,
        gradient_clip_val=1e-3,  # far below a fresh model's gradient norm (~1)
        callbacks=[ClippedNorm()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:])))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert norms == pytest.approx([1e-3, 1e-3], rel=1e-3)
