"""Pre-tokenized shards as GPT-2's reproductions write them, read in place and written by prepare.

Two formats hold uint16 ids, one shard a file:
- llm.c / modded-nanogpt `.bin`: 256 little-endian int32 (magic 20240520, version 1, the number
  of tokens, then zeros), then the tokens;
- build-nanogpt `.npy`: a 1-D uint16 array as numpy.save writes it.
prepare_shards tokenizes documents on a process pool into a validation shard of whole documents,
then training shards of shard_tokens each, named as those projects name theirs; a manifest beside
them records how far it got, so a stopped prepare continues where it stopped.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_lightning.files import AtomicFile, atomic_file, remove_orphans
from gpt2_lightning.tokenizer import get_tokenizer

MAGIC = 20240520  # llm.c's header[0]
VERSION = 1  # header[1]: uint16 tokens (llm.c's version 2 holds Llama 3's uint32 ones)
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
SUFFIXES = (".bin", ".npy")
FORMATS = ("bin", "npy")
MANIFEST = "prepare.json"
TOKENIZER = "gpt2:50257"
EOT = 50256  # <|endoftext|>, before each document
# Text handed to each worker at a time: with two batches in flight, memory is a few batches of
# text and their tokens, whatever the corpus and shard sizes.
BATCH_CHARS = 4 << 20
_SETTINGS = {  # a manifest's settings, each as the command line names it
    "tokenizer": "the tokenizer",
    "shard_tokens": "--shard-tokens",
    "fmt": "--format",
    "val_tokens": "--val-tokens",
    "prefix": "--prefix",
    "source": "the source",
}
_FIELDS = {*_SETTINGS, "items", "item_tokens", "tokens", "shards", "done"}


def read_shard(file: Path) -> np.ndarray:
    """The tokens of a .bin or .npy shard as a read-only memory map (1-D uint16)."""
    file = Path(file)
    if file.suffix == ".bin":
        return _read_bin(file)
    if file.suffix == ".npy":
        return _read_npy(file)
    raise ValueError(f"{file} is not a shard: give a .bin (llm.c) or .npy (build-nanogpt) file")


def _read_bin(file: Path) -> np.ndarray:
    size = file.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(
            f"{file} is {size} bytes, shorter than the {HEADER_BYTES}-byte header of a .bin shard"
        )
    with open(file, "rb") as f:
        magic, version, count = (int(x) for x in np.frombuffer(f.read(12), dtype="<i4"))
    if magic != MAGIC:
        raise ValueError(
            f"{file} is not a .bin token shard: its magic number is {magic}, expected {MAGIC}"
        )
    if version != VERSION:
        raise ValueError(
            f"{file} is a .bin shard of version {version}: "
            f"only version {VERSION} (GPT-2's uint16 tokens) is supported"
        )
    if size - HEADER_BYTES != 2 * count:
        raise ValueError(
            f"{file} holds {size - HEADER_BYTES:,} bytes of tokens but its header says "
            f"{count:,} tokens ({2 * count:,} bytes): it is truncated or damaged"
        )
    return np.memmap(file, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def _read_npy(file: Path) -> np.ndarray:
    try:
        tokens = np.load(file, mmap_mode="r")
    except (ValueError, EOFError) as error:  # not a .npy; a pickled object array
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{file} is not a .npy array numpy can map ({reason}): "
            "a .npy shard is a 1-D uint16 array written by numpy.save"
        ) from None
    if tokens.dtype != np.dtype("<u2") or tokens.ndim != 1:
        raise ValueError(
            f"{file} holds a {tokens.dtype} array of shape {tokens.shape}: "
            "a .npy shard is a 1-D uint16 array"
        )
    return tokens


def write_shard(file: Path, tokens: np.ndarray) -> None:
    """Write tokens as a shard in the format of file's suffix (.bin or .npy), atomically."""
    file = Path(file)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ValueError(f"a shard holds a 1-D array of ids, not {tokens.dtype} of {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{file}: ids {tokens.min()}..{tokens.max()} do not fit uint16 (0..65535)")
    if file.suffix not in SUFFIXES:
        raise ValueError(f"{file} is not named as a shard: give it a .bin or .npy suffix")
    with atomic_file(file) as out:
        out.write(_header(file, len(tokens)))
        out.write(np.ascontiguousarray(tokens, dtype="<u2").data)


def _header(file: Path, count: int) -> bytes:
    """The header of a shard of count tokens; its length is the same for every count, so a shard
    written as its tokens arrive gets it last. .npy: the header numpy.save writes."""
    if file.suffix == ".bin":
        if count > np.iinfo(np.int32).max:  # header[2] is an int32
            raise ValueError(f"{file}: {count:,} tokens do not fit a .bin shard's header")
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = MAGIC, VERSION, count
        return header.tobytes()
    out = io.BytesIO()  # numpy pads it to the same length for up to 21 digits
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<u2", "fortran_order": False, "shape": (count,)}
    )
    return out.getvalue()


def shard_files(path: str | os.PathLike) -> list[Path] | None:
    """The .bin/.npy shards path names (a file, a folder of shards only, a glob) sorted, or None."""
    text = str(path)
    root = Path(text)
    if root.is_file():
        found = [root]
    elif root.is_dir():  # hidden files (temporary ones) left out, and prepare's manifest
        found = [
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.name != MANIFEST
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ]
    elif glob.has_magic(text):
        found = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    else:
        return None
    return sorted(found) if found and all(p.suffix in SUFFIXES for p in found) else None


def is_val_shard(file: Path) -> bool:
    """Whether a shard validates: llm.c and build-nanogpt name theirs "..._val_...", as we do."""
    return "val" in file.name


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it, and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer()


def _encode(item: tuple[str, bool]) -> np.ndarray:
    text, starts = item
    # encode_ordinary's ids, as tiktoken's buffer (not a list of ints); with no special token
    # allowed, <|endoftext|> inside a text is plain text.
    ids = get_tokenizer().encode_to_numpy(text, disallowed_special=())
    # An empty document is none: no <|endoftext|> of its own (as in the token cache).
    first = int(starts and len(ids) > 0)
    out = np.empty(first + len(ids), dtype=np.uint16)
    out[:first] = EOT
    out[first:] = ids
    return out


def _batches(items: Iterable[tuple[str, bool]], chars: int) -> Iterator[list[tuple[str, bool]]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[0])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(
    items: Iterable[tuple[str, bool]], pool: Pool, workers: int
) -> Iterator[tuple[np.ndarray, bool]]:
    """Each item's ids (<|endoftext|> first if it starts a document) and whether it starts one."""
    # Pool.imap would read the whole input ahead in its feeder thread: the input goes in bounded
    # batches instead, the next one encoding while this one is consumed.
    pending = deque()
    for batch in _batches(items, BATCH_CHARS * workers):
        chunksize = max(1, len(batch) // (4 * workers))  # Pool.map's own choice
        pending.append((pool.map_async(_encode, batch, chunksize), [s for _, s in batch]))
        if len(pending) == 2:
            result, starts = pending.popleft()
            yield from zip(result.get(), starts, strict=True)
    for result, starts in pending:
        yield from zip(result.get(), starts, strict=True)


def _write_manifest(out: Path, manifest: dict) -> None:
    with atomic_file(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)


def _resumed(out: Path, settings: dict) -> dict:
    """The manifest of an earlier prepare into out, checked against this one's settings."""
    file = out / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        manifest = None
    if not isinstance(manifest, dict) or not _FIELDS <= manifest.keys():  # another program's
        raise ValueError(f"{file} is not a manifest prepare wrote: give an empty folder")
    for key, option in _SETTINGS.items():
        if manifest.get(key) != settings[key]:
            raise ValueError(
                f"{out} holds shards prepared with {option} {manifest.get(key)!r}, not "
                f"{settings[key]!r}: give an empty folder or the same settings"
            )
    for name in manifest["shards"]:
        if not (out / name).is_file():
            raise ValueError(f"{out / name}, which {file} lists, is missing: give an empty folder")
    return manifest


def prepare_shards(
    documents: Iterable[tuple[str, bool]],
    out: str | os.PathLike,
    shard_tokens: int = 100_000_000,
    fmt: str = "bin",
    val_tokens: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    prefix: str = "shard",
    source: str = "",
) -> list[Path]:
    """Tokenize (text, starts a document) pieces into shards in out, continuing a stopped run;
    the shards, validation first. val_tokens: at least this many in whole documents (default
    shard_tokens, 0: none); source: what the documents are, recorded and checked on resume."""
    if type(shard_tokens) is not int or shard_tokens <= 0:
        raise ValueError(f"--shard-tokens {shard_tokens!r} is not a positive whole number")
    if val_tokens is not None and (type(val_tokens) is not int or val_tokens < 0):
        raise ValueError(
            f"--val-tokens {val_tokens!r} is not a whole number >= 0 (0: no validation shard)"
        )
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if workers is not None and (type(workers) is not int or workers <= 0):
        raise ValueError(f"--workers {workers!r} is not a positive whole number")
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    settings = dict(
        tokenizer=TOKENIZER,
        shard_tokens=shard_tokens,
        fmt=fmt,
        val_tokens=val_tokens,
        prefix=prefix,
        source=source,
    )
    if (out / MANIFEST).exists():
        manifest = _resumed(out, settings)
    elif any(out.iterdir()):
        raise ValueError(
            f"{out} holds files but no {MANIFEST} of a prepare: give an empty folder for the shards"
        )
    else:  # written before any shard: a run stopped before its first shard is resumed too
        manifest = dict(settings, items=0, item_tokens=0, tokens=0, shards=[], done=False)
        _write_manifest(out, manifest)
    if not manifest["done"]:
        workers = (os.cpu_count() or 1) if workers is None else workers
        _fill(documents, out, manifest, workers, progress)
    return [out / name for name in manifest["shards"]]


def _fill(
    documents: Iterable[tuple[str, bool]], out: Path, manifest: dict, workers: int, progress: bool
) -> None:
    """Write the shards from the manifest's position on, recording each in the manifest."""
    shard_tokens, val_tokens = manifest["shard_tokens"], manifest["val_tokens"]
    index, skip = manifest["items"], manifest["item_tokens"]
    in_val = val_tokens > 0 and not manifest["shards"]
    # The shard being filled, written as its ids arrive (memory holds none of it), and its count.
    shard, count = None, 0

    def append(ids: np.ndarray) -> None:
        nonlocal shard, count
        if not len(ids):
            return
        if shard is None:  # numbered as the peers number them: val 0, train from 1
            number = len(manifest["shards"]) + (0 if val_tokens > 0 else 1)
            split = "val" if in_val else "train"
            name = f"{manifest['prefix']}_{split}_{number:06d}.{manifest['fmt']}"
            shard = AtomicFile(out / name)
            shard.file.write(_header(shard.target, 0))
        shard.file.write(np.ascontiguousarray(ids, dtype="<u2").data)
        count += len(ids)
        bar.update(len(ids))

    def flush(items: int, item_tokens: int) -> Path:
        nonlocal shard, count
        shard.file.seek(0)
        shard.file.write(_header(shard.target, count))
        shard.commit()
        manifest["shards"].append(shard.target.name)
        manifest.update(items=items, item_tokens=item_tokens, tokens=manifest["tokens"] + count)
        _write_manifest(out, manifest)
        file, shard, count = shard.target, None, 0
        return file

    items = iter(documents)
    skipped = sum(1 for _ in itertools.islice(items, index))  # consumed: not tokenized again
    if skipped < index:
        raise ValueError(
            f"{out} holds the shards of {index:,} pieces of input, but this input has "
            f"{skipped:,}: give the same source, or an empty folder"
        )
    get_tokenizer()  # built once here: forked workers inherit it (others build their own)
    # The pool first: forked before the bar starts its monitor thread. disable=None: no bar
    # where stderr is not a terminal (a log file), whose lines it would fill.
    with (
        Pool(workers, initializer=_start_worker) as pool,
        tqdm(
            initial=manifest["tokens"],
            unit="tok",
            unit_scale=True,
            desc="tokenizing",
            disable=None if progress else True,
        ) as bar,
    ):
        try:
            for ids, starts in _encoded(items, pool, workers):
                if in_val and starts and count >= val_tokens:  # the last document is in it whole
                    flush(index, 0)
                    in_val = False
                offset, skip = skip, 0  # a resumed item's first ids are in the shards already
                while not in_val and count + len(ids) - offset >= shard_tokens:
                    take = shard_tokens - count
                    append(ids[offset : offset + take])
                    offset += take
                    flush(*((index, offset) if offset < len(ids) else (index + 1, 0)))
                append(ids[offset:])
                index += 1
            if count:
                total, file = count, flush(index, 0)
                if in_val:
                    print(
                        f"all {total:,} tokens went to the validation shard {file}: lower "
                        "--val-tokens or --shard-tokens to have training shards",
                        file=sys.stderr,
                    )
        except BaseException:
            if shard is not None:  # nothing half-written is left: the manifest says where to go on
                shard.discard()
            raise
    manifest["done"] = True
    _write_manifest(out, manifest)
