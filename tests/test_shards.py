"""Shards (llm.c's .bin, build-nanogpt's .npy): read in place, written, prepared in parallel."""

from __future__ import annotations

import io
import itertools
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dead_pid, in_a_terminal, run_module, temp_file

from gpt2_lightning import shards
from gpt2_lightning.shards import (
    is_val_shard,
    prepare_shards,
    read_shard,
    shard_files,
    write_shard,
)
from gpt2_lightning.tokenizer import get_tokenizer

EOT = 50256
WORDS = "the quick brown fox jumps over a lazy dog while rain falls on old stone walls".split()


def corpus() -> list[tuple[str, bool]]:
    """30 documents of 5 to 30 tokens, some in two pieces, one empty: 634 tokens with the EOTs."""
    items = []
    for i in range(30):
        words = [WORDS[(i + 3 * j) % len(WORDS)] for j in range(3 + (i * 7) % 23)]
        items.append((" ".join(words).capitalize() + f" ({i}).\n", True))
        if i % 4 == 1:
            items.append((f"And document {i} goes on.\n", False))
    items.insert(5, ("", True))
    return items


def expected(items: list[tuple[str, bool]]) -> list[int]:
    """The peers' stream: <|endoftext|> before each document, none before a continuation, and
    none for an empty document."""
    enc = get_tokenizer()
    return [
        i
        for text, starts in items
        for i in [EOT] * (starts and bool(text)) + enc.encode_ordinary(text)
    ]


def header(*ints: int) -> bytes:
    return struct.pack("<256i", *ints, *[0] * (256 - len(ints)))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def stream(files: list[Path]) -> list[int]:
    return [int(i) for f in files for i in read_shard(f)]


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of ~40 characters a worker: the input goes to the pool in many batches."""
    monkeypatch.setattr(shards, "BATCH_CHARS", 40)


def prepare(items, out: Path, **options) -> list[Path]:
    options = {"shard_tokens": 50, "val_tokens": 60, "workers": 1, "progress": False, **options}
    return prepare_shards(items, out, **options)


# --- reading and writing -------------------------------------------------------------------------


def test_read_shard_maps_a_bin_file_written_by_hand(tmp_path):
    file = tmp_path / "fineweb_train_000001.bin"
    file.write_bytes(header(20240520, 1, 4) + struct.pack("<4H", 50256, 31373, 995, 65535))
    tokens = read_shard(file)
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert (tokens.dtype, tokens.shape) == (np.uint16, (4,))
    assert tokens.tolist() == [50256, 31373, 995, 65535]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (header(20240520, 1, 0)[:1000], "is 1000 bytes, shorter than the 1024-byte header"),
        (header(12345, 1, 0), "magic number is 12345, expected 20240520"),
        (header(20240520, 2, 0), "version 2: only version 1"),
        (header(20240520, 1, 5) + bytes(6), "holds 6 bytes of tokens but its header says 5 tokens"),
    ],
)
def test_read_shard_refuses_a_bad_bin_header_in_one_line(tmp_path, data, fragment):
    file = tmp_path / "bad.bin"
    file.write_bytes(data)
    with pytest.raises(ValueError) as error:
        read_shard(file)
    assert fragment in one_line(error) and str(file) in str(error.value)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.arange(3, dtype=np.int32), "holds a int32 array of shape (3,): a .npy shard is a 1-D"),
        (np.zeros((2, 2), dtype=np.uint16), "holds a uint16 array of shape (2, 2)"),
        (None, "is not a .npy array numpy can map"),
    ],
)
def test_read_shard_refuses_a_bad_npy_in_one_line(tmp_path, array, fragment):
    file = tmp_path / "bad.npy"
    if array is None:
        file.write_text("not numpy\nat all\n")
    else:
        np.save(file, array)
    with pytest.raises(ValueError) as error:
        read_shard(file)
    assert fragment in one_line(error) and str(file) in str(error.value)


@pytest.mark.parametrize("tokens", [[50256, 0, 7, 65535], []])
def test_write_shard_round_trips_both_formats(tmp_path, tokens):
    array = np.array(tokens, dtype=np.int64)
    write_shard(tmp_path / "a.bin", array)
    write_shard(tmp_path / "a.npy", array)
    assert read_shard(tmp_path / "a.bin").tolist() == tokens
    assert read_shard(tmp_path / "a.npy").tolist() == tokens
    data = (tmp_path / "a.bin").read_bytes()
    assert struct.unpack("<3i", data[:12]) == (20240520, 1, len(tokens))
    assert len(data) == 1024 + 2 * len(tokens)
    saved = io.BytesIO()
    np.save(saved, np.array(tokens, dtype=np.uint16))  # build-nanogpt's writer, byte for byte
    assert (tmp_path / "a.npy").read_bytes() == saved.getvalue()
    assert np.load(tmp_path / "a.npy").dtype == np.uint16


def test_write_shard_refuses_ids_that_do_not_fit_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError) as error:
        write_shard(tmp_path / "a.bin", np.array([1, 65536]))
    assert "ids 1..65536 do not fit uint16" in one_line(error)
    with pytest.raises(ValueError) as error:
        write_shard(tmp_path / "a.txt", np.array([1]))
    assert "give it a .bin or .npy suffix" in one_line(error)
    assert list(tmp_path.iterdir()) == []


def test_shard_files_and_the_validation_shard(tmp_path):
    prepare(corpus(), tmp_path / "out")
    found = shard_files(tmp_path / "out")  # the manifest beside them is not a shard
    assert [p.name for p in found] == sorted(p.name for p in (tmp_path / "out").glob("*.bin"))
    train = [f for f in found if not is_val_shard(f)]
    val = [f for f in found if is_val_shard(f)]
    assert [p.name for p in val] == ["shard_val_000000.bin"]
    assert train[0].name == "shard_train_000001.bin" and len(train) == len(found) - 1
    assert shard_files(tmp_path / "out" / "*_train_*.bin") == train
    assert shard_files(found[0]) == [found[0]]
    (tmp_path / "out" / "notes.txt").write_text("x")
    assert shard_files(tmp_path / "out") is None  # a folder of text is a corpus, not shards
    assert shard_files(tmp_path / "out" / "notes.txt") is None
    assert shard_files(tmp_path / "missing") is None


# --- prepare -------------------------------------------------------------------------------------


def test_prepare_writes_the_peers_token_stream_in_shards(tmp_path):
    items = corpus()
    files = prepare(items, tmp_path / "out")
    ids = expected(items)
    assert len(ids) == 634
    assert stream(files) == ids
    names = [f.name for f in files]
    assert names[:3] == ["shard_val_000000.bin", "shard_train_000001.bin", "shard_train_000002.bin"]
    assert names == [f"shard_train_{k:06d}.bin" if k else "shard_val_000000.bin" for k in range(13)]
    # val: whole documents up to the first past 60 tokens; train: 50 each, split mid-document
    assert [len(read_shard(f)) for f in files] == [81] + [50] * 11 + [3]


def test_the_val_shard_holds_whole_documents_up_to_val_tokens(tmp_path):
    items = corpus()
    val = read_shard(prepare(items, tmp_path / "out")[0]).tolist()
    enc = get_tokenizer()
    # the stream's offsets where a document starts: the val shard ends at the first past 60
    starts, offset = [], 0
    for text, starts_document in items:
        if starts_document:
            starts.append(offset)
        offset += starts_document + len(enc.encode_ordinary(text))
    assert len(val) == min(s for s in starts if s >= 60)
    assert val == expected(items)[: len(val)]


def test_bin_and_npy_and_two_workers_give_the_same_tokens(tmp_path, small_batches):
    items = corpus()
    bins = prepare(items, tmp_path / "bin")
    npys = prepare(items, tmp_path / "npy", fmt="npy")
    assert [f.suffix for f in npys] == [".npy"] * len(bins)
    assert [read_shard(f).tolist() for f in npys] == [read_shard(f).tolist() for f in bins]
    prepare(items, tmp_path / "two", workers=2)
    assert contents(tmp_path / "two") == contents(tmp_path / "bin")


def test_val_tokens_zero_writes_no_validation_shard(tmp_path):
    items = corpus()
    files = prepare(items, tmp_path / "out", val_tokens=0)
    assert files[0].name == "shard_train_000001.bin" and not any(map(is_val_shard, files))
    assert stream(files) == expected(items)
    assert [len(read_shard(f)) for f in files] == [50] * 12 + [34]


def test_a_corpus_smaller_than_val_tokens_all_goes_to_the_validation_shard(tmp_path, capsys):
    items = corpus()
    files = prepare(items, tmp_path / "out", val_tokens=10_000)
    assert [f.name for f in files] == ["shard_val_000000.bin"]
    assert stream(files) == expected(items)
    err = capsys.readouterr().err
    assert "all 634 tokens went to the validation shard" in err and "--val-tokens" in err


def stopping(items: list[tuple[str, bool]], count: int):
    """The items, then a Ctrl-C when the next one is asked for."""
    yield from items[:count]
    raise KeyboardInterrupt


def test_a_stopped_prepare_resumes_to_the_same_shards(tmp_path, small_batches):
    items = corpus()
    prepare(items, tmp_path / "whole")
    partial_items = 0
    for stop in (3, 12, 20, 27, 33):
        out = tmp_path / f"stopped_at_{stop}"
        with pytest.raises(KeyboardInterrupt):
            prepare(stopping(items, stop), out)
        manifest = json.loads((out / "prepare.json").read_bytes())
        assert not manifest["done"] and manifest["items"] <= stop
        partial_items += manifest["item_tokens"] > 0
        # the consumed items are skipped, never tokenized: None in their place would fail
        prepare([(None, True)] * manifest["items"] + items[manifest["items"] :], out)
        assert contents(out) == contents(tmp_path / "whole")
    assert partial_items  # some stop fell inside an item split across two shards


def untouchable():
    """An input that fails when it is read."""
    raise AssertionError("the input was read")
    yield


def test_a_finished_prepare_run_again_writes_nothing(tmp_path):
    out = tmp_path / "out"
    files = prepare(corpus(), out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(untouchable(), out) == files
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ({"shard_tokens": 60}, "--shard-tokens 50, not 60"),
        ({"val_tokens": None}, "--val-tokens 60, not 50"),
        ({"fmt": "npy"}, "--format 'bin', not 'npy'"),
        ({"prefix": "fineweb"}, "--prefix 'shard', not 'fineweb'"),
        ({"source": "other/"}, "the source '', not 'other/'"),
    ],
)
def test_prepare_refuses_other_settings_on_a_prepared_folder(tmp_path, option, fragment):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(stopping(corpus(), 0), out)
    with pytest.raises(ValueError) as error:
        prepare(corpus(), out, **option)
    assert fragment in one_line(error)
    assert "give an empty folder or the same settings" in str(error.value)


def test_a_stopped_prepare_refuses_an_input_shorter_than_what_it_consumed(tmp_path, small_batches):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(stopping(corpus(), 20), out)
    consumed = json.loads((out / "prepare.json").read_bytes())["items"]
    with pytest.raises(ValueError) as error:
        prepare(corpus()[:3], out)
    assert f"the shards of {consumed} pieces of input, but this input has 3" in one_line(error)


def test_a_folder_left_by_a_killed_prepare_is_resumed_without_its_orphans(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(stopping(corpus(), 0), out)
    orphan = temp_file(out, dead_pid(), 1000)  # the shard a kill -9 stopped half-written
    files = prepare(corpus(), out)
    assert not orphan.exists() and stream(files) == expected(corpus())
    # a folder that holds only an orphan is empty
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    temp_file(fresh, dead_pid(), 10)
    assert stream(prepare(corpus(), fresh)) == expected(corpus())


def test_prepare_refuses_a_file_or_a_foreign_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError) as error:
        prepare(corpus(), tmp_path / "file")
    assert "is a file: give a folder" in one_line(error)
    with pytest.raises(ValueError) as error:
        prepare(corpus(), tmp_path)
    assert "holds files but no prepare.json" in one_line(error)


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ({"shard_tokens": 0}, "--shard-tokens 0 is not a positive whole number"),
        ({"shard_tokens": True}, "--shard-tokens True is not a positive whole number"),
        ({"val_tokens": -1}, "--val-tokens -1 is not a whole number >= 0"),
        ({"fmt": "txt"}, "--format 'txt' is not one of: bin, npy"),
        ({"workers": 0}, "--workers 0 is not a positive whole number"),
    ],
)
def test_prepare_refuses_bad_options_in_one_line(tmp_path, option, fragment):
    with pytest.raises(ValueError) as error:
        prepare(corpus(), tmp_path / "out", **option)
    assert fragment in one_line(error)
    assert not (tmp_path / "out").exists()


def test_the_input_is_read_a_bounded_way_ahead_of_the_shards(small_batches):
    read = 0

    def endless():
        nonlocal read
        for i in itertools.count():
            read += 1
            yield f"document {i}", True

    with shards.Pool(2) as pool:
        first = list(itertools.islice(shards._encoded(endless(), pool, workers=2), 5))
    assert read == 2 * 8  # two batches of 8 items (80 characters): the one read from, the next
    assert [i for ids, _ in first for i in ids] == expected(list(itertools.islice(endless(), 5)))


def test_the_shard_being_filled_is_on_disk_not_in_memory(tmp_path, small_batches):
    # One shard for the whole corpus: while it fills, its temporary file already holds the ids
    # written so far (a prefix of the stream, after a header that is rewritten at the end), all
    # but the file's buffer: 20 copies of the corpus (25 KB of ids) overflow its 8 KiB.
    items, out, seen = corpus() * 20, tmp_path / "out", []

    def watched():
        for number, item in enumerate(items):
            if number == len(items) - 1:
                seen.extend(out.glob(".tmp-*"))
                data = seen[0].read_bytes()
                seen.append(np.frombuffer(data[shards.HEADER_BYTES :], dtype="<u2"))
            yield item

    files = prepare(watched(), out, shard_tokens=10**6, val_tokens=0)
    temp, written = seen
    whole = expected(items)
    assert 0 < len(written) < len(whole) and written.tolist() == whole[: len(written)]
    assert stream(files) == whole and not temp.exists()


def test_prepare_shows_its_count_in_a_terminal_and_no_bar_in_a_log(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The shards are written as the ids arrive.\n" * 20)
    args = ["prepare", str(corpus), "--val-tokens", "0", "--workers", "1", "--out"]
    command = [sys.executable, "-m", "gpt2_lightning.data", *args]
    shown = in_a_terminal([*command, str(tmp_path / "tty")], tmp_path)
    (shard,) = sorted((tmp_path / "tty").glob("*.bin"))
    total = len(read_shard(shard))  # under 1,000: tqdm writes the count whole
    assert re.search(rf"tokenizing: {total}tok \[", shown), shown
    logged = run_module("gpt2_lightning.data", *args, str(tmp_path / "log"), cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    assert "tokenizing" not in logged.stderr and "\r" not in logged.stderr
