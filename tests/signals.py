"""Callbacks the tests inject into a training subprocess (+callbacks.<name>._target_=tests.signals.
...) to stop it the way a scheduler would, or to fill its disk."""

import errno
import os
import signal

import lightning as L
import torch


class SigtermAt(L.Callback):
    """Send this process SIGTERM after training batch number `step` (1-based)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SigintAt(SigtermAt):
    """Press Ctrl-C (SIGINT) after training batch number `step`; twice if `times` is 2."""

    def __init__(self, step: int, times: int = 1):
        super().__init__(step)
        self.times = times

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


class SigtermInFirstValidation(L.Callback):
    """Send SIGTERM during the validation before training (trainer.validate)."""

    def on_validation_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.state.fn == "validate" and trainer.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class FullDisk:
    """A file that takes `room` bytes more, then fails each write as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        taken = self.file.write(bytes(data[: self.room]))
        self.room -= taken
        if taken < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return taken

    def flush(self) -> None:
        self.file.flush()


class DiskFullAfter(L.Callback):
    """After training batch number `step`, the disk is full: every torch.save gets 1000 bytes
    written (a half-written temporary file), then ENOSPC."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            save = torch.save
            torch.save = lambda obj, file, *rest, **options: save(
                obj, FullDisk(file, 1000), *rest, **options
            )
