"""Sources -> token ids in a cache file, which data.py reads through a memory map.

A source is a text file that data.path names (or the embedded corpus, when it names none), read as
documents in pieces. Their ids, each document after an <|endoftext|> as GPT-2 was trained, go to a
uint16 file named by a hash of the tokenizer and the sources' bytes, and reused by every later run.
Beside it, a record says what the file holds (its size, a checksum, the largest id): a file that no
longer matches its record (truncated, overwritten) is tokenized again, never trained on.
"""

from __future__ import annotations

import argparse
import ast
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
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_lightning.files import atomic_file, cache_home, remove_orphans
from gpt2_lightning.records import SUFFIXES as RECORD_SUFFIXES
from gpt2_lightning.records import (
    hub_documents,
    is_saved_dataset,
    read_records,
    saved_dataset_files,
    saved_documents,
)
from gpt2_lightning.shards import prepare_shards, read_shard, shard_files
from gpt2_lightning.tokenizer import get_tokenizer

EMBEDDED = "embedded"  # display name of the default corpus
VOCAB_SIZE = 50257  # GPT-2's ids are 0 .. 50256
EOT = 50256  # <|endoftext|>, before each document
TOKENIZER = f"gpt2:{VOCAB_SIZE}"  # a constant: a warm start builds no tokenizer
# In every cache key: the tokenizer, and the layout (<|endoftext|> before each document, as
# GPT-2, llm.c and build-nanogpt lay their tokens out), so a change of either is a new file.
_KEY = f"{TOKENIZER}\0<|endoftext|> before each document\0"
PIECE_BYTES = 4 << 20  # text is read in pieces of about this size: memory stays flat
# Cache files up to this size are checksummed at every start, which costs them under a second;
# larger ones only on request (data.verify, prepare --verify), and by their size otherwise.
CHECKSUM_BYTES = 1 << 30
TEXT_SUFFIXES = (".txt", *RECORD_SUFFIXES)  # what a folder's files are read as documents from
_PATH_HINT = (
    "give a text or record file (.txt, .jsonl, .json, .parquet), a folder or glob of them, "
    "token shards (.bin, .npy), a save_to_disk folder or hf://<dataset>"
)


def source_files(path: str | os.PathLike, key: str = "data.path") -> list[Path]:
    """The files data.path names: a file, a folder (its text and record files, recursively) or
    a glob."""
    text = str(path)
    if not text.strip():  # Path("") is the current folder
        raise ValueError(f"{key}={text!r} is empty: {_PATH_HINT}")
    root = Path(text)
    if root.is_file():  # as written, even with glob characters in its name ("book[2].txt")
        return [root]
    if root.is_dir():
        found = sorted(  # hidden files and folders (.git, .ipynb_checkpoints) left out, as by glob
            p
            for p in root.rglob("*")
            if p.suffix in TEXT_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise ValueError(
                f"{key}={text!r} is a folder that holds no text or record files "
                f"({', '.join(TEXT_SUFFIXES)})"
            )
        return found
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"{key}={text!r} is a glob that matches no files")
        return found
    what = "is not a file or folder" if root.exists() else "does not exist"  # /dev/null
    raise ValueError(f"{key}={text!r} {what}: {_PATH_HINT}")


# Standard-library folders left out of the embedded corpus: tests, GUI and demo code, and the
# codecs, whose docstrings are the same boilerplate a hundred times.
_SKIPPED = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "encodings",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
}


def embedded_files() -> list[Path]:
    """The files the embedded corpus is read from: Python's language reference (pydoc_data) and
    the standard library's modules."""
    import pydoc_data.topics

    modules = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED and not d.startswith("test")]
        modules += (
            Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test")
        )
    return [Path(pydoc_data.topics.__file__), *sorted(modules)]


def _clean(text: str) -> str:
    # Runs of spaces collapsed, reST underlines dropped: on raw text a small model learns spaces.
    lines = (" ".join(line.split()) for line in text.splitlines())
    text = "\n".join(line for line in lines if not (line and set(line) <= set("*=-~^")))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """The docstrings of a module and of its public classes and functions, in source order."""
    doc = ast.get_docstring(tree)
    if doc and len(doc.split()) >= 4:  # "Return self." teaches nothing
        yield doc
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if not node.name.startswith("_"):
                yield from _docstrings(node)


def embedded_documents() -> list[str]:
    """The default corpus (data/README.md): each topic of Python's language reference and the
    docstrings of each standard-library module, one document each, in a fixed shuffled order."""
    from pydoc_data.topics import topics

    named = {f"topic:{name}": text for name, text in topics.items()}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in embedded_files()[1:]:
        try:
            tree = ast.parse(file.read_bytes())
        except (SyntaxError, ValueError):  # a module of another Python's grammar
            continue
        text = "\n\n".join(_docstrings(tree))
        if text:
            named[str(file.relative_to(stdlib))] = text
    # Ordered by a hash of the name: the validation tail is a sample of both kinds of text.
    order = sorted(named, key=lambda name: hashlib.sha256(name.encode()).digest())
    return [_clean(named[name]) for name in order]


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


def _documents(
    files: list[Path], text_field: str = "text", piece_bytes: int = PIECE_BYTES
) -> Iterator[tuple[str, bool]]:
    """The files' text in order, as (piece, starts a document): a text file is one document, read
    in pieces; a record file holds one document per record."""
    for file in files:
        if file.suffix in RECORD_SUFFIXES:
            yield from ((doc, True) for doc in read_records(file, text_field))
        else:
            yield from ((piece, k == 0) for k, piece in enumerate(_pieces(file, piece_bytes)))


@dataclass(frozen=True)
class Source:
    """What data.path names, as the cache reads it."""

    name: str  # data.path as given (EMBEDDED for the default corpus): in messages and the record
    kind: str  # how it is read, in the cache keys: "text", "records:<field>", "hub:...", ...
    files: tuple[Path, ...]  # the files whose bytes decide the content (none for a hub dataset)
    pieces: Callable[[], Iterator[tuple[str, bool]]]  # its documents, as _documents gives them


def resolve_source(
    path: str | os.PathLike | None,
    text_field: str = "text",
    hf_name: str | None = None,
    hf_split: str = "train",
    key: str = "data.path",
) -> Source:
    """The documents data.path names: the embedded corpus (None), a Hugging Face dataset
    (hf://<repo>), a folder written by save_to_disk, or text and record files."""
    if path is None:
        files = embedded_files()
        return Source(EMBEDDED, "embedded", tuple(files), lambda: _whole(embedded_documents()))
    text = str(path)
    if text.startswith("hf://"):
        # hf://<repo>@<revision> pins a commit, tag or branch, and keys the cache by it; without
        # one, the default branch as first read is what the cache keeps
        repo, revision = text.removeprefix("hf://"), None
        if "@" in repo and not Path(repo).exists():  # not a local folder with @ in its name
            repo, revision = repo.split("@", 1)
        kind = f"hub:{repo}:{hf_name}:{hf_split}:{text_field}"
        kind += f"@{revision}" if revision else ""
        return Source(
            text,
            kind,
            (),
            lambda: _whole(hub_documents(repo, hf_name, hf_split, text_field, revision or None)),
        )
    if Path(text).is_dir() and is_saved_dataset(Path(text)):
        folder, kind = Path(text), f"saved:{hf_split}:{text_field}"
        pieces = lambda: _whole(saved_documents(folder, hf_split, text_field))  # noqa: E731
        return Source(text, kind, tuple(saved_dataset_files(folder)), pieces)
    files = source_files(path, key)
    records = any(file.suffix in RECORD_SUFFIXES for file in files)
    kind = f"records:{text_field}" if records else "text"
    return Source(text, kind, tuple(files), lambda: _documents(files, text_field))


def _whole(documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
    return ((doc, True) for doc in documents)


def _batches(
    pieces: Iterable[tuple[str, bool]],
    batch_bytes: int = PIECE_BYTES * max(4, os.cpu_count() or 1),
) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """The pieces in batches of about batch_bytes, each with its size in bytes."""
    batch, size = [], 0
    for piece, starts in pieces:
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


def cache_key(source: Source) -> str:
    """A hash of the tokenizer, how the source is read, and its content: every file's bytes in
    order (the embedded corpus: its documents; a hub dataset: its name, config, split, revision)."""
    digest = hashlib.sha256(f"{_KEY}{source.kind}\0".encode())
    if source.kind == EMBEDDED:  # made by this code from the files: a change of either counts
        for doc in embedded_documents():
            digest.update(doc.encode() + b"\0")
    else:
        for file in source.files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def stat_key(files: list[Path], kind: str = "text") -> str:
    """A hash of the tokenizer, how the files are read, and each file's absolute path, size and
    modification time."""
    # Reads no byte of the corpus: like make and rsync, same size and mtime means unchanged.
    digest = hashlib.sha256(f"{_KEY}{kind}\0".encode())
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


def rebuild_command(source: Source, cache_dir: Path) -> str:
    """The command that checks a source's cache file and tokenizes it again if it is damaged."""
    words = ["python", "-m", "gpt2_lightning.data", "prepare"]
    words += [] if source.kind == EMBEDDED else [source.name]
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
    source: Source | str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    verify: bool = False,
) -> Path:
    """The cache file of a source (or of what a data.path names; None = the embedded corpus),
    tokenized if new or if it does not match its record; verify: checksum it whatever its size."""
    if not isinstance(source, Source):
        source = resolve_source(source)
    cache_dir = cache_folder(cache_dir)
    index = cache_dir / "index" / f"{stat_key(list(source.files), source.kind)}.txt"
    name = _indexed_name(index) if source.files else None  # a hub dataset has no files to stat
    if name and (cache_dir / name).is_file() and mismatch(cache_dir / name, verify) is None:
        return cache_dir / name  # the files are unchanged since they were hashed: no byte is read
    target = cache_dir / f"{cache_key(source)}.bin"
    if not target.is_file():
        _tokenize(source, target, progress)
    elif reason := mismatch(target, verify):
        print(
            f"token cache {target} does not match its record ({reason}): tokenizing again",
            file=sys.stderr,
        )
        try:
            _tokenize(source, target, progress)
        except OSError as error:  # a cache this run cannot write: refused, never trained on
            raise ValueError(
                f"token cache {target} does not match its record ({reason}) and cannot be "
                f"written again ({error.strerror or error}): rebuild it where it can be, with "
                f"{rebuild_command(source, cache_dir)}"
            ) from None
    if source.files:
        with contextlib.suppress(OSError):  # the index only saves time: a read-only cache serves
            index.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(index, "w") as out:
                out.write(target.name)
    return target


def _tokenize(source: Source, target: Path, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A bar in bytes of text: text files' sizes are the total; records' are not their text's.
    total = sum(f.stat().st_size for f in source.files) if source.kind == "text" else None
    # disable=None: no bar where stderr is not a terminal (a log file), whose lines it would fill
    disable = None if progress else True
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=disable)
    count, crc, max_id = 0, 0, -1
    with (
        bar,  # closed on failure too
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        atomic_file(target) as out,
    ):
        for batch, size in _batches(source.pieces()):
            pieces = [piece for piece, _ in batch]
            for (_, starts), ids in zip(batch, encode_documents(pieces, pool), strict=True):
                if starts and len(ids):  # an empty document is none
                    ids = np.concatenate(([EOT], ids))
                ids = ids.astype(np.uint16)
                out.write(ids)
                count, crc = count + len(ids), zlib.crc32(ids, crc)
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
            bar.update(size)
        # Before the .bin takes its name (when this block ends): a .bin never lacks its record.
        record = CacheRecord(count, "uint16", crc, max_id, TOKENIZER, source.name)
        write_record(target, record)


def corpus_source(
    path: str | os.PathLike | None,
    key: str = "data.path",
    text_field: str = "text",
    hf_name: str | None = None,
    hf_split: str = "train",
) -> Source | list[Path]:
    """What data.path names, checked: its token shards (.bin, .npy), or a source of documents."""
    shards = None if path is None or str(path).startswith("hf://") else shard_files(path)
    return shards or resolve_source(path, text_field, hf_name, hf_split, key)


def corpus_arrays(
    source: Source | list[Path],
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    verify: bool = False,
) -> list[tuple[Path, np.ndarray]]:
    """The token arrays of a corpus, each with its file: shards read in place through a memory
    map, or the cache file of its documents (tokenized first if need be)."""
    if isinstance(source, list):
        return [(file, read_shard(file)) for file in source]
    target = tokenize_to_cache(source, cache_dir, progress, verify)
    return [(target, load_tokens(target))]


def load_tokens(file: Path) -> np.ndarray:
    """The cached ids as a read-only memory map (nothing is read until a window asks for it)."""
    if file.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(file, dtype=np.uint16, mode="r")


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt2_lightning.data prepare [path] [--out folder]` (or `.tokens`): fill the
    cache early, or write the corpus as token shards."""
    parser = argparse.ArgumentParser(prog="python -m gpt2_lightning.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare", help="tokenize a corpus into the token cache once, or into shards (--out)"
    )
    prepare.add_argument("path", nargs="?", help=f"default: the embedded corpus; {_PATH_HINT}")
    prepare.add_argument("--text-field", default="text", help="records' text field (default text)")
    prepare.add_argument("--hf-name", help="a Hugging Face dataset's config, e.g. sample-10BT")
    prepare.add_argument("--hf-split", default="train", help="its split (default train)")
    prepare.add_argument("--cache-dir", help="default: ~/.cache/gpt2_lightning/tokens")
    prepare.add_argument(
        "--verify",
        action="store_true",
        help="checksum a cached file whatever its size "
        f"(up to {CHECKSUM_BYTES >> 30} GiB it always is), and tokenize again if it is damaged",
    )
    shards = prepare.add_argument_group(
        "shards, as llm.c (.bin) and build-nanogpt (.npy) read them"
    )
    shards.add_argument("--out", help="write shards into this folder instead of the cache")
    shards.add_argument("--format", default="bin", help="bin (llm.c, default) or npy")
    shards.add_argument("--shard-tokens", type=int, default=100_000_000, help="default 10^8")
    shards.add_argument("--val-tokens", type=int, help="first shard's (whole documents); 0: none")
    shards.add_argument("--prefix", default="shard", help="names: <prefix>_{val,train}_000000")
    shards.add_argument("--workers", type=int, help="tokenizing processes (default: all cores)")
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the temporary file being written is removed as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        source = resolve_source(args.path, args.text_field, args.hf_name, args.hf_split)
        if args.out is not None:
            files = prepare_shards(
                source.pieces(),
                args.out,
                args.shard_tokens,
                args.format,
                args.val_tokens,
                args.workers,
                progress=True,
                prefix=args.prefix,
                source=source.name,
            )
            count = sum(len(read_shard(file)) for file in files)
            print(f"{count:,} tokens in {len(files)} shards in {args.out}")
        else:
            remove_orphaned_files(cache_folder(args.cache_dir))
            file = tokenize_to_cache(source, args.cache_dir, progress=True, verify=args.verify)
            count = file.stat().st_size // 2
            print(f"{count:,} tokens cached in {file}")
        if count == 0:
            raise ValueError(f"data.path={args.path!r} holds no text: the corpus is empty")
    except (ValueError, OSError) as error:  # OSError: a --cache-dir that cannot be a folder
        # named as this command's arguments, not as Hydra overrides
        message = str(error).replace("data.path=", "", 1).replace("data.cache_dir=", "--cache-dir ")
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = (
            "the finished shards are kept: run it again to go on"
            if args.out
            else "nothing was cached"
        )
        print(f"\ninterrupted: {done}", file=sys.stderr)
        return 130
    from gpt2_lightning.cli import override  # Hydra's parser: only this command needs it

    keys = {
        "data.path": args.out or args.path,
        "data.cache_dir": None if args.out else args.cache_dir,
    }
    if args.out is None and args.text_field != "text":
        keys["data.text_field"] = args.text_field
    if args.out is None and str(args.path).startswith("hf://"):
        keys |= {"data.hf_name": args.hf_name, "data.hf_split": args.hf_split}
    # quoted for Hydra, then for the shell
    command = " ".join(shlex.quote(override(key, value)) for key, value in keys.items() if value)
    print(f"train on them with: python -m gpt2_lightning.train {command}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
