"""Sources -> token ids in a cache file, which data.py reads through a memory map.

A source is a text file that data.path names (or the embedded corpus, when it names none), read as
documents in pieces. Their ids, joined with <|endoftext|> as GPT-2 was trained, go to a uint16 file
named by a hash of the tokenizer and the sources' bytes, and reused by every later run. Beside it, a
record says what the file holds (its size, a checksum, the largest id): a file that no longer
matches its record (truncated, overwritten) is tokenized again, never trained on.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_lightning.files import atomic_file, cache_home, remove_orphans
from gpt2_lightning.tokenizer import get_tokenizer

EMBEDDED = "embedded"  # display name of the default corpus
VOCAB_SIZE = 50257  # GPT-2's ids are 0 .. 50256
TOKENIZER = f"gpt2:{VOCAB_SIZE}"  # in every cache key; a constant: a warm start builds no tokenizer
PIECE_BYTES = 4 << 20  # text is read in pieces of about this size: memory stays flat
# Cache files up to this size are checksummed at every start, which costs them under a second;
# larger ones only on request (data.verify, prepare --verify), and by their size otherwise.
CHECKSUM_BYTES = 1 << 30
_PATH_HINT = "give a text file, a folder of *.txt files or a glob"


def source_files(path: str | os.PathLike) -> list[Path]:
    """The text files data.path names: a file, a folder (its *.txt, recursively) or a glob."""
    text = str(path)
    if not text.strip():  # Path("") is the current folder
        raise ValueError(f"data.path={text!r} is empty: {_PATH_HINT}")
    root = Path(text)
    if root.is_file():  # as written, even with glob characters in its name ("book[2].txt")
        return [root]
    if root.is_dir():
        found = sorted(  # hidden files and folders (.git, .ipynb_checkpoints) left out, as by glob
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
    what = "is not a file or folder" if root.exists() else "does not exist"  # /dev/null
    raise ValueError(f"data.path={text!r} {what}: {_PATH_HINT}")


def embedded_documents() -> list[str]:
    """The default corpus, one document a topic of Python's language reference (data/README.md)."""
    from pydoc_data.topics import topics

    # Runs of spaces collapsed, reST underlines dropped: on raw text a small model learns spaces.
    def clean(text: str) -> str:
        lines = (" ".join(line.split()) for line in text.splitlines())
        text = "\n".join(line for line in lines if not (line and set(line) <= set("*=-~^")))
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"

    return [clean(topics[name]) for name in sorted(topics)]


# The last newline between non-space characters (Python's \s holds all the tokenizer's \s, and
# more). The greedy .* backtracks from the end, so only the text after that newline is searched.
_LAST_CUT = re.compile(r".*\S\n(?=\S)", re.DOTALL)


def _pieces(file: Path, piece_bytes: int) -> Iterator[str]:
    """The text of file in pieces of about piece_bytes, each cut after a newline in "x\nY"."""
    # GPT-2's pre-tokenizer makes such a newline a token of its own, so the pieces' ids are the
    # file's ids (a cut in a run of spaces could change how it is split).
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
                if text or first:  # an empty file is an empty document
                    yield text
                return
            # rest had no place to cut but maybe its very end, whose next character came now
            found = _LAST_CUT.match(text, max(0, len(rest) - 3))
            cut = found.end() if found else 0
            if cut:
                yield text[:cut]
                first = False
            rest = text[cut:]


def _documents(files: list[Path] | None, piece_bytes: int) -> Iterator[tuple[str, bool]]:
    """The sources' text in order (None = the embedded corpus), as (piece, starts a document)."""
    if files is None:
        return ((doc, True) for doc in embedded_documents())
    return ((piece, k == 0) for file in files for k, piece in enumerate(_pieces(file, piece_bytes)))


def _batches(
    files: list[Path] | None,
    batch_bytes: int = PIECE_BYTES * max(4, os.cpu_count() or 1),
    piece_bytes: int = PIECE_BYTES,
) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """The sources' pieces in batches of about batch_bytes, each with its size in bytes."""
    batch, size = [], 0
    for piece, starts in _documents(files, piece_bytes):
        batch.append((piece, starts))
        size += len(piece.encode())
        if size >= batch_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def encode_documents(documents: list[str], pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """The token ids of each document, in order, as uint32 arrays, encoded on the pool's threads."""
    # encode_to_numpy hands over tiktoken's buffer (encode_ordinary_batch builds an int per token);
    # with no special token allowed, <|endoftext|> inside a text is plain text.
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


def stat_key(files: list[Path]) -> str:
    """A hash of the tokenizer and each file's absolute path, size and modification time."""
    # Reads no byte of the corpus: like make and rsync, same size and mtime means unchanged.
    digest = hashlib.sha256(f"{TOKENIZER}\0".encode())
    for file in files:
        st = file.stat()
        digest.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class CacheRecord:
    """What a cache file <key>.bin holds, written as <key>.json before the .bin takes its name."""

    tokens: int
    dtype: str
    crc32: int  # of the file's bytes
    max_id: int  # -1 when there are no tokens
    tokenizer: str
    source: str  # the data.path that wrote it (EMBEDDED for the default corpus), for people


def read_record(file: Path) -> CacheRecord | None:
    """The record of a cache file, or None if it has none that can be read."""
    try:
        record = CacheRecord(**json.loads(file.with_suffix(".json").read_bytes()))
    except (OSError, ValueError, TypeError):  # missing; not JSON or not UTF-8; other fields
        return None
    numbers = (record.tokens, record.crc32, record.max_id)
    return record if all(type(number) is int for number in numbers) else None


def write_record(file: Path, record: CacheRecord) -> None:
    """Write the record of a cache file beside it, atomically."""
    with atomic_file(file.with_suffix(".json"), "w") as out:
        json.dump(asdict(record), out, indent=1)


def checksum(file: Path) -> int:
    """zlib's CRC-32 of the file's bytes, read in blocks: memory stays flat."""
    crc = 0
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def mismatch(file: Path, verify: bool = False) -> str | None:
    """Why a cache file does not match its record, or None when it does. The size is always
    checked; the checksum up to CHECKSUM_BYTES, and beyond them when verify is true."""
    record = read_record(file)
    if record is None:
        return "no record"
    if (record.tokenizer, record.dtype) != (TOKENIZER, "uint16") or record.max_id >= VOCAB_SIZE:
        return f"written for {record.tokenizer} as {record.dtype}, ids up to {record.max_id}"
    size = file.stat().st_size
    if size != 2 * record.tokens:
        return f"size: {size:,} bytes, the record says {2 * record.tokens:,}"
    if (verify or size <= CHECKSUM_BYTES) and checksum(file) != record.crc32:
        return "checksum"
    return None


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """data.cache_dir as a folder (None = the default one under ~/.cache)."""
    folder = Path(cache_dir) if cache_dir else cache_home("tokens")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"data.cache_dir={str(folder)!r} is a file: give a folder")
    return folder


def remove_orphaned_files(cache_dir: Path) -> None:
    """Remove the temporary files that killed writers left in the cache, saying what it freed."""
    freed = remove_orphans(cache_dir) + remove_orphans(cache_dir / "index")
    if freed:
        print(
            f"removed orphaned temporary files: {freed / 1e6:.1f} MB in {cache_dir}",
            file=sys.stderr,
        )


def rebuild_command(path: str | os.PathLike | None, cache_dir: Path) -> str:
    """The command that checks path's cache file and tokenizes it again if it is damaged."""
    words = ["python", "-m", "gpt2_lightning.data", "prepare"]
    words += [] if path is None else [str(path)]
    words += [] if cache_dir == cache_home("tokens") else ["--cache-dir", str(cache_dir)]
    return shlex.join([*words, "--verify"])


_CACHE_NAME = re.compile(r"[0-9a-f]{32}\.bin")


def _indexed_name(index: Path) -> str | None:
    """The cache file name an index entry holds; None if it holds none (it is then rebuilt)."""
    try:
        name = index.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):  # no entry yet; bytes that are not a name
        return None
    return name if _CACHE_NAME.fullmatch(name) else None


def tokenize_to_cache(
    path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    verify: bool = False,
) -> Path:
    """The cache file of data.path's sources (None = the embedded corpus), tokenized if new or if
    it does not match its record; verify: checksum it whatever its size."""
    files = None if path is None else source_files(path)
    cache_dir = cache_folder(cache_dir)
    index = None if files is None else cache_dir / "index" / f"{stat_key(files)}.txt"
    name = None if index is None else _indexed_name(index)
    if name and (cache_dir / name).is_file() and mismatch(cache_dir / name, verify) is None:
        return cache_dir / name  # the files are unchanged since they were hashed: no byte is read
    target = cache_dir / f"{cache_key(files)}.bin"
    source = EMBEDDED if path is None else str(path)
    if not target.is_file():
        _tokenize(files, target, source, progress)
    elif reason := mismatch(target, verify):
        print(
            f"token cache {target} does not match its record ({reason}): tokenizing again",
            file=sys.stderr,
        )
        try:
            _tokenize(files, target, source, progress)
        except OSError as error:  # a cache this run cannot write: refused, never trained on
            raise ValueError(
                f"token cache {target} does not match its record ({reason}) and cannot be "
                f"written again ({error.strerror or error}): rebuild it where it can be, with "
                f"{rebuild_command(path, cache_dir)}"
            ) from None
    if index is not None:
        with contextlib.suppress(OSError):  # the index only saves time: a read-only cache serves
            index.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(index, "w") as out:
                out.write(target.name)
    return target


def _tokenize(files: list[Path] | None, target: Path, source: str, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(f.stat().st_size for f in files) if files else None
    eot = get_tokenizer().eot_token
    # disable=None: no bar where stderr is not a terminal (a log file), whose lines it would fill
    disable = None if progress else True
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=disable)
    count, crc, max_id = 0, 0, -1
    with (
        bar,  # closed on failure too
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        atomic_file(target) as out,
    ):
        for batch, size in _batches(files):
            pieces = [piece for piece, _ in batch]
            for (_, starts), ids in zip(batch, encode_documents(pieces, pool), strict=True):
                if starts and count:  # between documents
                    ids = np.concatenate(([eot], ids))
                ids = ids.astype(np.uint16)
                out.write(ids)
                count, crc = count + len(ids), zlib.crc32(ids, crc)
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
            bar.update(size)
        # Before the .bin takes its name (when this block ends): a .bin never lacks its record.
        write_record(target, CacheRecord(count, "uint16", crc, max_id, TOKENIZER, source))


def load_tokens(file: Path) -> np.ndarray:
    """The cached ids as a read-only memory map (nothing is read until a window asks for it)."""
    if file.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(file, dtype=np.uint16, mode="r")


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt2_lightning.data prepare [path]` (or `.tokens`): fill the cache early."""
    parser = argparse.ArgumentParser(prog="python -m gpt2_lightning.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into the token cache once")
    prepare.add_argument(
        "path",
        nargs="?",
        help="a text file, a folder of *.txt files, or a glob (default: the embedded corpus)",
    )
    prepare.add_argument("--cache-dir", help="default: ~/.cache/gpt2_lightning/tokens")
    prepare.add_argument(
        "--verify",
        action="store_true",
        help="checksum a cached file whatever its size "
        f"(up to {CHECKSUM_BYTES >> 30} GiB it always is), and tokenize again if it is damaged",
    )
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the temporary file being written is removed as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        remove_orphaned_files(cache_folder(args.cache_dir))
        file = tokenize_to_cache(args.path, args.cache_dir, progress=True, verify=args.verify)
        if file.stat().st_size == 0:
            raise ValueError(f"data.path={args.path!r} holds no text: the corpus is empty")
    except (ValueError, OSError) as error:  # OSError: a --cache-dir that cannot be a folder
        # named as this command's arguments, not as Hydra overrides
        message = str(error).replace("data.path=", "", 1).replace("data.cache_dir=", "--cache-dir ")
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was cached", file=sys.stderr)
        return 130
    print(f"{file.stat().st_size // 2:,} tokens cached in {file}")
    from gpt2_lightning.cli import override  # Hydra's parser: only this command needs it

    keys = {"data.path": args.path, "data.cache_dir": args.cache_dir}
    # quoted for Hydra, then for the shell
    command = " ".join(shlex.quote(override(key, value)) for key, value in keys.items() if value)
    print(f"train on them with: python -m gpt2_lightning.train {command}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
