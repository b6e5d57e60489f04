"""Token arrays -> sliding windows -> batches: the LightningDataModule training instantiates."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt2_lightning.tokens import (
    EMBEDDED,
    VOCAB_SIZE,
    cache_folder,
    load_tokens,
    main,
    read_record,
    rebuild_command,
    remove_orphaned_files,
    source_files,
    tokenize_to_cache,
)

# What decides the windows and batches, and so what a saved data loader position means.
WINDOW_SETTINGS = ("path", "context_length", "stride", "batch_size", "val_fraction")


class SlidingWindowDataset(Dataset):
    """Windows of context_length + 1 tokens, stride apart, as (input, input shifted left by one)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int):
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.context_length - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:  # also what ends `for x, y in dataset`
            raise IndexError(f"window {i} of {n}")
        start = (i % n) * self.stride
        window = self.tokens[start : start + self.context_length + 1].astype(np.int64)
        window = torch.from_numpy(window)
        return window[:-1], window[1:]


def _integer(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum else "an integer >= 0"
        raise ValueError(f"data.{name}={value!r} is invalid: must be {what}")
    return value


class TextDataModule(L.LightningDataModule):
    """The embedded corpus or the user's text files, tokenized, cached and cut into windows."""

    def __init__(
        self,
        path: str | None = None,
        context_length: int = 128,
        batch_size: int = 8,
        stride: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        val_windows: int | None = 256,
        verify: bool = False,
    ):
        super().__init__()
        if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        self.val_fraction = val_fraction
        self.context_length = _integer("context_length", context_length, 1)
        self.batch_size = _integer("batch_size", batch_size, 1)
        # None: windows that do not overlap
        self.stride = context_length if stride is None else _integer("stride", stride, 1)
        self.num_workers = _integer("num_workers", num_workers, 0)
        self.seed = _integer("seed", seed, 0)  # the shuffle of DistributedSampler (several devices)
        self.val_windows = None if val_windows is None else _integer("val_windows", val_windows, 1)
        if not isinstance(verify, bool):
            raise ValueError(f"data.verify={verify!r} is invalid: use true or false")
        self.verify = verify
        if path is not None:
            source_files(path)  # fail now, before a trainer is built, if the path is wrong
        self.path = path
        self.cache_dir = cache_dir
        self.cache_file: Path | None = None  # the token cache, once found (and checked)
        self.max_id: int | None = None  # the largest id in the data, after setup
        self.train_set: SlidingWindowDataset | None = None
        self.val_set: SlidingWindowDataset | None = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node only: the cache is cleaned and written
        # once; setup on this process reuses the file (validate and fit each call both hooks).
        if self.cache_file is None:
            remove_orphaned_files(cache_folder(self.cache_dir))
            self.cache_file = tokenize_to_cache(
                self.path, self.cache_dir, progress=True, verify=self.verify
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.cache_file is None:  # another rank, or no Trainer: checked here
            self.cache_file = tokenize_to_cache(self.path, self.cache_dir, verify=self.verify)
        ids = load_tokens(self.cache_file)
        self.max_id = read_record(self.cache_file).max_id
        window = self.context_length + 1
        source = self.path or EMBEDDED
        if len(ids) == 0:
            raise ValueError(f"data.path={source!r} holds no text: the corpus is empty")
        # The last val_fraction of the tokens validates: one range, so no window holds both sets.
        num_val = max(int(len(ids) * self.val_fraction), window) if self.val_fraction else 0
        if len(ids) - num_val < window:
            raise ValueError(
                f"data.path={source!r} has {len(ids)} tokens, too few for one training window "
                f"of {window} tokens plus {num_val} validation tokens: give more text, "
                "or lower model.context_length or data.val_fraction"
            )
        split = len(ids) - num_val
        self.train_set = SlidingWindowDataset(ids[:split], self.context_length, self.stride)
        self.val_set = SlidingWindowDataset(ids[split:], self.context_length, self.stride)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} "
                f"training windows of data.path={source!r}: lower data.batch_size or add text"
            )

    def _loader(self, dataset: Dataset, train: bool) -> StatefulDataLoader:
        # StatefulDataLoader's position in the epoch is saved in the checkpoint: an exact resume.
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sampler = None
        if train and self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's own sampler shuffles by a permutation no checkpoint holds; this one's
            # order follows from (seed, epoch), so a resumed rank finds its place again.
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.trainer.world_size,
                rank=self.trainer.global_rank,
                seed=self.seed,
                drop_last=True,
            )
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train if sampler is None else None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=on_cuda,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        # Saved in checkpoints, to tell a resumed run that its windows differ (load_state_dict).
        return {key: getattr(self, key) for key in WINDOW_SETTINGS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [
            f"data.{key}={getattr(self, key)!r} (the checkpoint's run had {state_dict[key]!r})"
            for key in WINDOW_SETTINGS
            if key in state_dict and state_dict[key] != getattr(self, key)
        ]
        if changed:
            rank_zero_warn(
                f"resuming with {', '.join(changed)}: the data loader's position counts batches "
                "of windows, so the resume is not exact"
            )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        # val_windows spread evenly over the validation set: a validation costs the same whatever
        # the corpus size, and sees the same windows in every run, on any number of devices.
        count, dataset = self.val_windows, self.val_set
        if count is not None and count < len(dataset):
            dataset = Subset(dataset, [i * len(dataset) // count for i in range(count)])
        return self._loader(dataset, train=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # A cache file over CHECKSUM_BYTES is checked by its size only (unless data.verify): an id
        # it holds beyond the vocabulary is refused here, in the main process, in one line, rather
        # than as an IndexError in the embedding. A max over the batch costs microseconds.
        largest = max(int(batch[0].max()), int(batch[1].max()))
        if largest >= VOCAB_SIZE:
            raise ValueError(
                f"data.path={self.path or EMBEDDED!r}: its token cache {self.cache_file} holds id "
                f"{largest}, beyond the GPT-2 vocabulary's {VOCAB_SIZE}: the file is damaged; "
                f"rebuild it with {rebuild_command(self.path, cache_folder(self.cache_dir))}"
            )
        return batch


if __name__ == "__main__":  # python -m gpt2_lightning.data prepare, as documented
    sys.exit(main())
