"""Token cache, sources, sliding windows and the data module, on small known texts."""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module
from torch.utils.data import SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from gpt2_lightning import data
from gpt2_lightning.data import (
    SlidingWindowDataset,
    TextDataModule,
    embedded_documents,
    load_tokens,
    source_files,
    tokenize_to_cache,
)
from gpt2_lightning.tokenizer import get_tokenizer

EOT = 50256

# About 600 GPT-2 tokens of plain prose: enough for dozens of windows of 8 or 16 tokens.
TEXT = "\n".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog, and the dog sleeps on."
    for i in range(30)
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cached_ids(path, cache_dir: Path) -> list[int]:
    return load_tokens(tokenize_to_cache(path, cache_dir)).tolist()


def window_starts(dataset: SlidingWindowDataset) -> list[int]:
    """Where each window starts in dataset.tokens, read back from the windows themselves."""
    return [int(dataset[i][0][0]) for i in range(len(dataset))]


# --- SlidingWindowDataset ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stride", "starts"),
    [
        (4, [0, 4, 8, 12]),  # stride == context_length: windows do not overlap
        (2, [0, 2, 4, 6, 8, 10, 12, 14]),  # overlap
        (1, list(range(16))),
        (5, [0, 5, 10, 15]),  # stride > context_length: tokens between windows are skipped
    ],
)
def test_windows_start_stride_apart_and_the_last_one_fits(stride, starts):
    tokens = np.arange(20, dtype=np.uint16)  # token value == position
    dataset = SlidingWindowDataset(tokens, context_length=4, stride=stride)
    assert len(dataset) == len(starts)
    assert window_starts(dataset) == starts
    # The last window ends inside the 20 tokens; one more would not.
    assert starts[-1] + 4 + 1 <= 20 < starts[-1] + stride + 4 + 1


def test_target_is_input_shifted_by_one():
    dataset = SlidingWindowDataset(np.arange(20, dtype=np.uint16), context_length=4, stride=2)
    x, y = dataset[3]
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [6, 7, 8, 9]
    assert y.tolist() == [7, 8, 9, 10]
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert torch.equal(x[1:], y[:-1])
        assert torch.equal(y, x + 1)


def test_large_token_ids_survive_uint16():
    tokens = np.array([50256, 50255, 0, 1, 40000], dtype=np.uint16)
    x, y = SlidingWindowDataset(tokens, context_length=4, stride=4)[0]
    assert x.tolist() == [50256, 50255, 0, 1]
    assert y.tolist() == [50255, 0, 1, 40000]


@pytest.mark.parametrize(("num_tokens", "expected"), [(4, 0), (5, 1), (8, 1), (9, 2)])
def test_window_count_at_the_edges(num_tokens, expected):
    # A window needs context_length + 1 = 5 tokens.
    dataset = SlidingWindowDataset(np.arange(num_tokens, dtype=np.uint16), 4, stride=4)
    assert len(dataset) == expected


def test_no_windows_in_an_empty_array():
    assert len(SlidingWindowDataset(np.zeros(0, dtype=np.uint16), 4, stride=1)) == 0


def test_indexing_past_the_windows_raises_and_iteration_ends():
    dataset = SlidingWindowDataset(np.arange(20, dtype=np.uint16), 4, stride=4)  # 4 windows
    assert [x[0].item() for x, _ in dataset] == [0, 4, 8, 12]  # `for` stops at IndexError
    assert dataset[-1][0].tolist() == [12, 13, 14, 15]  # from the end, as a list counts
    for i in (4, -5):
        with pytest.raises(IndexError, match=f"window {i} of 4"):
            dataset[i]


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
        ("", "data.path='' is empty: give a text file"),  # not the current folder
        ("  ", "data.path='  ' is empty"),
        ("/dev/null", "data.path='/dev/null' is not a file or folder: give a text file"),
    ],
)
def test_paths_that_name_no_text_are_refused(path, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        source_files(path)


def test_single_file_is_its_own_source(tmp_path):
    file = write(tmp_path / "book.text", "any extension works for a named file")
    assert source_files(file) == [file]


def test_documents_are_joined_with_endoftext(tmp_path):
    enc = get_tokenizer()
    doc1 = "The first document ends here."
    doc2 = "A second one, which starts fresh.\n"
    write(tmp_path / "docs" / "1.txt", doc1)
    write(tmp_path / "docs" / "2.txt", doc2)
    ids = cached_ids(tmp_path / "docs", tmp_path / "cache")
    assert ids == enc.encode_ordinary(doc1) + [EOT] + enc.encode_ordinary(doc2)
    assert ids.count(EOT) == 1


def test_folder_documents_follow_sorted_order(corpus_dir, tmp_path):
    enc = get_tokenizer()
    docs = [f.read_text() for f in source_files(corpus_dir)]
    expected = enc.encode_ordinary(docs[0])
    for doc in docs[1:]:
        expected += [EOT] + enc.encode_ordinary(doc)
    assert cached_ids(corpus_dir, tmp_path / "cache") == expected


def test_a_large_file_is_read_in_pieces_with_the_same_ids(tmp_path):
    # The embedded corpus with non-ASCII text, as one file read 4 KB at a time: a multi-byte
    # character can straddle two reads, and the cuts must not change a single id.
    # Then stretches without a place to cut: blank lines, a long line, indented lines.
    text = (
        "\n".join(embedded_documents())
        + "Café, naïve, 漢字 — ünïcödé\n" * 50
        + "\n" * 10_000
        + "word " * 3_000
        + "\n  indented\n\tand tabbed\n \n"
    )
    file = write(tmp_path / "big.txt", text)
    pieces = [piece for batch, _ in data._documents([file], 64 << 10, 4 << 10) for piece in batch]
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
    # Only the separator between files is the special id; the literal string is ordinary text.
    file = write(tmp_path / "a.txt", "before <|endoftext|> after")
    ids = cached_ids(file, tmp_path / "cache")
    assert EOT not in ids
    assert get_tokenizer().decode(ids) == "before <|endoftext|> after"


# --- token cache ---------------------------------------------------------------------------------


@pytest.fixture
def count_batches(monkeypatch):
    """Counts calls of the batch encoder (the only way tokens are produced)."""
    calls = []
    original = data.encode_documents

    def counting(batch, pool):
        calls.append(len(batch))
        return original(batch, pool)

    monkeypatch.setattr(data, "encode_documents", counting)
    return calls


def test_cache_file_is_named_by_hash(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    target = tokenize_to_cache(file, tmp_path / "cache")
    assert target.parent == tmp_path / "cache"
    assert re.fullmatch(r"[0-9a-f]{32}\.bin", target.name)
    assert target.stat().st_size == 2 * len(get_tokenizer().encode_ordinary(TEXT))  # uint16
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name, "index"]


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
    assert data.TOKENIZER == f"{enc.name}:{enc.n_vocab}"


def test_unchanged_files_are_found_without_reading_them(tmp_path, monkeypatch):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")

    def no_reading(files):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(data, "cache_key", no_reading)
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

    monkeypatch.setattr(data.tempfile, "NamedTemporaryFile", read_only)
    assert tokenize_to_cache(file, tmp_path / "cache") == first  # found by content, no error
    assert list((tmp_path / "cache" / "index").iterdir()) == []


def test_index_entry_for_a_deleted_cache_file_is_not_trusted(tmp_path):
    file = write(tmp_path / "a.txt", TEXT)
    first = tokenize_to_cache(file, tmp_path / "cache")
    first.unlink()
    again = tokenize_to_cache(file, tmp_path / "cache")
    assert again == first and load_tokens(again).tolist() == get_tokenizer().encode_ordinary(TEXT)


def test_changed_text_gets_a_new_cache_file(tmp_path):
    enc = get_tokenizer()
    file = write(tmp_path / "a.txt", TEXT)
    old = tokenize_to_cache(file, tmp_path / "cache")
    write(file, TEXT + " One more sentence.")
    new = tokenize_to_cache(file, tmp_path / "cache")
    assert new != old
    assert old.exists()
    assert load_tokens(new).tolist() == enc.encode_ordinary(TEXT + " One more sentence.")
    assert load_tokens(old).tolist() == enc.encode_ordinary(TEXT)


def test_no_temp_files_are_left_behind(tmp_path, corpus_dir):
    tokenize_to_cache(corpus_dir, tmp_path / "cache")
    tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())  # hex names sort first
    assert len(names) == 3 and names[2] == "index" and all(n.endswith(".bin") for n in names[:2])
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

    monkeypatch.setattr(data, "encode_documents", fail_after_first)
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


def test_embedded_corpus_is_cleaned_prose():
    docs = embedded_documents()
    assert 70 <= len(docs) <= 90  # one per topic of pydoc_data.topics (79 on Python 3.11)
    for doc in docs:
        assert doc.endswith("\n") and doc.strip()
        assert "  " not in doc
        assert "\n\n\n" not in doc
        for line in doc.splitlines():
            assert not (line and set(line) <= set("*=-~^")), line


def test_embedded_corpus_has_over_100k_tokens(token_cache):
    tokens = load_tokens(tokenize_to_cache(None, token_cache))
    assert len(tokens) > 100_000
    assert int(tokens.max()) == EOT
    assert int((tokens == EOT).sum()) == len(embedded_documents()) - 1


# --- TextDataModule ------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path) -> Path:
    return write(tmp_path / "text.txt", TEXT)


def setup_module_on(path, tmp_path, **kwargs) -> TextDataModule:
    datamodule = TextDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), **kwargs)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("stride", [None, 3])
def test_validation_is_the_last_tokens_and_shares_none_with_training(text_file, tmp_path, stride):
    dm = setup_module_on(text_file, tmp_path, context_length=8, stride=stride, val_fraction=0.1)
    tokens = load_tokens(tokenize_to_cache(text_file, tmp_path / "cache"))
    n = len(tokens)
    num_val = int(n * 0.1)
    assert num_val > 9  # so the fraction, not the one-window minimum, sets the split
    split = n - num_val
    train, val = dm.train_set.tokens, dm.val_set.tokens
    assert len(train) == split and len(val) == num_val
    assert np.array_equal(train, tokens[:split])
    assert np.array_equal(val, tokens[split:])
    assert not np.shares_memory(train, val)
    # Token positions covered by the windows, in the whole corpus.
    step = stride or 8
    train_positions = {
        p for i in range(len(dm.train_set)) for p in range(i * step, i * step + 8 + 1)
    }
    val_positions = {
        split + p for i in range(len(dm.val_set)) for p in range(i * step, i * step + 8 + 1)
    }
    assert max(train_positions) < split <= min(val_positions)
    assert train_positions.isdisjoint(val_positions)
    assert max(val_positions) < n


def test_small_corpus_keeps_one_full_validation_window(tmp_path):
    enc = get_tokenizer()
    text = " ".join(["word"] * 60)
    file = write(tmp_path / "small.txt", text)
    n = len(enc.encode_ordinary(text))
    dm = setup_module_on(file, tmp_path, context_length=8, batch_size=1, val_fraction=0.1)
    assert int(n * 0.1) < 9
    assert len(dm.val_set.tokens) == 9  # context_length + 1: one whole validation window
    assert len(dm.val_set) == 1
    assert len(dm.train_set.tokens) == n - 9


def test_stride_defaults_to_context_length(text_file, tmp_path):
    assert TextDataModule(path=str(text_file), context_length=16).stride == 16
    dm = setup_module_on(text_file, tmp_path, context_length=16)
    assert dm.train_set.stride == dm.val_set.stride == 16
    assert window_starts(dm.train_set)[:3] == [
        int(dm.train_set.tokens[0]),
        int(dm.train_set.tokens[16]),
        int(dm.train_set.tokens[32]),
    ]
    assert setup_module_on(text_file, tmp_path, context_length=16, stride=4).train_set.stride == 4


def test_embedded_corpus_is_the_default(token_cache):
    dm = TextDataModule(context_length=16, batch_size=2, cache_dir=str(token_cache))
    dm.setup("fit")
    total = len(load_tokens(tokenize_to_cache(None, token_cache)))
    assert len(dm.train_set.tokens) + len(dm.val_set.tokens) == total
    assert len(dm.val_set.tokens) == int(total * 0.1)


def test_setup_twice_keeps_the_datasets(text_file, tmp_path):
    dm = setup_module_on(text_file, tmp_path, context_length=8)
    train = dm.train_set
    dm.setup("validate")
    assert dm.train_set is train


def test_loaders(text_file, tmp_path):
    dm = setup_module_on(text_file, tmp_path, context_length=8, batch_size=4)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, StatefulDataLoader) and isinstance(val, StatefulDataLoader)
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert len(train) == len(dm.train_set) // 4
    assert len(val) == math.ceil(len(dm.val_set) / 4)
    x, y = next(iter(val))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x, torch.stack([dm.val_set[i][0] for i in range(4)]))
    # Shuffled: one epoch's training windows are distinct windows of the set, not in set order.
    torch.manual_seed(0)
    first_tokens = [int(t) for x, _ in train for t in x[:, 0]]
    assert len(first_tokens) == len(train) * 4
    in_order = [int(dm.train_set[i][0][0]) for i in range(len(first_tokens))]
    assert first_tokens != in_order


def test_empty_file_is_refused(tmp_path):
    file = write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        setup_module_on(file, tmp_path, context_length=8)


def test_corpus_shorter_than_one_window_is_refused(tmp_path):
    file = write(tmp_path / "short.txt", "hello world")  # 2 tokens
    with pytest.raises(ValueError, match=r"has 2 tokens, too few for one training window of 9"):
        setup_module_on(file, tmp_path, context_length=8)


def test_fewer_windows_than_a_batch_is_refused(tmp_path):
    file = write(tmp_path / "short.txt", " ".join(["word"] * 60))
    with pytest.raises(ValueError, match=r"data\.batch_size=32 is larger than the \d+ training"):
        setup_module_on(file, tmp_path, context_length=8, batch_size=32)


def test_missing_path_is_refused_with_its_name(tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(ValueError, match=re.escape(f"data.path={str(missing)!r} does not exist")):
        TextDataModule(path=str(missing))


def test_folder_without_txt_is_refused(tmp_path):
    write(tmp_path / "docs" / "notes.md", "markdown, not .txt")
    with pytest.raises(ValueError, match=r"is a folder that holds no \*\.txt files"):
        TextDataModule(path=str(tmp_path / "docs"))


def test_glob_matching_nothing_is_refused(tmp_path):
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(ValueError, match=re.escape(f"{pattern!r} is a glob that matches no")):
        TextDataModule(path=pattern)


def test_cache_files_are_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tokenize_to_cache(write(tmp_path / "a.txt", TEXT), tmp_path / "cache")
    finally:
        os.umask(umask)
    (index,) = (tmp_path / "cache" / "index").iterdir()
    assert target.stat().st_mode & 0o777 == 0o644  # a temporary file's would be 0600
    assert index.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "data.val_fraction=1.0 is invalid"),
        ({"val_fraction": -0.1}, "data.val_fraction=-0.1 is invalid"),
        ({"batch_size": 0}, "data.batch_size=0 is invalid"),
        ({"context_length": 0}, "data.context_length=0 is invalid"),
        ({"stride": 0}, "data.stride=0 is invalid"),
        ({"val_fraction": "abc"}, "data.val_fraction='abc' is invalid"),
        ({"batch_size": "abc"}, "data.batch_size='abc' is invalid: must be a positive integer"),
        ({"context_length": 2.5}, "data.context_length=2.5 is invalid"),
        ({"stride": "abc"}, "data.stride='abc' is invalid"),
        ({"num_workers": "abc"}, "data.num_workers='abc' is invalid: must be an integer >= 0"),
        ({"num_workers": -1}, "data.num_workers=-1 is invalid"),
        ({"seed": 1.5}, "data.seed=1.5 is invalid"),
    ],
)
def test_invalid_numbers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TextDataModule(**kwargs)


# --- python -m gpt2_lightning.data prepare -------------------------------------------------------


def test_prepare_command_caches_and_reports_the_count(tmp_path):
    file = write(tmp_path / "text.txt", TEXT)
    cache = tmp_path / "cache"
    result = run_module("gpt2_lightning.data", "prepare", str(file), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    n = len(get_tokenizer().encode_ordinary(TEXT))
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
    assert lines[0] == (
        f"error: {str(missing)!r} does not exist: give a text file, a folder of *.txt files or "
        "a glob"
    )
    assert list(tmp_path.iterdir()) == []  # no cache file, no temp file


def test_prepare_command_refuses_a_cache_dir_that_is_a_file(tmp_path, capsys):
    from gpt2_lightning.data import main

    corpus = write(tmp_path / "text.txt", TEXT)
    not_a_dir = write(tmp_path / "cache", "a file")
    assert main(["prepare", str(corpus), "--cache-dir", str(not_a_dir)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --cache-dir {str(not_a_dir)!r} is a file: give a folder\n"
    assert not_a_dir.read_text() == "a file"


def test_prepare_command_refuses_an_empty_corpus(tmp_path, capsys):
    from gpt2_lightning.data import main

    empty = write(tmp_path / "empty.txt", "")
    assert main(["prepare", str(empty), "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert f"error: {str(empty)!r} holds no text: the corpus is empty" in err


def test_resuming_with_other_windows_warns_that_the_resume_is_not_exact(text_file):
    import warnings

    saved = TextDataModule(path=str(text_file), context_length=8, batch_size=4).state_dict()
    assert saved == {
        "path": str(text_file),
        "context_length": 8,
        "stride": 8,
        "batch_size": 4,
        "val_fraction": 0.1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: silent
        TextDataModule(path=str(text_file), context_length=8, batch_size=4).load_state_dict(saved)
    resumed = TextDataModule(path=str(text_file), context_length=8, batch_size=16)
    with pytest.warns(
        UserWarning, match=r"resuming with data.batch_size=16 \(the checkpoint's run"
    ):
        resumed.load_state_dict(saved)
