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
