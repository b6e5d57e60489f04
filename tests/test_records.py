"""records.py: every reader gives the same documents, in order; bad records are one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2_lightning import records
from gpt2_lightning.records import (
    hub_documents,
    is_saved_dataset,
    read_records,
    saved_dataset_files,
    saved_documents,
)

DOCS = [
    "Hello, world.",
    "Ünïcödé — 日本語 🙂 \u2028 after a line separator",
    "",
    "two\nlines\r\nand\ta tab\n",
    "before <|endoftext|> after",
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> None:
    """datasets' cache (locks, module files) under tmp_path, not under ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(file: Path, items: list[dict]) -> Path:
    file.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), "utf-8")
    return file


def rows(field: str = "text") -> list[dict]:
    return [{"id": k, field: doc} for k, doc in enumerate(DOCS)]


def one_line_error(read: Callable[[], Iterator[str]]) -> str:
    """The message of the ValueError that reading everything raises, checked to be one line."""
    with pytest.raises(ValueError) as caught:
        list(read())
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def write_file(tmp_path: Path, form: str, field: str = "text") -> Path:
    """DOCS (under field) in one of the forms the readers take."""
    if form == "jsonl":
        return write_jsonl(tmp_path / "docs.jsonl", rows(field))
    if form == "json array":
        file = tmp_path / "docs.json"
        file.write_text(json.dumps(rows(field), indent=2, ensure_ascii=False), "utf-8")
        return file
    if form == "json lines":
        return write_jsonl(tmp_path / "docs.json", rows(field))
    if form == "parquet":
        file = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(DOCS))), field: DOCS}), file)
        return file
    raise AssertionError(form)


def save_dataset(tmp_path: Path, as_dict: bool, field: str = "text") -> Path:
    dataset = datasets.Dataset.from_dict({"id": list(range(len(DOCS))), field: DOCS})
    folder = tmp_path / "saved"
    if as_dict:
        rest = datasets.Dataset.from_dict({"id": [0], field: ["another split"]})
        dataset = datasets.DatasetDict({"validation": rest, "train": dataset})
    dataset.save_to_disk(str(folder))
    return folder


def hub_folder(tmp_path: Path, field: str = "text") -> Path:
    """A folder of .jsonl files, which datasets loads as a dataset of one split, "train"."""
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows(field)[:2])
    write_jsonl(folder / "part-1.jsonl", rows(field)[2:])
    return folder


@pytest.mark.parametrize("form", ["jsonl", "json array", "json lines", "parquet"])
@pytest.mark.parametrize("field", ["text", "body"])
def test_files_give_the_documents(tmp_path, form, field):
    assert list(read_records(write_file(tmp_path, form, field), text_field=field)) == DOCS


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("field", ["text", "body"])
def test_saved_datasets_give_the_documents(tmp_path, as_dict, field):
    folder = save_dataset(tmp_path, as_dict, field)
    assert is_saved_dataset(folder)
    assert list(saved_documents(folder, text_field=field)) == DOCS


def test_saved_dataset_dict_gives_the_split_asked_for(tmp_path):
    folder = save_dataset(tmp_path, as_dict=True)
    assert list(saved_documents(folder, split="validation")) == ["another split"]


def test_hub_documents_streams_a_local_folder(tmp_path):
    assert list(hub_documents(str(hub_folder(tmp_path, "body")), text_field="body")) == DOCS


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('\n{"text": "a"}\n  \n{"text": "b"}\n\n{"id": 1}\n', "utf-8")
    message = one_line_error(lambda: read_records(file))
    assert message.startswith(f"{file}: record 3 (line 6) has no field 'text' (its keys: 'id')")


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 64])
def test_json_array_larger_than_a_block(tmp_path, monkeypatch, block_bytes):
    # ASCII escapes, numbers, literals and nesting around the text: every place a block can end
    items = [
        {"n": -12.5e3, "ok": True, "none": None, "nested": {"list": [1, [2]]}, "text": doc}
        for doc in DOCS
    ]
    file = tmp_path / "docs.json"
    file.write_text(" \n" + json.dumps(items, indent=1) + "\n\n", "utf-8")
    monkeypatch.setattr(records, "BLOCK_BYTES", block_bytes)
    assert file.stat().st_size > 10 * block_bytes
    assert list(read_records(file)) == DOCS


def test_empty_files_have_no_documents(tmp_path):
    for name, text in [("a.jsonl", ""), ("b.json", ""), ("c.json", " [ ] \n")]:
        (tmp_path / name).write_text(text)
        assert list(read_records(tmp_path / name)) == []


def test_parquet_reads_only_the_text_column(tmp_path):
    file = tmp_path / "docs.parquet"
    table = pa.table({"blob": [[k] * 50 for k in range(len(DOCS))], "text": DOCS})
    pq.write_table(table, file, compression="none", use_dictionary=False)
    # Ruin the other column's bytes: reading them would fail.
    chunk = pq.ParquetFile(file).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(file.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    file.write_bytes(bytes(data))
    with pytest.raises(OSError):
        pq.read_table(file, columns=["blob"])
    assert list(read_records(file)) == DOCS


@pytest.mark.parametrize(
    "line, fragment",
    [
        (
            '{"body": "x", "id": 3}',
            "has no field 'text' (its keys: 'body', 'id'): set data.text_field",
        ),
        ("{}", "has no field 'text' (its keys: none)"),
        ('{"text": 5}', "field 'text' is a JSON number, not a string"),
        ('{"text": null}', "field 'text' is null, not a string"),
        ('{"text": ["a"]}', "field 'text' is a JSON array, not a string"),
        ('{"text": true}', "field 'text' is a JSON boolean, not a string"),
        ('["a", "b"]', "is a JSON array, not an object with a 'text' field"),
        ('"just text"', "is a JSON string, not an object"),
        ('{"text": "a"', "is not JSON (Expecting ',' delimiter at column 13)"),
    ],
)
def test_jsonl_errors_name_the_record_and_line(tmp_path, line, fragment):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"text": "fine"}\n\n' + line + "\n", "utf-8")
    message = one_line_error(lambda: read_records(file))
    assert message.startswith(f"{file}: record 2 (line 3)")
    assert fragment in message


def test_jsonl_bytes_not_utf8_name_the_offset(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_bytes('{"text": "é"}\n'.encode() + b'{"text": "caf\xe9"}\n')
    message = one_line_error(lambda: read_records(file))
    offset = len('{"text": "é"}\n'.encode()) + len(b'{"text": "caf')
    assert message == (
        f"{file}: record 2 (line 2) is not UTF-8 (byte 0xe9 at offset {offset}): "
        "convert the file to UTF-8"
    )


@pytest.mark.parametrize("block_bytes", [4, 1 << 20])
@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[{"text": "a"}, {"body": "b"}]', "record 2 has no field 'text' (its keys: 'body')"),
        ('[{"text": "a"}, {"text": 1.5}]', "record 2: field 'text' is a JSON number, not a string"),
        ('[{"text": "a"}, 7]', "record 2 is a JSON number, not an object with a 'text' field"),
        ('[{"text": "a"}, {"text": tru}]', "record 2 of the JSON array is not JSON (Expecting"),
        ('[{"text": "a"}, ]', "record 2 of the JSON array is not JSON (Expecting value)"),
        ('[{"text": "a"} {"text": "b"}]', "record 1 of the JSON array is followed by '{'"),
        ('[{"text": "a"}] [', "goes on after its JSON array's closing ']': a .json file holds"),
        ('[{"text": "a"}, {"text": "b', "record 2 of the JSON array is not JSON (Unterminated"),
        ('[{"text": "a"},  ', "ends before its JSON array's closing ']', after record 1"),
    ],
)
def test_json_array_errors_name_the_record(tmp_path, monkeypatch, block_bytes, text, fragment):
    monkeypatch.setattr(records, "BLOCK_BYTES", block_bytes)
    file = tmp_path / "bad.json"
    file.write_text(text, "utf-8")
    message = one_line_error(lambda: read_records(file))
    assert message.startswith(str(file))
    assert fragment in message


@pytest.mark.parametrize("block_bytes", [1, 3, 1 << 20])
def test_json_array_bytes_not_utf8_name_the_record_and_offset(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(records, "BLOCK_BYTES", block_bytes)
    file = tmp_path / "bad.json"
    head = '[{"text": "é"}, {"text": "ü"},\n {"text": "caf'.encode()
    file.write_bytes(head + b'\xe9"}]')
    message = one_line_error(lambda: read_records(file))
    assert message == (
        f"{file}: record 3 of the JSON array is not UTF-8 (byte 0xe9 at offset {len(head)}): "
        "convert the file to UTF-8"
    )


def test_json_array_ending_inside_a_character(tmp_path):
    file = tmp_path / "cut.json"
    head = b'[{"text": "a"}, {"text": "'
    file.write_bytes(head + "é".encode()[:1])
    assert one_line_error(lambda: read_records(file)) == (
        f"{file}: record 2 of the JSON array is not UTF-8 (byte 0xc3 at offset {len(head)}): "
        "convert the file to UTF-8"
    )


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{\n "rows": [\n  {"text": "a"}\n ]\n}\n', "record 1 (line 1) is not JSON"),
        ('{"rows": [{"text": "a"}]}\n', "is one JSON object with a list under 'rows', not records"),
    ],
)
def test_json_object_holding_a_list_is_refused(tmp_path, text, fragment):
    file = tmp_path / "wrapped.json"
    file.write_text(text, "utf-8")
    message = one_line_error(lambda: read_records(file))
    assert fragment in message
    assert message.endswith(
        "a .json file holds a JSON array of objects, or one JSON object per line"
    )


def test_parquet_errors(tmp_path):
    file = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", None]}), file)
    assert one_line_error(lambda: read_records(file, "body")) == (
        f"{file} has no column 'body' (its columns: 'id', 'text'): "
        "set data.text_field to one of them"
    )
    assert one_line_error(lambda: read_records(file, "id")) == (
        f"{file}: column 'id' holds int64, not strings"
    )
    assert one_line_error(lambda: read_records(file)) == (
        f"{file}: record 2: field 'text' is null, not a string"
    )
    other = tmp_path / "other.parquet"
    other.write_text("not parquet at all")
    assert one_line_error(lambda: read_records(other)).startswith(
        f"{other} is not a Parquet file ("
    )


@pytest.mark.parametrize("field", ["", 3, None])
def test_text_field_must_be_a_name(tmp_path, field):
    file = write_file(tmp_path, "jsonl")
    message = f"data.text_field={field!r} is not a field name"
    assert one_line_error(lambda: read_records(file, field)).startswith(message)
    assert one_line_error(lambda: saved_documents(tmp_path, text_field=field)).startswith(message)
    assert one_line_error(lambda: hub_documents("any/repo", text_field=field)).startswith(message)


def test_other_suffixes_are_refused(tmp_path):
    file = tmp_path / "docs.csv"
    file.write_text("text\na\n")
    assert one_line_error(lambda: read_records(file)) == (
        f"{file} is not a record file: give a .jsonl, .json or .parquet file"
    )


def test_saved_dataset_errors(tmp_path):
    folder = save_dataset(tmp_path, as_dict=True)
    assert one_line_error(lambda: saved_documents(folder, split="test")) == (
        f"{folder} has no split 'test' (its splits: 'validation', 'train')"
    )
    assert one_line_error(lambda: saved_documents(folder, text_field="body")) == (
        f"{folder}, split 'train' has no column 'body' (its columns: 'id', 'text'): "
        "set data.text_field to one of them"
    )
    assert one_line_error(lambda: saved_documents(folder, text_field="id")) == (
        f"{folder}, split 'train': column 'id' holds int64, not strings"
    )
    assert not is_saved_dataset(tmp_path)
    assert one_line_error(lambda: saved_documents(tmp_path)).startswith(
        f"{tmp_path} is not a dataset written by save_to_disk"
    )


def test_saved_dataset_null_text_is_refused(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b", None]}).save_to_disk(str(tmp_path / "nulls"))
    assert one_line_error(lambda: saved_documents(tmp_path / "nulls")) == (
        f"{tmp_path / 'nulls'}: record 3: field 'text' is null, not a string"
    )


def test_saved_dataset_files_are_those_it_names(tmp_path):
    folder = save_dataset(tmp_path, as_dict=True)
    (folder / "train" / "cache-123.arrow").write_bytes(b"written by map(), not saved")
    names = [str(file.relative_to(folder)) for file in saved_dataset_files(folder)]
    assert names == [
        "dataset_dict.json",
        "train/data-00000-of-00001.arrow",
        "train/dataset_info.json",
        "train/state.json",
        "validation/data-00000-of-00001.arrow",
        "validation/dataset_info.json",
        "validation/state.json",
    ]
    single = save_dataset(tmp_path / "single", as_dict=False)
    names = [file.name for file in saved_dataset_files(single)]
    assert names == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]


def test_hub_offline_is_one_line(monkeypatch):
    # datasets reads HF_HUB_OFFLINE when it is imported: its copy is set too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert one_line_error(lambda: hub_documents("nobody-here/no-such-dataset")) == (
        "hf://nobody-here/no-such-dataset: cannot load it (offline: HF_HUB_OFFLINE is set): "
        "connect to the internet, check the name, or give a local copy "
        "(a folder of its data files, or one written by save_to_disk)"
    )


def test_hub_missing_folder_is_one_line(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    message = one_line_error(lambda: hub_documents(str(missing)))
    assert message.startswith(f"hf://{missing}: cannot load it (Couldn't find any data file at")
    assert message.endswith(
        "connect to the internet, check the name, or give a local copy "
        "(a folder of its data files, or one written by save_to_disk)"
    )


def test_hub_unknown_split_and_config_list_the_valid_ones(tmp_path):
    folder = str(hub_folder(tmp_path))
    assert one_line_error(lambda: hub_documents(folder, split="test")) == (
        f"hf://{folder}: Bad split: test. Available splits: ['train']"
    )
    assert one_line_error(lambda: hub_documents(folder, name="nope")) == (
        f"hf://{folder}: BuilderConfig 'nope' not found. Available: ['default']"
    )


def test_hub_record_without_the_field(tmp_path):
    folder = str(hub_folder(tmp_path))
    assert one_line_error(lambda: hub_documents(folder, text_field="body")) == (
        f"hf://{folder}, split 'train', record 1 has no field 'body' (its keys: 'id', 'text'): "
        "set data.text_field to one of them"
    )
