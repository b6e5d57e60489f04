"""The callbacks and helpers training adds to Lightning: atomic checkpoints, text samples, the
run summary and the Ctrl-C stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_RUN
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from gpt2_lightning import callbacks
from gpt2_lightning.callbacks import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    RunSummary,
    StopOnCtrlC,
    TextSample,
    shards_weights,
)
from gpt2_lightning.model import GPT, GPTConfig
from gpt2_lightning.tokenizer import get_tokenizer


def compose_trainer(name: str):
    with initialize_config_dir(str(ROOT / "gpt2_lightning" / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"trainer={name}"]).trainer


def test_checkpoints_are_written_beside_their_place_then_renamed(tmp_path, monkeypatch):
    renames = []
    rename = os.replace

    def recording(source, target):
        renames.append((Path(source).parent, Path(target)))
        rename(source, target)

    monkeypatch.setattr(os, "replace", recording)
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "step": torch.arange(3)}, target)
    # Lightning's own writer made its temporary file in the system's temp folder (a copy into
    # place when that is another filesystem); a rename in the same folder is all or nothing
    assert renames == [(target.parent, target)]
    assert torch.load(target, weights_only=True)["step"].tolist() == [0, 1, 2]
    assert os.listdir(target.parent) == ["last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_the_last_good_one(tmp_path):
    (tmp_path / "afile").write_text("")
    writer = AtomicCheckpointIO()
    with pytest.raises(CheckpointWriteError) as error:
        writer.save_checkpoint({"global_step": 2}, tmp_path / "afile" / "ckpts" / "last.ckpt")
    assert str(error.value) == (
        f"cannot write checkpoint {tmp_path}/afile/ckpts/last.ckpt: Not a directory; the last "
        "good one is none yet"
    )
    writer.save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointWriteError, match=rf"one is {tmp_path}/last.ckpt \(step 3\)$"):
        writer.save_checkpoint({"global_step": 4}, tmp_path / "afile" / "ckpts" / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 3}


def test_text_samples_are_skipped_with_a_warning_when_the_weights_are_sharded():
    assert shards_weights(instantiate(compose_trainer("fsdp").strategy))
    assert shards_weights(ModelParallelStrategy())
    assert not shards_weights(DDPStrategy())

    class Sharded(torch.nn.Module):  # a rank's shard: running it alone would hang
        def forward(self, *args, **kwargs):
            raise AssertionError("the sample ran the sharded model")

    sample = TextSample(max_new_tokens=3)
    trainer = SimpleNamespace(sanity_checking=False, strategy=FSDPStrategy(), loggers=[])
    with pytest.warns(UserWarning, match="skipped under FSDPStrategy.*gpt2_lightning.generate"):
        sample.on_validation_end(trainer, SimpleNamespace(model=Sharded()))
    assert sample.last_text is None

    model = GPT(GPTConfig(context_length=16, emb_dim=8, num_layers=1, num_heads=2))
    trainer.strategy = DDPStrategy()  # every rank holds all the weights: rank 0 samples
    sample.on_validation_end(trainer, SimpleNamespace(model=model))
    assert sample.last_text is not None and sample.last_text.startswith("\n")
    assert len(get_tokenizer().encode(sample.last_text)) >= 2


def test_the_final_sample_under_a_sharding_strategy_names_the_generate_command(
    tmp_path, token_cache, monkeypatch, capsys
):
    import gpt2_lightning.callbacks as callbacks
    import gpt2_lightning.train as train_module

    overrides = [*TINY_RUN, f"data.cache_dir={token_cache}", f"run_dir={tmp_path / 'run'}"]
    overrides += ["trainer.max_steps=1", "val_before_fit=false", "~callbacks.text_sample"]
    with initialize_config_dir(str(ROOT / "gpt2_lightning" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    # Lightning runs FSDP on GPUs only: stand in for it by saying the weights are sharded.
    monkeypatch.setattr(callbacks, "shards_weights", lambda strategy: True)
    monkeypatch.setattr(callbacks, "sample_text", None)  # calling it would fail the test
    train_module.train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"(skipped: run python -m gpt2_lightning.generate checkpoint={last})" in (
        capsys.readouterr().out
    )
    assert last.is_file()


def test_text_sample_checks_its_settings_when_built():
    with pytest.raises(ValueError, match=r"^top_k=0 is invalid"):
        TextSample(top_k=0)  # not after the first validation, when checkpoints exist
    with pytest.raises(ValueError, match=r"^temperature=-1 is invalid"):
        TextSample(temperature=-1)


def test_the_run_summary_checks_the_sample_settings_when_built():
    with pytest.raises(ValueError, match=r"^sample.top_k=0 is invalid"):
        RunSummary(prompt="The ", max_new_tokens=8, temperature=0.8, top_k=0, seed=0)


def test_the_ctrl_c_stop_exits_as_a_shell_reports_the_signal():
    stop = StopOnCtrlC()
    assert stop.exit_code == 128 + signal.SIGTERM  # a scheduler's SIGTERM
    stop.pressed = True
    assert stop.exit_code == 128 + signal.SIGINT


CPUINFO = (
    "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\n"
)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [("avx512f amx_bf16 avx512_bf16", "amx_bf16"), ("avx512f avx512_bf16", "avx512_bf16"),
     ("avx512f", None), ("", None)],
)  # fmt: skip
def test_native_bf16_is_read_from_the_cpus_flags(extra, flag):
    assert callbacks.cpu_bf16(CPUINFO.format(vendor="AuthenticAMD", extra=extra)) == flag
    assert callbacks.cpu_bf16("no flags line here") is None


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(callbacks, "cpu_bf16", lambda: "avx512_bf16")
    assert callbacks.native_precision("auto") == callbacks.native_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(callbacks, "cpu_bf16", lambda: None)
    assert callbacks.native_precision("auto") == "32-true"
