"""Sliding windows and the data module, on small known texts."""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TEXT, dead_pid, messages, temp_file, write
from torch.utils.data import SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from gpt2_lightning import tokens
from gpt2_lightning.data import SlidingWindowDataset, TextDataModule, split_tail
from gpt2_lightning.module import GPTLightningModule
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.tokens import load_tokens, read_record, tokenize_to_cache

EOT = 50256  # <|endoftext|>, before each document
# Three shards of documents (each starts with <|endoftext|>), ids 1..29 in place order.
SHARDS = [
    [EOT, 1, 2, 3, 4, 5, EOT, 7, 8, 9],
    [EOT, 11, 12, 13, 14, EOT, 16, 17, 18, 19],
    [EOT, 21, 22, 23, 24, 25, 26, 27, 28, 29],
]


def lists(arrays: list[np.ndarray]) -> list[list[int]]:
    """The arrays that hold tokens, as lists (a split may leave an empty one: no windows)."""
    return [ids.tolist() for ids in arrays if len(ids)]


def doc_ids(docs: list[str]) -> list[int]:
    """The ids of documents as the cache lays them out: <|endoftext|> before each one."""
    return [i for doc in docs for i in [EOT, *get_tokenizer().encode_ordinary(doc)]]


# About 600 GPT-2 tokens of plain prose: enough for dozens of windows of 8 or 16 tokens.
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
    n = 1 + len(enc.encode_ordinary(text))  # <|endoftext|>, then the document
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
    ids = load_tokens(tokenize_to_cache(None, token_cache))
    assert np.array_equal(np.concatenate([dm.train_set.tokens, dm.val_set.tokens]), ids)
    # the last 10% of the tokens, from the <|endoftext|> of the document the 10% begin in
    nominal = len(ids) - int(len(ids) * 0.1)
    start = int(np.flatnonzero(ids[: nominal + 1] == EOT)[-1])
    assert start < nominal and len(dm.train_set.tokens) == start


def test_validation_holds_out_whole_documents(tmp_path):
    enc = get_tokenizer()
    docs = [f"Document {i} says: " + "more words " * (10 + 3 * i) for i in range(8)]
    for i, doc in enumerate(docs):
        write(tmp_path / "docs" / f"{i}.txt", doc)
    dm = setup_module_on(tmp_path / "docs", tmp_path, context_length=8, val_fraction=0.3)
    starts = np.cumsum([0] + [1 + len(enc.encode_ordinary(doc)) for doc in docs])
    nominal = starts[-1] - int(starts[-1] * 0.3)  # where the last 30% begin
    k = int(np.searchsorted(starts, nominal, side="right")) - 1  # the document it falls in
    assert starts[k] < nominal  # inside it: the split moves back to its start
    assert dm.train_set.tokens.tolist() == doc_ids(docs[:k])
    assert dm.val_set.tokens.tolist() == doc_ids(docs[k:])


def test_shards_are_split_at_a_document_start_in_the_shard_the_split_falls_in():
    shards = [np.array(ids, dtype=np.uint16) for ids in SHARDS]  # 30 tokens
    # 12 validation tokens from position 18, in the second shard: its document starts at 15
    train, val = split_tail(shards, 0.4, window=5)
    assert lists(train) == [SHARDS[0], SHARDS[1][:5]]
    assert lists(val) == [SHARDS[1][5:], SHARDS[2]]
    # 7 from position 23, in the third shard's first document: the third shard validates
    train, val = split_tail(shards, 0.25, window=5)
    assert lists(train) == SHARDS[:2]
    assert lists(val) == SHARDS[2:]


def test_a_document_that_spans_two_shards_is_held_out_whole():
    # prepare_shards cuts a document where a training shard fills: the one at 6 goes on in the
    # second shard, where the split (7 validation tokens, position 23) falls
    shards = [np.array(SHARDS[0], dtype=np.uint16), np.arange(14, 34, dtype=np.uint16)]
    train, val = split_tail(shards, 0.25, window=5)
    assert lists(train) == [SHARDS[0][:6]]
    assert lists(val) == [SHARDS[0][6:], list(range(14, 34))]


def test_val_fraction_zero_trains_on_every_token_and_validates_on_none(text_file, tmp_path):
    dm = setup_module_on(text_file, tmp_path, context_length=8, val_fraction=0.0)
    assert dm.train_set.tokens.tolist() == doc_ids([TEXT])
    assert len(dm.val_set) == 0
    with pytest.raises(ValueError, match="leaves no validation window"):  # a run validates
        dm.val_dataloader()


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
    message = (
        f"data.path={str(file)!r}: 3 tokens are too few for one training window of 9 tokens plus "
        "9 validation tokens: give more text, or lower model.context_length or data.val_fraction"
    )  # <|endoftext|>, "hello", " world"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        setup_module_on(file, tmp_path, context_length=8)


def test_fewer_windows_than_a_batch_is_refused(tmp_path):
    file = write(tmp_path / "short.txt", " ".join(["word"] * 60))
    with pytest.raises(ValueError, match=r"data\.batch_size=32 is larger than the \d+ training"):
        setup_module_on(file, tmp_path, context_length=8, batch_size=32)


def test_missing_path_is_refused_with_its_name(tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(ValueError, match=re.escape(f"data.path={str(missing)!r} does not exist")):
        TextDataModule(path=str(missing))


def test_folder_without_text_or_records_is_refused(tmp_path):
    write(tmp_path / "docs" / "notes.md", "markdown, not .txt")
    message = "is a folder that holds no text or record files (.txt, .jsonl, .json, .parquet)"
    with pytest.raises(ValueError, match=re.escape(message)):
        TextDataModule(path=str(tmp_path / "docs"))


def test_glob_matching_nothing_is_refused(tmp_path):
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(ValueError, match=re.escape(f"{pattern!r} is a glob that matches no")):
        TextDataModule(path=pattern)


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
        ({"batch_size": True}, "data.batch_size=True is invalid: must be a positive integer"),
        ({"seed": False}, "data.seed=False is invalid: must be an integer >= 0"),
        ({"val_windows": 0}, "data.val_windows=0 is invalid: must be a positive integer"),
        ({"val_windows": 2.5}, "data.val_windows=2.5 is invalid"),
        ({"verify": "yes"}, "data.verify='yes' is invalid: use true or false"),
    ],
)
def test_invalid_numbers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TextDataModule(**kwargs)


def test_resuming_with_other_windows_warns_that_the_resume_is_not_exact(text_file):
    saved = TextDataModule(path=str(text_file), context_length=8, batch_size=4).state_dict()
    assert saved == {
        "path": str(text_file),
        "val_path": None,
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


# --- bounded validation --------------------------------------------------------------------------


def test_validation_takes_val_windows_spread_evenly_and_the_same_every_time(text_file, tmp_path):
    # 600 tokens (<|endoftext|>, then TEXT's 599), 60 of them validation: at stride 2, 28
    # windows of 4 + 1 tokens; 5 taken.
    kwargs = dict(context_length=4, stride=2, batch_size=2, val_windows=5)
    dm = setup_module_on(text_file, tmp_path, **kwargs)
    assert len(dm.val_set) == 28
    taken = [0, 5, 11, 16, 22]  # i * 28 // 5
    assert len(dm.val_dataloader().dataset) == 5
    batches = [x for x, _ in dm.val_dataloader()]
    assert torch.equal(torch.cat(batches), torch.stack([dm.val_set[i][0] for i in taken]))
    again = [x for x, _ in setup_module_on(text_file, tmp_path, **kwargs).val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize("val_windows", [None, 28, 1000])
def test_validation_takes_every_window_when_asked_or_when_there_are_fewer(
    text_file, tmp_path, val_windows
):
    dm = setup_module_on(text_file, tmp_path, context_length=4, stride=2, val_windows=val_windows)
    assert dm.val_dataloader().dataset is dm.val_set
    assert len(dm.val_set) == 28


def test_the_default_run_validates_on_256_windows_of_the_embedded_corpus(token_cache):
    # conf's defaults: the tiny model's 128 tokens, batches of 8, the embedded corpus
    dm = TextDataModule(context_length=128, batch_size=8, cache_dir=str(token_cache))
    dm.setup("fit")
    assert dm.val_windows == 256
    # on Python 3.11: 44,261 tokens, 345 windows; a validation predicts 256 x 128 of them
    assert len(dm.val_set) == 345
    assert len(dm.val_dataloader().dataset) == 256


# --- what a start finds in the token cache -------------------------------------------------------


def test_setup_exposes_the_cache_file_its_ids_and_their_largest_id(text_file, tmp_path):
    dm = setup_module_on(text_file, tmp_path, context_length=8)
    ((file, ids),) = dm.arrays["path"]
    assert file == tokenize_to_cache(text_file, tmp_path / "cache")
    assert ids.tolist() == [EOT, *get_tokenizer().encode_ordinary(TEXT)]
    assert read_record(file).max_id == int(ids.max()) == EOT  # every document starts with it


def test_setup_trains_on_all_the_text_after_its_cache_was_truncated(text_file, tmp_path, capsys):
    windows = len(setup_module_on(text_file, tmp_path, context_length=8).train_set)
    target = tokenize_to_cache(text_file, tmp_path / "cache")
    size = target.stat().st_size
    os.truncate(target, 600)  # half of it, an even size
    dm = setup_module_on(text_file, tmp_path, context_length=8)
    assert len(dm.train_set) == windows  # not half of them
    assert capsys.readouterr().err == (
        f"token cache {target} does not match its record (size: 600 bytes, the record says "
        f"{size:,}): tokenizing again\n"
    )


def test_prepare_data_removes_orphans_once_and_says_so(text_file, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    orphan = temp_file(cache, dead_pid(), 2_500_000)
    dm = TextDataModule(path=str(text_file), context_length=8, cache_dir=str(cache))
    dm.prepare_data()  # trainer.validate
    dm.prepare_data()  # then trainer.fit
    dm.setup("fit")
    assert messages(capsys.readouterr().err) == [
        f"removed orphaned temporary files: 2.5 MB in {cache}"
    ]
    assert not orphan.exists()
    ((file, _),) = dm.arrays["path"]
    assert file == tokenize_to_cache(text_file, cache) and file.exists()


def test_an_id_beyond_the_vocabulary_stops_training_in_one_line(text_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    target = tokenize_to_cache(text_file, cache)
    np.full(target.stat().st_size // 2, 65535, dtype=np.uint16).tofile(target)  # random bytes
    monkeypatch.setattr(tokens, "CHECKSUM_BYTES", 0)  # as a file over 1 GiB: checked by size
    dm = TextDataModule(path=str(text_file), context_length=8, batch_size=4, cache_dir=str(cache))
    module = GPTLightningModule(
        model=dict(vocab_size=50257, context_length=8, emb_dim=16, num_layers=1, num_heads=2),
        optimizer=dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8),
        scheduler=dict(name="constant", warmup_steps=0),
    )
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(ValueError) as error:  # not an IndexError in the embedding
        trainer.fit(module, dm)
    assert str(error.value) == (
        f"data.path={str(text_file)!r}: its tokens ({target}) hold id 65535, beyond the GPT-2 "
        "vocabulary's 50257: the file is damaged; rebuild it with python -m gpt2_lightning.data "
        f"prepare {text_file} --cache-dir {cache} --verify"
    )
    assert read_record(target).max_id == EOT  # the record is right: the file is damaged
    assert target.stat().st_size == 2 * (1 + len(get_tokenizer().encode_ordinary(TEXT)))
