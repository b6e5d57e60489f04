"""Token arrays -> sliding windows -> batches: the LightningDataModule training instantiates."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from gpt2_lightning.checks import check_integer, is_number
from gpt2_lightning.shards import is_val_shard
from gpt2_lightning.tokens import (
    EMBEDDED,
    EOT,
    VOCAB_SIZE,
    cache_folder,
    corpus_arrays,
    corpus_source,
    main,
    rebuild_command,
    remove_orphaned_files,
)

EMPTY = np.zeros(0, dtype=np.uint16)
# What decides the windows and batches, and so what a saved data loader position means.
WINDOW_SETTINGS = ("path", "val_path", "context_length", "stride", "batch_size", "val_fraction")


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


def document_start(
    ids: np.ndarray, position: int, minimum: int, block: int = 1 << 20
) -> int | None:
    """Where the document that position falls in starts (its <|endoftext|>), if at or after
    minimum; None if it starts before (or in an array before this one)."""
    # Read backwards a block at a time: a memory map of billions of ids is never read whole.
    end = position + 1
    while end > minimum:
        start = max(minimum, end - block)
        found = np.flatnonzero(ids[start:end] == EOT)
        if len(found):
            return start + int(found[-1])
        end = start
    return None


def split_tail(
    arrays: list[np.ndarray], fraction: float, window: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, val): the last fraction of the tokens validates, from the start of the document
    it falls in (looked for back across arrays: a document may run on over shards), so no
    document and no window is in both sets; a corpus of one document is cut where it falls."""
    total = sum(len(ids) for ids in arrays)
    num_val = max(int(total * fraction), window)
    if total - num_val < window:
        raise ValueError(
            f"{total} tokens are too few for one training window of {window} tokens plus "
            f"{num_val} validation tokens"
        )
    starts = np.cumsum([0, *map(len, arrays)])[:-1].tolist()  # where each array begins
    position = cut = total - num_val
    for ids, start in reversed(list(zip(arrays, starts, strict=True))):
        if start > position or not len(ids):
            continue
        found = document_start(ids, min(position - start, len(ids) - 1), max(0, window - start))
        if found is not None:
            cut = start + found
            break
        if start <= window:  # the document began before the first window's end
            break
    train = [ids[: max(0, cut - start)] for ids, start in zip(arrays, starts, strict=True)]
    val = [ids[max(0, cut - start) :] for ids, start in zip(arrays, starts, strict=True)]
    return [ids for ids in train if len(ids)], [ids for ids in val if len(ids)]


class TextDataModule(L.LightningDataModule):
    """A corpus (the embedded one, text and record files, a Hugging Face dataset, token shards),
    tokenized and cached (shards are read in place), cut into windows."""

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
        val_path: str | None = None,
        text_field: str = "text",
        hf_name: str | None = None,
        hf_split: str = "train",
    ):
        super().__init__()
        if not is_number(val_fraction) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        self.val_fraction = val_fraction
        self.context_length = check_integer("data.context_length", context_length, 1)
        self.batch_size = check_integer("data.batch_size", batch_size, 1)
        # None: windows that do not overlap
        self.stride = context_length if stride is None else check_integer("data.stride", stride, 1)
        self.num_workers = check_integer("data.num_workers", num_workers)
        self.seed = check_integer("data.seed", seed)  # DistributedSampler's shuffle (DDP)
        self.val_windows = check_integer("data.val_windows", val_windows, 1, none=True)
        if not isinstance(verify, bool):
            raise ValueError(f"data.verify={verify!r} is invalid: use true or false")
        self.verify = verify
        self.path, self.val_path, self.cache_dir = path, val_path, cache_dir
        self.sources = {key: None for key in ("path", "val_path")}  # what each names, checked now
        for key, value in (("path", path), ("val_path", val_path)):
            if value is not None or key == "path":
                self.sources[key] = corpus_source(
                    value, f"data.{key}", text_field, hf_name, hf_split
                )
        self.arrays: dict[str, list[tuple[Path, np.ndarray]]] = {}  # each source's, once read
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _read(self, progress: bool) -> None:
        for key, source in self.sources.items():
            if source is not None and key not in self.arrays:
                self.arrays[key] = corpus_arrays(source, self.cache_dir, progress, self.verify)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node only: the cache is cleaned and written
        # once; setup on this process reuses the files (validate and fit each call both hooks).
        if not self.arrays:
            remove_orphaned_files(cache_folder(self.cache_dir))
            self._read(progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._read(progress=False)  # another rank, or no Trainer: checked here
        name = self.path or EMBEDDED
        files = [file for file, _ in self.arrays["path"]]
        arrays = [ids for _, ids in self.arrays["path"]]
        if sum(len(ids) for ids in arrays) == 0:
            raise ValueError(f"data.path={name!r} holds no text: the corpus is empty")
        window = self.context_length + 1
        # Shards named as llm.c and build-nanogpt name their validation ones never train.
        held = [is_val_shard(file) for file in files]
        kept = [ids for ids, is_val in zip(arrays, held, strict=True) if not is_val]
        if "val_path" in self.arrays:  # a fixed validation set
            train, val = kept, [ids for _, ids in self.arrays["val_path"]]
        elif any(held):
            train, val = kept, [ids for ids, is_val in zip(arrays, held, strict=True) if is_val]
        elif self.val_fraction:
            try:
                train, val = split_tail(arrays, self.val_fraction, window)
            except ValueError as error:
                raise ValueError(
                    f"data.path={name!r}: {error}: give more text, or lower "
                    "model.context_length or data.val_fraction"
                ) from None
        else:
            train, val = arrays, []
        self.train_set = self._windows(train)
        self.val_set = self._windows(val)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} "
                f"training windows of data.path={name!r}: lower data.batch_size or add text"
            )

    def _windows(self, arrays: list[np.ndarray]) -> Dataset:
        sets = [SlidingWindowDataset(ids, self.context_length, self.stride) for ids in arrays]
        if len(sets) > 1:
            return ConcatDataset(sets)  # no window spans two shards
        return sets[0] if sets else SlidingWindowDataset(EMPTY, self.context_length, self.stride)

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
        if len(dataset) == 0:
            raise ValueError(
                f"data.path={self.path or EMBEDDED!r} leaves no validation window (data.val_path, "
                "*val* shards or data.val_fraction give them), and a run validates: give "
                "data.val_fraction in (0, 1), or a data.val_path of a window's tokens or more"
            )
        if count is not None and count < len(dataset):
            dataset = Subset(dataset, [i * len(dataset) // count for i in range(count)])
        return self._loader(dataset, train=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # A cache file over CHECKSUM_BYTES is checked by its size only (unless data.verify), and
        # shards by their header: an id beyond the vocabulary is refused here, in the main
        # process, in one line, rather than as an IndexError in the embedding. A max over the
        # batch costs microseconds.
        largest = max(int(batch[0].max()), int(batch[1].max()))
        if largest >= VOCAB_SIZE:
            name, source = self.path or EMBEDDED, self.sources["path"]
            files = ", ".join(str(file) for key in self.arrays for file, _ in self.arrays[key])
            fix = (
                "they were not written with GPT-2's tokenizer, or are damaged"
                if isinstance(source, list)
                else f"the file is damaged; rebuild it with "
                f"{rebuild_command(source, cache_folder(self.cache_dir))}"
            )
            raise ValueError(
                f"data.path={name!r}: its tokens ({files}) hold id {largest}, beyond the GPT-2 "
                f"vocabulary's {VOCAB_SIZE}: {fix}"
            )
        return batch


if __name__ == "__main__":  # python -m gpt2_lightning.data prepare, as documented
    sys.exit(main())
