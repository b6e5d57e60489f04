"""Sources and the token cache (python -m gpt2_lightning.data prepare), on small known texts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TEXT, dead_pid, messages, run_module, temp_file, write

from gpt2_lightning import tokens
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.tokens import (
    embedded_documents,
    load_tokens,
    main,
    source_files,
    tokenize_to_cache,
)

EOT = 50256
# What a path that names no corpus is told to be instead.
HINT = (
    "give a text or record file (.txt, .jsonl, .json, .parquet), a folder or glob of them, "
    "token shards (.bin, .npy), a save_to_disk folder or hf://<dataset>"
)


# About 600 GPT-2 tokens of plain prose.
def doc_ids(*docs: str) -> list[int]:
    """The ids of documents as the cache lays them out: <|endoftext|> before each one."""
    return [i for doc in docs for i in [EOT, *get_tokenizer().encode_ordinary(doc)]]


def cached_ids(path, cache_dir: Path) -> list[int]:
    return load_tokens(tokenize_to_cache(path, cache_dir)).tolist()


# --- sources -------------------------------------------------------------------------------------


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """Nested *.txt files plus files that are not text sources."""
    root = tmp_path / "corpus"
    write(root / "b.txt", "Second document.")
    write(root / "a" / "z.txt", "First document, in a subfolder.")
    write(root / "a" / "deeper" / "c.txt", "Third, two levels down.")
    write(root / "notes.md", "not a .txt file")
    write(root / "a" / "table.csv", "x,y\n1,2\n")
    return root


def test_folder_is_searched_recursively_sorted_and_txt_only(corpus_dir):
    files = source_files(corpus_dir)
    assert [f.relative_to(corpus_dir).as_posix() for f in files] == [
        "a/deeper/c.txt",
        "a/z.txt",
        "b.txt",
    ]


def test_glob_selects_files(corpus_dir):
    assert [f.name for f in source_files(corpus_dir / "*.txt")] == ["b.txt"]
    recursive = source_files(f"{corpus_dir}/**/*.txt")
    assert [f.name for f in recursive] == ["c.txt", "z.txt", "b.txt"]
    assert [f.name for f in source_files(corpus_dir / "*.md")] == ["notes.md"]


def test_a_path_that_exists_is_taken_as_written(tmp_path):
    # glob characters in an existing name: the file itself, not what the pattern matches
    book = write(tmp_path / "book[2].txt", "the second edition")
    write(tmp_path / "book2.txt", "what the pattern book[2].txt matches")
    assert source_files(book) == [book]
    folder = write(tmp_path / "corpus[2024]" / "a.txt", "one file").parent
    assert source_files(folder) == [folder / "a.txt"]


def test_a_folder_leaves_out_hidden_files_and_folders_named_txt(corpus_dir):
    write(corpus_dir / ".ipynb_checkpoints" / "b-checkpoint.txt", "a copy")
    write(corpus_dir / ".hidden.txt", "hidden")
    (corpus_dir / "folder.txt").mkdir()
    assert [f.name for f in source_files(corpus_dir)] == ["c.txt", "z.txt", "b.txt"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", f"data.path='' is empty: {HINT}"),  # not the current folder
        ("  ", "data.path='  ' is empty"),
        ("/dev/null", f"data.path='/dev/null' is not a file or folder: {HINT}"),
    ],
)
def test_paths_that_name_no_text_are_refused(path, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        source_files(path)


def test_single_file_is_its_own_source(tmp_path):
    file = write(tmp_path / "book.text", "any extension works for a named file")
    assert source_files(file) == [file]


def test_documents_are_joined_with_endoftext(tmp_path):
    doc1 = "The first document ends here."
    doc2 = "A second one, which starts fresh.\n"
    write(tmp_path / "docs" / "1.txt", doc1)
    write(tmp_path / "docs" / "2.txt", doc2)
    ids = cached_ids(tmp_path / "docs", tmp_path / "cache")
    assert ids == doc_ids(doc1, doc2)
    assert ids.count(EOT) == 2


def test_an_empty_document_gives_no_tokens(tmp_path):
    # not even its <|endoftext|>: an empty file or record is no document
    write(tmp_path / "docs" / "a.txt", "The first document.")
    write(tmp_path / "docs" / "b.txt", "")
    write(tmp_path / "docs" / "c.jsonl", '{"text": ""}\n{"text": "The last one."}\n')
    ids = cached_ids(tmp_path / "docs", tmp_path / "cache")
    assert ids == doc_ids("The first document.", "The last one.")


def test_folder_documents_follow_sorted_order(corpus_dir, tmp_path):
    docs = [f.read_text() for f in source_files(corpus_dir)]
    assert cached_ids(corpus_dir, tmp_path / "cache") == doc_ids(*docs)


@pytest.fixture(scope="module")
def embedded() -> list[str]:
    """The embedded corpus's documents, built once (it takes seconds: the stdlib is parsed)."""
    return embedded_documents()


def test_a_large_file_is_read_in_pieces_with_the_same_ids(tmp_path, embedded):
    # The embedded corpus with non-ASCII text, as one file read 4 KB at a time: a multi-byte
    # character can straddle two reads, and the cuts must not change a single id.
    # Then stretches without a place to cut: blank lines, a long line, indented lines.
    text = (
        "\n".join(embedded)
        + "Café, naïve, 漢字 — ünïcödé\n" * 50
        + "\n" * 10_000
        + "word " * 3_000
        + "\n  indented\n\tand tabbed\n \n"
    )
    file = write(tmp_path / "big.txt", text)
    documents = tokens._documents([file], piece_bytes=4 << 10)
    pieces = [piece for batch, _ in tokens._batches(documents, 64 << 10) for piece in batch]
    assert len(pieces) > 100 and sum(starts for _, starts in pieces) == 1
    assert "".join(piece for piece, _ in pieces) == text
    sizes = sorted(len(piece.encode()) for piece, _ in pieces)
    assert sizes[-3] < 8 << 10  # all but the pieces that hold the stretches without a cut
    assert sizes[-1] < 32 << 10
    enc = get_tokenizer()
    ids = [token for piece, _ in pieces for token in enc.encode_ordinary(piece)]
    assert ids == enc.encode_ordinary(text)


def test_text_that_is_not_utf8_is_refused_with_its_offset(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(
        ValueError, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 near offset 3\)"
    ):
        tokenize_to_cache(file, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_endoftext_written_in_a_file_is_plain_text(tmp_path):
    # Only the mark before each document is the special id; the literal string is ordinary text.
    file = write(tmp_path / "a.txt", "before <|endoftext|> after")
    ids = cached_ids(file, tmp_path / "cache")
    assert ids.count(EOT) == 1 and ids[0] == EOT  # the document's own
    assert get_tokenizer().decode(ids[1:]) == "before <|endoftext|> after"


# --- token cache ---------------------------------------------------------------------------------


@pytest.fixture
def count_batches(monkeypatch):
    """Counts calls of the batch encoder (the only way tokens are produced)."""
    calls = []
    original = tokens.encode_documents

    def counting(batch, pool):
        calls.append(len(batch))
        return original(batch, pool)

    monkeypatch.setattr(tokens, "encode_documents", counting)
    return calls


def test_cache_file_is_named_by_hash(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    target = tokenize_to_cache(file, tmp_path / "cache")
    assert target.parent == tmp_path / "cache"
    assert re.fullmatch(r"[0-9a-f]{32}\.bin", target.name)
    assert target.stat().st_size == 2 * len(doc_ids(TEXT))  # uint16
    record = target.with_suffix(".json").name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name, record, "index"]


def test_second_call_reuses_the_cache(tmp_path, count_batches):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")
    assert count_batches == [1]
    stat = first.stat()
    second = tokenize_to_cache(file, tmp_path / "cache")
    assert second == first
    assert count_batches == [1]  # not tokenized again
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_cache_key_is_the_content_not_the_path(tmp_path, count_batches):
    a = tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    b = tokenize_to_cache(write(tmp_path / "copy" / "b.txt", TEXT), tmp_path / "cache")
    assert a == b
    assert count_batches == [1]


def test_cache_keys_name_the_tokenizer_in_use():
    enc = get_tokenizer()
    assert tokens.TOKENIZER == f"{enc.name}:{enc.n_vocab}"


def test_unchanged_files_are_found_without_reading_them(tmp_path, monkeypatch):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")

    def no_reading(files):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(tokens, "cache_key", no_reading)
    assert tokenize_to_cache(file, tmp_path / "cache") == first


def test_a_touched_file_is_hashed_again_and_keeps_its_cache(tmp_path, count_batches):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert tokenize_to_cache(file, tmp_path / "cache") == first
    assert count_batches == [1]  # hashed, found, not tokenized again
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2


def test_a_cache_whose_index_cannot_be_written_still_serves(tmp_path, monkeypatch):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")
    for entry in (tmp_path / "cache" / "index").iterdir():
        entry.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert tokenize_to_cache(file, tmp_path / "cache") == first  # found by content, no error
    assert list((tmp_path / "cache" / "index").iterdir()) == []


def test_index_entry_for_a_deleted_cache_file_is_not_trusted(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")
    first.unlink()
    again = tokenize_to_cache(file, tmp_path / "cache")
    assert again == first and load_tokens(again).tolist() == doc_ids(TEXT)


def test_changed_text_gets_a_new_cache_file(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    old = tokenize_to_cache(file, tmp_path / "cache")
    write(file, TEXT + " One more sentence.")
    new = tokenize_to_cache(file, tmp_path / "cache")
    assert new != old
    assert old.exists()
    assert load_tokens(new).tolist() == doc_ids(TEXT + " One more sentence.")
    assert load_tokens(old).tolist() == doc_ids(TEXT)


def test_no_temp_files_are_left_behind(tmp_path, corpus_dir):
    tokenize_to_cache(corpus_dir, tmp_path / "cache")
    tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())  # hex names sort first
    assert len(names) == 5 and names[4] == "index"
    assert [Path(n).suffix for n in names[:4]] == [".bin", ".json"] * 2  # a file and its record
    index = [p.name for p in (tmp_path / "cache" / "index").iterdir()]
    assert len(index) == 2 and all(name.endswith(".txt") for name in index)


@pytest.mark.parametrize("error", [RuntimeError("tokenizer crashed"), KeyboardInterrupt()])
def test_failure_mid_tokenization_leaves_nothing(tmp_path, corpus_dir, monkeypatch, error):
    enc = get_tokenizer()
    written = []

    def fail_after_first(batch, pool):
        # The first document's ids reach the temp file before the failure.
        written.append(enc.encode_ordinary(batch[0]))
        yield np.array(written[-1], dtype=np.uint32)
        raise error

    monkeypatch.setattr(tokens, "encode_documents", fail_after_first)
    cache = tmp_path / "cache"
    with pytest.raises(type(error)):
        tokenize_to_cache(corpus_dir, cache)
    assert len(written) == 1 and written[0]
    assert list(cache.iterdir()) == []


def test_empty_file_caches_zero_tokens(tmp_path):
    target = tokenize_to_cache(write(tmp_path / "empty.txt", ""), tmp_path / "cache")
    assert target.stat().st_size == 0
    assert len(load_tokens(target)) == 0


# --- the embedded corpus -------------------------------------------------------------------------


def test_embedded_corpus_is_cleaned_prose(embedded):
    docs = embedded
    assert 350 <= len(docs) <= 700  # 79 topics and 381 modules' docstrings on Python 3.11
    for doc in docs:
        assert doc.endswith("\n") and doc.strip()
        assert "  " not in doc
        assert "\n\n\n" not in doc
        for line in doc.splitlines():
            assert not (line and set(line) <= set("*=-~^")), line


def test_embedded_corpus_holds_the_reference_and_the_docstrings_mixed(embedded):
    from pydoc_data.topics import topics

    docs = embedded
    at = [docs.index(tokens._clean(topics[name])) for name in topics]  # every topic, whole
    # The modules' docstrings, e.g. json's, are a document of their own.
    assert any(doc.startswith("JSON (JavaScript Object Notation)") for doc in docs)
    # Shuffled by a hash of the name, in the same order every time: the validation tail (the
    # last 10%) holds both kinds of text.
    assert embedded_documents() == docs
    tail_topics = sum(i >= len(docs) * 0.9 for i in at)
    assert tail_topics >= 3 and len(docs) * 0.1 - tail_topics >= 3


def test_a_document_holds_public_docstrings_in_source_order(tmp_path):
    source = '''"""The module, in four words."""
class Shown:
    """A public class and its words."""
    def method(self):
        """A public method and its words."""
    def _hidden(self):
        """A private helper, left out."""
def short():
    """Too short."""
'''
    tree = tokens.ast.parse(source)
    assert list(tokens._docstrings(tree)) == [
        "The module, in four words.",
        "A public class and its words.",
        "A public method and its words.",
    ]


def test_embedded_corpus_has_over_400k_tokens(token_cache, embedded):
    ids = load_tokens(tokenize_to_cache(None, token_cache))
    assert len(ids) > 400_000
    assert int(ids.max()) == EOT
    assert int((ids == EOT).sum()) == len(embedded)


def test_cache_files_are_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    finally:
        os.umask(umask)
    (index,) = (tmp_path / "cache" / "index").iterdir()
    assert target.stat().st_mode & 0o777 == 0o644  # a temporary file's would be 0600
    assert index.stat().st_mode & 0o777 == 0o644


# --- python -m gpt2_lightning.data prepare -------------------------------------------------------


@pytest.mark.parametrize("module", ["gpt2_lightning.data", "gpt2_lightning.tokens"])
def test_prepare_command_caches_and_reports_the_count(tmp_path, module):
    file = write(tmp_path / "text.txt", TEXT)
    cache = tmp_path / "cache"
    result = run_module(module, "prepare", str(file), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    n = len(doc_ids(TEXT))
    (target,) = cache.glob("*.bin")
    assert f"{n:,} tokens cached in {target}" in result.stdout
    # the hint for training names the same cache, quoted for the shell
    hint = f"python -m gpt2_lightning.train data.path={file} data.cache_dir={cache}"
    assert hint in result.stdout
    assert len(load_tokens(target)) == n
    # The same cache file the training run will look up.
    assert tokenize_to_cache(file, cache) == target


def test_prepare_command_prints_a_training_command_hydra_reads(tmp_path):
    from gpt2_lightning.cli import parse

    file = write(tmp_path / "book[2], final.txt", TEXT)
    result = run_module("gpt2_lightning.data", "prepare", str(file), "--cache-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("train on them")]
    words = shlex.split(line.split("with: ", 1)[1])
    assert words[:3] == ["python", "-m", "gpt2_lightning.train"]
    assert [parse(word).value() for word in words[3:]] == [str(file), str(tmp_path)]


def test_prepare_command_names_a_missing_path(tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = run_module(
        "gpt2_lightning.data", "prepare", str(missing), "--cache-dir", str(tmp_path)
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == f"error: {str(missing)!r} does not exist: {HINT}"
    assert list(tmp_path.iterdir()) == []  # no cache file, no temp file


def test_prepare_command_refuses_a_cache_dir_that_is_a_file(tmp_path, capsys):
    corpus = write(tmp_path / "text.txt", TEXT)
    not_a_dir = write(tmp_path / "cache", "a file")
    assert main(["prepare", str(corpus), "--cache-dir", str(not_a_dir)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --cache-dir {str(not_a_dir)!r} is a file: give a folder\n"
    assert not_a_dir.read_text() == "a file"


def test_prepare_command_refuses_an_empty_corpus(tmp_path, capsys):
    empty = write(tmp_path / "empty.txt", "")
    assert main(["prepare", str(empty), "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert f"error: {str(empty)!r} holds no text: the corpus is empty" in err


# `python -m gpt2_lightning.data prepare <args>`, signalled from inside its first batch.
SIGNAL_IN_FIRST_BATCH = """
import os, runpy, sys
from gpt2_lightning import tokens

encode, signum = tokens.encode_documents, int(sys.argv[1])

def signalled(batch, pool):
    os.kill(os.getpid(), signum)
    return encode(batch, pool)

tokens.encode_documents = signalled
sys.argv = ["gpt2_lightning.data", "prepare", *sys.argv[2:]]
runpy.run_module("gpt2_lightning.data", run_name="__main__")
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_prepare_command_stopped_by_a_signal_caches_nothing(tmp_path, corpus_dir, signum, code):
    cache = tmp_path / "cache"
    args = [str(int(signum)), str(corpus_dir), "--cache-dir", str(cache)]
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_FIRST_BATCH, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == code, result.stderr
    assert ("interrupted: nothing was cached" in result.stderr) == (signum == signal.SIGINT)
    assert list(cache.iterdir()) == []  # no cache file, no temp file, no index


# --- the verified cache: what a start finds damaged is never trained on -------------------------


def cache_files(cache: Path) -> dict[str, int]:
    """Every file under the cache (index entries included) and its size."""
    return {p.relative_to(cache).as_posix(): p.stat().st_size for p in cache.rglob("*.*")}


def third_overwritten(target: Path, low: int, high: int) -> None:
    """The middle third of a cache file overwritten, in place, with random ids in [low, high)."""
    ids = np.fromfile(target, dtype=np.uint16)
    third = len(ids) // 3
    ids[third : 2 * third] = np.random.default_rng(0).integers(low, high, third)
    ids.tofile(target)


# The damages issue 19 found trained on (or fatal) at 33c0acd, a record lost, and each reason.
DAMAGE = {
    "truncated to an even size": (
        lambda target: os.truncate(target, 600),
        "size: 600 bytes, the record says {size:,}",
    ),
    "truncated to an odd size": (
        lambda target: os.truncate(target, 601),
        "size: 601 bytes, the record says {size:,}",
    ),
    "a third overwritten with ids below 50257": (
        lambda target: third_overwritten(target, 0, 50257),
        "checksum",
    ),
    "a third overwritten with ids of 50257 and more": (
        lambda target: third_overwritten(target, 50257, 65536),
        "checksum",
    ),
    "its record missing": (lambda target: target.with_suffix(".json").unlink(), "no record"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_prepare_tokenizes_a_damaged_cache_file_again_in_one_line(tmp_path, damage):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    before, size = cache_files(cache), target.stat().st_size
    damage_file, reason = DAMAGE[damage]
    damage_file(target)
    result = run_module("gpt2_lightning.data", "prepare", str(file), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    line = f"token cache {target} does not match its record ({reason.format(size=size)})"
    assert messages(result.stderr) == [f"{line}: tokenizing again"]
    assert load_tokens(target).tolist() == doc_ids(TEXT)
    assert tokens.mismatch(target) is None
    assert cache_files(cache) == before  # nothing lost, nothing left over


def test_a_damaged_cache_file_of_the_embedded_corpus_is_tokenized_again(
    tmp_path, token_cache, capsys
):
    cached = tokenize_to_cache(None, token_cache)  # copied, not tokenized once more
    target = tmp_path / cached.name
    for suffix in (".bin", ".json"):
        shutil.copy(cached.with_suffix(suffix), target.with_suffix(suffix))
    expected = load_tokens(cached).tolist()
    third_overwritten(target, 50257, 65536)
    assert tokenize_to_cache(None, tmp_path) == target
    assert capsys.readouterr().err == (
        f"token cache {target} does not match its record (checksum): tokenizing again\n"
    )
    assert load_tokens(target).tolist() == expected


def test_the_record_says_what_the_cache_file_holds(tmp_path):
    target = tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    ids = doc_ids(TEXT)
    assert tokens.read_record(target) == tokens.CacheRecord(
        tokens=len(ids),
        dtype="uint16",
        crc32=zlib.crc32(np.array(ids, dtype=np.uint16).tobytes()),
        max_id=max(ids),
        tokenizer="gpt2:50257",
        source=str(tmp_path / "a.txt"),
    )


@pytest.mark.parametrize(
    "record",
    [
        b"\x8c\x00{",  # bytes
        b'{"tokens": 599}',  # fields missing
        b'{"tokens": "599", "dtype": "uint16", "crc32": 1, "max_id": 1, "tokenizer": "gpt2:50257",'
        b' "source": "a.txt"}',  # a number as a string
        b"[1, 2]",
    ],
)
def test_a_record_that_cannot_be_read_is_no_record(tmp_path, record, capsys):
    file = write(tmp_path / "a.txt", TEXT)
    target = tokenize_to_cache(file, tmp_path)
    target.with_suffix(".json").write_bytes(record)
    assert tokens.read_record(target) is None
    assert tokenize_to_cache(file, tmp_path) == target
    line = f"token cache {target} does not match its record (no record): tokenizing again"
    assert capsys.readouterr().err == line + "\n"
    assert tokens.read_record(target).tokens == len(doc_ids(TEXT))


def test_a_record_without_its_cache_file_is_written_again(tmp_path, capsys):
    # killed after the record took its name, before the .bin took its own
    file = write(tmp_path / "a.txt", TEXT)
    target = tokenize_to_cache(file, tmp_path)
    target.unlink()
    assert tokenize_to_cache(file, tmp_path) == target
    assert capsys.readouterr().err == ""  # a new file, as if none had been written
    assert tokens.mismatch(target) is None


def test_a_cache_file_over_the_checksum_limit_is_checked_by_size_unless_verified(
    tmp_path, monkeypatch, capsys
):
    file = write(tmp_path / "a.txt", TEXT)
    target = tokenize_to_cache(file, tmp_path / "cache")
    third_overwritten(target, 0, 50257)
    monkeypatch.setattr(tokens, "CHECKSUM_BYTES", target.stat().st_size - 1)  # one byte over
    damaged = target.read_bytes()
    assert tokenize_to_cache(file, tmp_path / "cache") == target  # the size matches: served
    assert target.read_bytes() == damaged and capsys.readouterr().err == ""
    assert tokenize_to_cache(file, tmp_path / "cache", verify=True) == target
    line = f"token cache {target} does not match its record (checksum): tokenizing again"
    assert capsys.readouterr().err == line + "\n"
    assert load_tokens(target).tolist() == doc_ids(TEXT)


# `python -m gpt2_lightning.data prepare <args>` with the checksum limit at 1 KB (not 1 GiB).
SMALL_CHECKSUM_LIMIT = """
import runpy, sys
from gpt2_lightning import tokens

tokens.CHECKSUM_BYTES = 1000
sys.argv = ["gpt2_lightning.data", *sys.argv[1:]]
runpy.run_module("gpt2_lightning.data", run_name="__main__")
"""


def test_prepare_verify_checksums_a_cache_file_over_the_limit(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    assert target.stat().st_size > 1000  # over the limit: without --verify, checked by size
    before = cache_files(cache)
    third_overwritten(target, 0, 50257)
    args = ["prepare", str(file), "--cache-dir", str(cache), "--verify"]
    result = subprocess.run(
        [sys.executable, "-c", SMALL_CHECKSUM_LIMIT, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    line = f"token cache {target} does not match its record (checksum): tokenizing again"
    assert messages(result.stderr) == [line]
    assert load_tokens(target).tolist() == doc_ids(TEXT)
    assert cache_files(cache) == before


def test_a_damaged_cache_file_that_cannot_be_written_again_is_refused(tmp_path, monkeypatch):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    third_overwritten(target, 0, 50257)
    damaged, before = target.read_bytes(), cache_files(cache)

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError) as error:
        tokenize_to_cache(file, cache)
    assert str(error.value) == (
        f"token cache {target} does not match its record (checksum) and cannot be written again "
        "(Read-only file system): rebuild it where it can be, with python -m gpt2_lightning.data "
        f"prepare {file} --cache-dir {cache} --verify"
    )
    assert target.read_bytes() == damaged and cache_files(cache) == before  # nothing removed


def test_prepare_refuses_a_damaged_cache_it_cannot_write_in_one_line(tmp_path, monkeypatch, capsys):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    os.truncate(target, 600)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert main(["prepare", str(file), "--cache-dir", str(cache)]) == 1
    reason = f"size: 600 bytes, the record says {2 * len(doc_ids(TEXT)):,}"
    assert messages(capsys.readouterr().err) == [
        f"token cache {target} does not match its record ({reason}): tokenizing again",
        f"error: token cache {target} does not match its record ({reason}) and cannot be written "
        "again (Permission denied): rebuild it where it can be, with python -m "
        f"gpt2_lightning.data prepare {file} --cache-dir {cache} --verify",
    ]
    assert target.stat().st_size == 600  # left as it was, for the user to look at


@pytest.mark.parametrize(
    "entry", [b"\x8c\xff not UTF-8", b"a.txt", b"../a.txt", b"index", b"", b"0" * 32 + b".bin"]
)
def test_a_broken_index_entry_is_rebuilt(tmp_path, entry, count_batches):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    (index,) = (cache / "index").iterdir()
    index.write_bytes(entry)
    stat = target.stat()
    assert tokenize_to_cache(file, cache) == target
    assert index.read_text() == target.name
    assert count_batches == [1]  # found by content, not tokenized again
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_prepare_rebuilds_an_index_entry_of_bytes(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    (index,) = (cache / "index").iterdir()
    index.write_bytes(b"\x8c\x01\xfe")
    before = cache_files(cache)
    result = run_module("gpt2_lightning.data", "prepare", str(file), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert messages(result.stderr) == []
    assert index.read_text() == target.name
    assert cache_files(cache) == {**before, index.relative_to(cache).as_posix(): len(target.name)}


def test_prepare_removes_the_temp_files_of_killed_writers_and_says_so(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    cache = tmp_path / "cache"
    target = tokenize_to_cache(file, cache)
    before, stat = cache_files(cache), target.stat()
    pid = dead_pid()
    orphans = [temp_file(cache, pid, 54_000_000), temp_file(cache / "index", pid, 1_000_000)]
    alive = temp_file(cache, os.getpid(), 10)  # a writer still at work: its file is left
    result = run_module("gpt2_lightning.data", "prepare", str(file), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert messages(result.stderr) == [f"removed orphaned temporary files: 55.0 MB in {cache}"]
    assert not any(orphan.exists() for orphan in orphans) and alive.exists()
    alive.unlink()
    assert cache_files(cache) == before
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_prepare_without_a_path_caches_the_embedded_corpus(token_cache):
    result = run_module("gpt2_lightning.data", "prepare", "--cache-dir", str(token_cache))
    assert result.returncode == 0, result.stderr
    assert messages(result.stderr) == []
    target = tokenize_to_cache(None, token_cache)
    assert tokens.read_record(target).source == "embedded"
    assert result.stdout.splitlines() == [
        f"{len(load_tokens(target)):,} tokens cached in {target}",
        f"train on them with: python -m gpt2_lightning.train data.cache_dir={token_cache}",
    ]
