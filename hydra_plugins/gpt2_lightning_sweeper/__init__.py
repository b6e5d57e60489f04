"""A Hydra plugin: the Optuna sweeper, which makes its sweep folder before opening the study there
(SQLite creates its file but not the folder, and Hydra creates it only when launching), and ends
with one line when no trial of a sweep completed.

Hydra instantiates sweepers only from the `hydra_plugins` namespace package, so the class lives
here rather than in gpt2_lightning; `conf/hparams_search/optuna.yaml` names it as `_target_`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class Gpt2LightningOptunaSweeper(OptunaSweeper):
    """The plugin's sweeper. At the end it asks the study for its best trial; when every trial
    failed, Optuna raises a bare "Record does not exist" that Hydra prints as a traceback."""

    def sweep(self, arguments: list[str]) -> None:
        Path(self.sweeper.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        try:
            super().sweep(arguments)
        except ValueError as error:
            if "Record does not exist" not in str(error):
                raise
            sys.exit(
                "error: no trial of this Optuna sweep completed, so it has no best value: the "
                "'Failed experiment' lines above say why each one failed"
            )
