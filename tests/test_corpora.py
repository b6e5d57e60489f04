"""Every form of corpus data.path takes gives the same token ids and the same training windows;
bad shards and records are refused in one line; validation sets; hf://; the command lines."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import resume_against_straight, run_module, write

from gpt2_lightning import records, tokens
from gpt2_lightning.data import SlidingWindowDataset, TextDataModule
from gpt2_lightning.shards import prepare_shards, read_shard
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.tokens import corpus_arrays, corpus_source, resolve_source

EOT = 50256  # <|endoftext|>, before each document
# 20 short documents, some not ASCII, none empty: 447 tokens with their <|endoftext|>s.
DOCS = [
    "The river rose in the night. By morning the old bridge was gone.",
    "Café au lait, s'il vous plaît. Le garçon sourit et s'en alla.",
    "A list:\n- apples\n- pears\n- three plums\n",
    "Σ is the sum; π is about 3.14159. Mathematicians write ∫ f(x) dx.",
    "東京は日本の首都です。人口はとても多い。",
    "Привет, мир! Как дела? Всё хорошо.",
    "She said: “Don't open the door.” He opened it anyway.",
    "Line one.\r\nLine two, after a Windows line end.\r\n",
    "Numbers: 1, 22, 333, 4444 and 55555. Then 0.5 and -7.",
    "def add(a, b):\n    return a + b\n",
    "Tabs\tbetween\twords, and  two spaces, and   three.",
    "Emoji travel well: 🙂 🚀 🌍. So do accents: naïve, Zürich, São Paulo.",
    "The committee met on Tuesday. Nothing was decided; the tea was good.",
    "In 1969 two people walked on the Moon. They left footprints and a flag.",
    "Weather report: light rain in the north, sun in the south, wind everywhere.",
    "Ünïcödé with combining marks: e\u0301 and a\u0308, and a zero-width\u200bspace.",
    "Knock knock. Who's there? Lettuce. Lettuce who? Lettuce in, it's cold.",
    "Recipe: boil water, add pasta, wait nine minutes, drain, add salt.",
    "The last train leaves at midnight; the first one comes at five.",
    "THE END. (Or is it?) Only the <|endoftext|> before each document is special.",
]
VAL_DOCS = [
    "A held-out document, never trained on.",
    "Another one: validation sees the same windows every time.",
    "Und ein drittes, auf Deutsch, mit Umlauten: Grüße aus Köln.",
]
FORMS = ["txt", "jsonl", "json", "parquet", "saved", "bin", "npy"]
SHARDS = ("bin", "npy")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> None:
    """datasets' cache (locks, module files) under tmp_path, not under ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def doc_ids(docs: list[str]) -> list[int]:
    """The ids of documents as the cache and the shards lay them out: <|endoftext|> before each."""
    return [i for doc in docs for i in [EOT, *get_tokenizer().encode_ordinary(doc)]]


def write_jsonl(file: Path, docs: list[str]) -> Path:
    lines = (
        json.dumps({"id": k, "text": doc}, ensure_ascii=False) + "\n" for k, doc in enumerate(docs)
    )
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(lines), encoding="utf-8")
    return file


def write_form(
    form: str, folder: Path, docs: list[str] = DOCS, shard_tokens: int = 100, val_tokens: int = 0
) -> Path:
    """docs in one form data.path takes, under folder; shards are prepared from the .txt form."""
    if form == "txt":
        for k, doc in enumerate(docs):
            write(folder / "txt" / f"{k:02d}.txt", doc)
        return folder / "txt"
    if form == "jsonl":
        return write_jsonl(folder / "docs.jsonl", docs)
    if form == "json":
        rows = [{"text": doc, "id": k} for k, doc in enumerate(docs)]
        return write(folder / "docs.json", json.dumps(rows, ensure_ascii=False, indent=1))
    if form == "parquet":
        file = folder / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), file)
        return file
    if form == "saved":
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    out = folder / f"{form}_shards"
    source = resolve_source(write_form("txt", folder / "for_shards", docs))
    options = dict(shard_tokens=shard_tokens, fmt=form, val_tokens=val_tokens, workers=1)
    prepare_shards(source.pieces(), out, **options, progress=False, source=source.name)
    return out


def concatenated(arrays: list[tuple[Path, np.ndarray]]) -> list[int]:
    return np.concatenate([ids for _, ids in arrays]).tolist()


def windows(dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dataset[i] for i in range(len(dataset))]


def same_windows(a, b) -> bool:
    """Whether two window datasets hold the same (input, target) pairs in the same order."""
    pairs = list(zip(windows(a), windows(b), strict=True))  # the same count
    return all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in pairs)


def arrays_read(dataset) -> list[list[int]]:
    """The tokens of each array a window dataset reads (one, or a ConcatDataset's shards)."""
    parts = getattr(dataset, "datasets", [dataset])
    return [part.tokens.tolist() for part in parts]


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def bin_file(file: Path, ids: list[int], *header: int) -> Path:
    """A .bin shard written by hand: 256 little-endian int32 (header, then zeros), then ids."""
    head = struct.pack("<256i", *header, *[0] * (256 - len(header)))
    file.write_bytes(head + np.array(ids, dtype="<u2").tobytes())
    return file


# --- every form, the same tokens -----------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_same_token_ids(tmp_path, form):
    path = write_form(form, tmp_path, shard_tokens=100)
    arrays = corpus_arrays(corpus_source(str(path)), tmp_path / "cache")
    expected = doc_ids(DOCS)
    assert len(expected) == 447
    if form in SHARDS:  # read in place, 100 tokens a shard
        assert [file.parent for file, _ in arrays] == [path] * 5
        assert [len(ids) for _, ids in arrays] == [100] * 4 + [47]
    else:  # one cache file
        ((file, _),) = arrays
        assert file.parent == tmp_path / "cache"
    assert concatenated(arrays) == expected


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_same_training_windows(tmp_path, form):
    # One shard: no window spans two shards, so only then are the windows those of one array.
    path = write_form(form, tmp_path, shard_tokens=10_000)
    val = write_jsonl(tmp_path / "val" / "val.jsonl", VAL_DOCS)  # the same split for every form
    dm = TextDataModule(
        path=str(path),
        val_path=str(val),
        context_length=8,
        stride=5,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    reference = SlidingWindowDataset(np.array(doc_ids(DOCS), dtype=np.uint16), 8, 5)
    assert len(dm.train_set) == len(reference) == 88
    assert same_windows(dm.train_set, reference)


def test_an_empty_document_gives_no_tokens_in_shards_as_in_the_cache(tmp_path):
    docs = [DOCS[0], "", DOCS[1]]  # an empty file between two others
    text = write_form("txt", tmp_path, docs)
    cached = corpus_arrays(corpus_source(str(text)), tmp_path / "cache")
    assert concatenated(cached) == doc_ids([DOCS[0], DOCS[1]])
    shards = corpus_arrays(corpus_source(str(write_form("bin", tmp_path, docs))))
    assert concatenated(shards) == concatenated(cached)


def test_the_prepare_command_writes_the_shards_prepare_shards_writes(tmp_path):
    text = write_form("txt", tmp_path)
    out = tmp_path / "out"
    result = run_module(
        "gpt2_lightning.data",
        *("prepare", str(text), "--out", str(out), "--shard-tokens", "100"),
        *("--val-tokens", "0", "--format", "npy", "--workers", "1"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"447 tokens in 5 shards in {out}",
        f"train on them with: python -m gpt2_lightning.train data.path={out}",
    ]
    names = [f"shard_train_{k:06d}.npy" for k in range(1, 6)]  # numbered from 1, as llm.c's
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "prepare.json"])
    assert concatenated(corpus_arrays(corpus_source(str(out)))) == doc_ids(DOCS)
    in_process = write_form("npy", tmp_path / "in_process", shard_tokens=100)
    for name in names:
        assert (out / name).read_bytes() == (in_process / name).read_bytes(), name


# --- .bin shards written by hand, and what is refused --------------------------------------------


def test_a_bin_file_written_by_hand_is_read_exactly(tmp_path):
    ids = doc_ids(DOCS)
    file = bin_file(tmp_path / "corpus.bin", ids, 20240520, 1, len(ids))
    dm = TextDataModule(path=str(file), context_length=8, batch_size=2, cache_dir=str(tmp_path))
    dm.setup("fit")
    ((read, array),) = dm.arrays["path"]
    assert read == file and array.tolist() == ids
    # as for text, the last 10% (44 tokens) from the start of the document they begin in: the
    # last two documents hold 39, so the last three validate
    assert len(doc_ids(DOCS[-2:])) < 44 < len(doc_ids(DOCS[-3:]))
    assert dm.val_set.tokens.tolist() == doc_ids(DOCS[-3:])
    assert dm.train_set.tokens.tolist() == doc_ids(DOCS[:-3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin"]  # nothing cached


def bad_header(file: Path, count: int) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        "magic": (
            (20240521, 1, count),
            f"{file} is not a .bin token shard: its magic number is 20240521, expected 20240520",
        ),
        "version": (
            (20240520, 2, count),
            f"{file} is a .bin shard of version 2: only version 1 (GPT-2's uint16 tokens) is "
            "supported",
        ),
        "count": (
            (20240520, 1, count + 1),
            f"{file} holds {2 * count:,} bytes of tokens but its header says {count + 1:,} tokens "
            f"({2 * count + 2:,} bytes): it is truncated or damaged",
        ),
    }


@pytest.mark.parametrize("damage", ["magic", "version", "count"])
def test_a_bad_bin_header_is_refused_in_one_line_and_nothing_is_cached(tmp_path, damage):
    ids = doc_ids(DOCS)
    file = tmp_path / "data" / "corpus.bin"
    file.parent.mkdir()
    header, message = bad_header(file, len(ids))[damage]
    bin_file(file, ids, *header)
    cache = tmp_path / "cache"
    cache.mkdir()
    dm = TextDataModule(path=str(file.parent), context_length=8, cache_dir=str(cache))
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    assert one_line(error) == message
    assert listing(cache) == []


def record_file(tmp_path: Path, bad: bytes) -> Path:
    """A .jsonl of DOCS whose third record is bad."""
    lines = [json.dumps({"text": doc}, ensure_ascii=False).encode() for doc in DOCS]
    lines[2] = bad
    file = tmp_path / "docs.jsonl"
    file.write_bytes(b"\n".join(lines) + b"\n")
    return file


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            b'{"body": "the text under another name"}',
            "has no field 'text' (its keys: 'body'): set data.text_field to one of them",
        ),
        (
            b'{"text": "caf\xe9 au lait"}',
            "is not UTF-8 (byte 0xe9 at offset {offset}): convert the file to UTF-8",
        ),
    ],
)
def test_a_bad_record_is_refused_in_one_line_and_nothing_is_cached(tmp_path, bad, reason):
    file = record_file(tmp_path, bad)
    offset = file.read_bytes().index(b"\xe9")
    cache = tmp_path / "cache"
    cache.mkdir()
    dm = TextDataModule(path=str(file), context_length=8, cache_dir=str(cache))
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    assert one_line(error) == f"{file}: record 3 (line 3) {reason.format(offset=offset)}"
    assert listing(cache) == []


# --- validation sets -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["txt", "parquet", "bin"])
def test_val_path_gives_the_same_validation_windows_whatever_the_path(tmp_path, form):
    path = write_form(form, tmp_path, shard_tokens=100)
    val = write_form("jsonl", tmp_path / "val", VAL_DOCS)
    dm = TextDataModule(
        path=str(path), val_path=str(val), context_length=8, cache_dir=str(tmp_path / "cache")
    )
    dm.setup("fit")
    reference = SlidingWindowDataset(np.array(doc_ids(VAL_DOCS), dtype=np.uint16), 8, 8)
    assert len(dm.val_set) == len(reference) == 6
    assert same_windows(dm.val_set, reference)
    # all of path's tokens train: no tail of them is held out
    assert sum(arrays_read(dm.train_set), []) == doc_ids(DOCS)


def test_a_folder_with_a_val_shard_validates_on_it(tmp_path):
    out = write_form("bin", tmp_path, shard_tokens=150, val_tokens=100)
    files = [file for file, _ in corpus_arrays(corpus_source(str(out)))]
    train_files = [out / f"shard_train_{k:06d}.bin" for k in range(1, 4)]
    assert files == [*train_files, out / "shard_val_000000.bin"]  # sorted by name
    dm = TextDataModule(path=str(out), context_length=8, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    val = read_shard(files[-1])
    assert val[0] == EOT and len(val) >= 100  # whole documents, at least 100 tokens
    assert same_windows(dm.val_set, SlidingWindowDataset(val, 8, 8))
    assert arrays_read(dm.train_set) == [read_shard(file).tolist() for file in train_files]
    assert sum([val.tolist(), *arrays_read(dm.train_set)], []) == doc_ids(DOCS)


def test_with_val_path_a_folder_s_val_shard_is_not_trained_on(tmp_path):
    out = write_form("bin", tmp_path, shard_tokens=150, val_tokens=100)
    val = write_form("jsonl", tmp_path / "val", VAL_DOCS)
    dm = TextDataModule(
        path=str(out), val_path=str(val), context_length=8, cache_dir=str(tmp_path / "cache")
    )
    dm.setup("fit")
    train_files = [out / f"shard_train_{k:06d}.bin" for k in range(1, 4)]
    assert arrays_read(dm.train_set) == [read_shard(file).tolist() for file in train_files]
    reference = SlidingWindowDataset(np.array(doc_ids(VAL_DOCS), dtype=np.uint16), 8, 8)
    assert same_windows(dm.val_set, reference)


# --- hf:// ---------------------------------------------------------------------------------------


def test_hf_with_a_local_folder_gives_the_jsonl_ids_and_is_read_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets read it at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    hub = tmp_path / "hub"  # a dataset repository's data files: one split, "train"
    write_jsonl(hub / "part-0.jsonl", DOCS[:7])
    write_jsonl(hub / "part-1.jsonl", DOCS[7:])
    cache = str(tmp_path / "cache")
    dm = TextDataModule(path=f"hf://{hub}", context_length=8, cache_dir=cache)
    dm.setup("fit")
    jsonl = corpus_arrays(corpus_source(str(write_form("jsonl", tmp_path))), cache)
    assert concatenated(dm.arrays["path"]) == concatenated(jsonl) == doc_ids(DOCS)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was read again")

    for module, name in ((tokens, "hub_documents"), (records, "hub_documents")):
        monkeypatch.setattr(module, name, no_hub)  # tokens calls its own import of it
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    again = TextDataModule(path=f"hf://{hub}", context_length=8, cache_dir=cache)
    again.setup("fit")
    assert again.arrays["path"][0][0] == dm.arrays["path"][0][0]
    assert same_windows(again.train_set, dm.train_set)


def test_an_hf_revision_goes_to_datasets_and_keys_the_cache(tmp_path, monkeypatch):
    asked = []

    def load_dataset(repo, name, split, streaming, revision):
        asked.append((repo, revision))
        return [{"text": f"the text of revision {revision}"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cache = str(tmp_path / "cache")
    ids = {
        at: concatenated(corpus_arrays(corpus_source(f"hf://me/corpus{at}"), cache))
        for at in ("", "@v1", "@v2", "@v1")  # the second v1 from the cache
    }
    assert asked == [("me/corpus", None), ("me/corpus", "v1"), ("me/corpus", "v2")]
    assert ids["@v1"] == doc_ids(["the text of revision v1"]) and ids["@v1"] != ids["@v2"]
    folder = tmp_path / "data@2"  # a local folder whose name holds @: no revision in it
    folder.mkdir()
    corpus_arrays(corpus_source(f"hf://{folder}"), cache)
    assert asked[-1] == (str(folder), None)


# --- the command line ----------------------------------------------------------------------------


def test_train_runs_on_a_folder_of_shards(run_train, tmp_path):
    out = write_form("bin", tmp_path, shard_tokens=200, val_tokens=100)
    result = run_train(f"data.path={out}", "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr
    summary = re.search(r"val loss: +(\S+) -> (\S+)", result.stdout)
    assert summary is not None, result.stdout
    first, last = float(summary[1]), float(summary[2])
    assert first == pytest.approx(math.log(50257), abs=0.3)  # an untrained model's, on real ids
    assert math.isfinite(last) and last > 0


def test_train_refuses_a_bad_bin_header_in_one_line(run_train, tmp_path):
    file = bin_file(tmp_path / "corpus.bin", doc_ids(DOCS), 1, 1, 447)
    result = run_train(f"data.path={file}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {file} is not a .bin token shard: its magic number is 1, expected 20240520"
    ]


@pytest.mark.slow
def test_exact_resume_across_shard_boundaries(run_train, tmp_path):
    # 100 documents, about 2,000 tokens: a 200-token validation shard, then shards of 300 tokens
    # (9 windows of 32 + 1 each); an epoch is 11 or 12 batches of 4 drawn from all of them
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex it".split()
    docs = [" ".join(words[k % 7 :] + words[: k % 5]) + f", said number {k}." for k in range(100)]
    out = write_form("bin", tmp_path, docs, shard_tokens=300, val_tokens=200)
    assert len(list(out.glob("shard_train_*.bin"))) >= 5
    runs = resume_against_straight(run_train, tmp_path, [f"data.path={out}"], stop=8, steps=16)
    # the resume point (step 8) is mid-epoch 0
    assert runs["straight"]["ckpt"]["epoch"] == runs["resumed"]["ckpt"]["epoch"] == 1
