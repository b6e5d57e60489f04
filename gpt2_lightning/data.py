"""Text -> token ids (cached on disk) -> sliding windows -> batches.

Tokens live in a uint16 file (GPT-2's 50257 ids fit in 16 bits) that training reads through a memory
map, so a corpus larger than RAM never becomes Python objects. The file is named by a hash of the
sources' content and the tokenizer, written atomically, and reused by every later run.

`python -m gpt2_lightning.data prepare <path>` tokenizes a large corpus once, ahead of training.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm

from gpt2_lightning.files import atomic_file, cache_home
from gpt2_lightning.tokenizer import get_tokenizer

EMBEDDED = "embedded"  # display name of the default corpus
# The encoding the cache holds, as name:n_vocab, part of every cache key. A constant, so that a
# warm start need not build the tokenizer (~0.7 s); a test checks it against get_tokenizer().
TOKENIZER = "gpt2:50257"


class SlidingWindowDataset(Dataset):
    """Windows of context_length + 1 tokens, start positions stride apart, as (input, target).

    The target is the input shifted left by one: position t learns to predict token t + 1.
    A stride equal to context_length gives non-overlapping windows; a smaller one overlaps them.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int):
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        usable = len(self.tokens) - (self.context_length + 1)
        return 0 if usable < 0 else usable // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:  # also what ends `for x, y in dataset`
            raise IndexError(f"window {i} of {n}")
        start = (i % n) * self.stride
        window = self.tokens[start : start + self.context_length + 1].astype(np.int64)
        window = torch.from_numpy(window)
        return window[:-1], window[1:]


def source_files(path: str | os.PathLike) -> list[Path]:
    """The text files named by data.path: a file, a folder (all *.txt, recursively) or a glob.

    A path that exists is taken as written, even with glob characters in its name ("book[2].txt").
    A folder's hidden files and folders (.git, .ipynb_checkpoints) are left out, as a glob's are.
    """
    text = str(path)
    if not text.strip():  # Path("") is the current folder
        raise ValueError(
            f"data.path={text!r} is empty: give a text file, a folder of *.txt files or a glob"
        )
    if Path(text).is_file():
        return [Path(text)]
    if Path(text).is_dir():
        root = Path(text)
        found = sorted(
            p
            for p in root.rglob("*.txt")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise ValueError(f"data.path={text!r} is a folder that holds no *.txt files")
        return found
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"data.path={text!r} is a glob that matches no files")
        return found
    what = "is not a file or folder" if Path(text).exists() else "does not exist"  # /dev/null
    raise ValueError(
        f"data.path={text!r} {what}: give a text file, a folder of *.txt files or a glob"
    )


def embedded_documents() -> list[str]:
    """The default corpus: Python's language reference, one document per topic.

    CPython ships it as pydoc_data.topics (about 465 KB of English prose, PSF licence), so every
    machine that runs this package already has it; see data/README.md. Indentation and runs of
    spaces are collapsed and reST underlines dropped: as GPT-2 tokens, spaces were 18% of the raw
    text, and a small model trained on it learns mostly to print spaces.
    """
    from pydoc_data.topics import topics

    def clean(text: str) -> str:
        lines = []
        for line in text.splitlines():
            line = " ".join(line.split())
            if line and set(line) <= set("*=-~^"):
                continue
            lines.append(line)
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"

    return [clean(topics[name]) for name in sorted(topics)]


def _pieces(file: Path, piece_bytes: int) -> Iterator[str]:
    """The text of file in pieces of about piece_bytes, so a large file is never in memory at once.

    Each cut falls after a newline that has non-space characters on both sides ("x\nY"), where
    GPT-2's tokenizer splits the text anyway: its pre-tokenizer makes that newline a token of its
    own, and no token spans it. So the pieces' ids, concatenated, are the whole file's ids. (A
    cut inside a run of spaces or newlines could change how that run is split.) A piece without
    such a place grows until it has one.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    rest, offset, first = "", 0, True
    with open(file, "rb") as f:
        while True:
            block = f.read(piece_bytes)
            final = len(block) < piece_bytes  # a file reads short only at its end
            try:
                text = rest + decoder.decode(block, final=final)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{file} is not UTF-8 text (byte {error.object[error.start]:#04x} near "
                    f"offset {offset + error.start - len(decoder.getstate()[0])}): convert it, "
                    "e.g. iconv -f latin1 -t utf-8, or leave it out"
                ) from None
            offset += len(block)
            if final:
                if text or first:  # an empty file is an empty document, as it always was
                    yield text
                return
            # rest had no place to cut but maybe its very end, whose next character came now
            cut = _last_cut(text, start=max(1, len(rest) - 2))
            if cut:
                yield text[:cut]
                first = False
            rest = text[cut:]


# A newline with non-space characters on both sides (Python's isspace, which holds every
# character the tokenizer's \s does, and a few more).
_CUT = re.compile(r"\S\n(?=\S)")


def _last_cut(text: str, start: int = 1) -> int:
    """The place after the last newline of text with non-space characters on both sides, or 0;
    newlines before start are not looked at (a file of blank lines would be read again and
    again). The last 64 KB almost always hold one; only text without one is searched whole."""
    for window in (1 << 16, len(text)):
        matches = list(_CUT.finditer(text, max(start, len(text) - window) - 1))
        if matches:
            return matches[-1].end()
    return 0


# Text is tokenized in batches of pieces of at most about PIECE_BYTES, a few per thread: on 2 cores
# a 100 MB file then peaked at ~250 MB above the imports (~490 MB with 64 MB batches of 16 MB
# pieces, as fast), whatever the size of the corpus.
PIECE_BYTES = 4 << 20


def _documents(
    files: list[Path] | None,
    batch_bytes: int = PIECE_BYTES * max(4, os.cpu_count() or 1),
    piece_bytes: int = PIECE_BYTES,
) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """Batches of about batch_bytes of text, as (piece, starts a document) pairs, with the size
    of the batch in bytes: a large corpus (or a large file) is never in memory at once."""
    if files is None:
        documents = embedded_documents()
        yield [(doc, True) for doc in documents], sum(len(doc.encode()) for doc in documents)
        return
    batch, size = [], 0
    for file in files:
        for k, piece in enumerate(_pieces(file, piece_bytes)):
            batch.append((piece, k == 0))
            size += len(piece.encode())
            if size >= batch_bytes:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


def encode_documents(documents: list[str], pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """The token ids of each document, in order, as uint32 arrays, encoded on the pool's threads.

    tiktoken's encode_to_numpy returns its Rust buffer as an array; encode_ordinary_batch would
    build a Python int per token first, which then have to be turned back into an array.
    With no special token allowed, <|endoftext|> inside a text is plain text, as in
    encode_ordinary.
    """
    enc = get_tokenizer()
    return pool.map(lambda doc: enc.encode_to_numpy(doc, disallowed_special=()), documents)


def cache_key(files: list[Path] | None) -> str:
    """A hash of the tokenizer and of every source's bytes, in order."""
    digest = hashlib.sha256(f"{TOKENIZER}\0".encode())
    if files is None:
        for doc in embedded_documents():
            digest.update(doc.encode() + b"\0")
    else:
        for file in files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    return cache_home("tokens")


def tokenize_to_cache(
    path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Tokenize the sources of data.path (None = embedded corpus) into the cache; return its file.

    Documents are joined with <|endoftext|>, as GPT-2 was trained. Nothing is done when the cache
    already holds these sources; a new file appears only complete (temp file, then rename).
    """
    files = None if path is None else source_files(path)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"data.cache_dir={str(cache_dir)!r} is a file: give a folder")
    index = None if files is None else cache_dir / "index" / f"{stat_key(files)}.txt"
    if index is not None and index.is_file():
        target = cache_dir / index.read_text().strip()
        if target.is_file():
            return target  # the files are unchanged since they were hashed: no byte is read
    target = cache_dir / f"{cache_key(files)}.bin"
    if not target.exists():
        _tokenize(files, target, progress)
    if index is not None:
        _write_index(index, target.name)
    return target


def stat_key(files: list[Path]) -> str:
    """A hash of the tokenizer and each file's absolute path, size and modification time.

    Hashing the content (cache_key) reads the whole corpus, ~1 s per 100 MB here; the index maps
    this key, which needs no read, to the content's cache file, so a warm start does not grow
    with the corpus. Like make and rsync, it takes a file with the same size and mtime as
    unchanged; edit a file and its mtime moves, so it is hashed again.
    """
    digest = hashlib.sha256(f"{TOKENIZER}\0".encode())
    for file in files:
        st = file.stat()
        digest.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]


def _write_index(file: Path, text: str) -> None:
    """Write the index entry atomically; skip it where the cache cannot be written (it only
    saves time, and a read-only shared cache must still serve its files)."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(file, "w") as out:
            out.write(text)
    except OSError:
        pass


def _tokenize(files: list[Path] | None, target: Path, progress: bool) -> None:
    """Write the ids of files (None = embedded corpus) to target, which appears only complete."""
    enc = get_tokenizer()
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(f.stat().st_size for f in files) if files else None
    count = 0
    eot = np.array([enc.eot_token], dtype=np.uint16).tobytes()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    with (
        bar,  # closed on failure too
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        atomic_file(target) as out,
    ):
        for batch, size in _documents(files):
            pieces = [piece for piece, _ in batch]
            for (_, starts), ids in zip(batch, encode_documents(pieces, pool), strict=True):
                if starts and count:  # between documents
                    out.write(eot)
                    count += 1
                out.write(ids.astype(np.uint16))
                count += len(ids)
            bar.update(size)


def load_tokens(file: Path) -> np.ndarray:
    """The cached ids as a read-only memory map (nothing is read until a window asks for it)."""
    if file.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(file, dtype=np.uint16, mode="r")


# What decides the windows and batches, and so what a saved data loader position means.
WINDOW_SETTINGS = ("path", "context_length", "stride", "batch_size", "val_fraction")


class TextDataModule(L.LightningDataModule):
    """The embedded corpus or the user's text files, tokenized, cached and cut into windows.

    The last val_fraction of the tokens is the validation set: a contiguous range, so no window
    holds tokens of both sets.
    """

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
    ):
        super().__init__()
        if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        sizes = {"batch_size": batch_size, "context_length": context_length, "stride": stride}
        for name, value in sizes.items():
            if value is None and name == "stride":
                continue  # stride defaults to context_length: windows that do not overlap
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{name}={value!r} is invalid: must be a positive integer")
        for name, value in {"num_workers": num_workers, "seed": seed}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{name}={value!r} is invalid: must be an integer >= 0")
        if path is not None:
            source_files(path)  # fail now, before a trainer is built, if the path is wrong
        self.path = path
        self.context_length = context_length
        self.batch_size = batch_size
        self.stride = stride or context_length
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed  # the shuffle of DistributedSampler (several devices)
        self.train_set: SlidingWindowDataset | None = None
        self.val_set: SlidingWindowDataset | None = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node only: the cache is written once.
        tokenize_to_cache(self.path, self.cache_dir, progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokens = load_tokens(tokenize_to_cache(self.path, self.cache_dir))
        window = self.context_length + 1
        source = self.path or EMBEDDED
        if len(tokens) == 0:
            raise ValueError(f"data.path={source!r} holds no text: the corpus is empty")
        num_val = max(int(len(tokens) * self.val_fraction), window) if self.val_fraction else 0
        if len(tokens) - num_val < window:
            raise ValueError(
                f"data.path={source!r} has {len(tokens)} tokens, too few for one training window "
                f"of {window} tokens plus {num_val} validation tokens: give more text, "
                "or lower model.context_length or data.val_fraction"
            )
        split = len(tokens) - num_val
        self.train_set = SlidingWindowDataset(tokens[:split], self.context_length, self.stride)
        self.val_set = SlidingWindowDataset(tokens[split:], self.context_length, self.stride)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} "
                f"training windows of data.path={source!r}: lower data.batch_size or add text"
            )

    def _loader(self, dataset: Dataset, train: bool) -> StatefulDataLoader:
        # StatefulDataLoader records how far into the epoch it is; Lightning saves that in the
        # checkpoint and restores it, so a resumed run sees exactly the batches it would have seen.
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sampler = None
        if train and self.trainer is not None and self.trainer.world_size > 1:
            # Left to itself, Lightning would wrap a shuffling sampler whose permutation the
            # checkpoint does not hold; a DistributedSampler's order follows from (seed, epoch),
            # so a resumed rank skips to the same place in the same shuffle.
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.trainer.world_size,
                rank=self.trainer.global_rank,
                shuffle=True,
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
                f"resuming with {', '.join(changed)}: the data loader's position is counted in "
                "batches of windows, so the resumed run does not continue where the first stopped "
                "(the resume is not exact)"
            )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, train=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_lightning.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into the token cache once")
    prepare.add_argument("path", help="a text file, a folder of *.txt files, or a glob")
    prepare.add_argument(
        "--cache-dir", default=None, help="default: ~/.cache/gpt2_lightning/tokens"
    )
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the temporary file being written is removed as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        file = tokenize_to_cache(args.path, args.cache_dir, progress=True)
    except (ValueError, OSError) as error:  # OSError: a --cache-dir that cannot be a folder
        # the path is this command's first argument, not a data.path= override
        message = str(error).replace("data.path=", "", 1).replace("data.cache_dir=", "--cache-dir ")
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was cached", file=sys.stderr)
        return 130
    if file.stat().st_size == 0:
        print(f"error: {args.path!r} holds no text: the corpus is empty", file=sys.stderr)
        return 1
    print(f"{file.stat().st_size // 2:,} tokens cached in {file}")
    from gpt2_lightning.cli import override  # Hydra's parser: only this command needs it

    keys = [override("data.path", args.path)]
    if args.cache_dir:
        keys.append(override("data.cache_dir", args.cache_dir))
    command = " ".join(shlex.quote(key) for key in keys)  # quoted for Hydra, then the shell
    print(f"train on them with: python -m gpt2_lightning.train {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
