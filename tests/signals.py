"""A callback the tests inject into a training subprocess to stop it the way a scheduler would."""

import os
import signal

import lightning as L


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
