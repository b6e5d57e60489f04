"""Text records -> documents: JSON Lines, JSON arrays, Parquet and Hugging Face datasets, streamed.

Each reader yields the text field of every record in order, reading a file line by line, in blocks
or in batches, so a multi-GB file never sits in memory whole. A record that gives no document (no
such field, not a string, not an object, not JSON, not UTF-8) is a ValueError of one line naming
the file and the record.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BLOCK_BYTES = 1 << 20  # a JSON array is read in blocks of this size
BATCH_ROWS = 1024  # Parquet files and saved datasets are read this many records at a time
SUFFIXES = (".jsonl", ".json", ".parquet")
_JSON_FORMS = "a .json file holds a JSON array of objects, or one JSON object per line"
_HUB_HINT = (
    "connect to the internet, check the name, or give a local copy "
    "(a folder of its data files, or one written by save_to_disk)"
)
_JSON_TYPES = {
    dict: "a JSON object",
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "a JSON boolean",
    type(None): "null",
}
_SPACE = re.compile(r"[ \t\n\r]*")  # whitespace as JSON defines it
# A JSONDecodeError this close to the end of the text read so far may be the end of the block
# rather than a mistake (a cut number, literal or \u escape); "Unterminated string" always may be.
_CUT_SLACK = 16


def _check_field(text_field: object) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(
            f"data.text_field={text_field!r} is not a field name: "
            "give the name of the field that holds the text, e.g. 'text'"
        )


def _listing(names: Iterable[object]) -> str:
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:10])  # a record may have thousands of keys
    return (shown + (", ..." if len(names) > 10 else "")) or "none"


def _string(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), f"a {type(value).__name__}")
        raise ValueError(f"{where}: field {field!r} is {kind}, not a string")
    return value


def _text(record: object, field: str, where: str) -> str:
    """The field's text of one record; where names the record in errors."""
    if not isinstance(record, dict):
        kind = _JSON_TYPES.get(type(record), f"a {type(record).__name__}")
        raise ValueError(f"{where} is {kind}, not an object with a {field!r} field")
    if field not in record:
        raise ValueError(
            f"{where} has no field {field!r} (its keys: {_listing(record)}): "
            "set data.text_field to one of them"
        )
    return _string(record[field], field, where)


def read_records(file: Path, text_field: str = "text") -> Iterator[str]:
    """The text field of each record of a .jsonl, .json (array or lines) or .parquet file."""
    _check_field(text_field)
    file = Path(file)
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(file, text_field)
    if suffix == ".json":
        if _opens_array(file):
            return _json_array(file, text_field, BLOCK_BYTES)
        return _json_lines(file, text_field, json_suffix=True)
    if suffix == ".parquet":
        return _parquet(file, text_field)
    raise ValueError(
        f"{file} is not a record file: give a {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} file"
    )


def _json_lines(file: Path, field: str, json_suffix: bool = False) -> Iterator[str]:
    """The text of each object in a JSON Lines file, read line by line."""
    hint = f": {_JSON_FORMS}" if json_suffix else ""
    number, offset = 0, 0
    # Bytes, so that errors can name a byte offset, and lines end at b"\n" only.
    with open(file, "rb") as f:
        for line_number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            number += 1
            try:
                record = json.loads(line.decode("utf-8").rstrip("\r\n"))  # columns in the line
            except UnicodeDecodeError as error:
                where = f"{file}: record {number} (line {line_number})"
                raise ValueError(
                    f"{where} is not UTF-8 (byte {line[error.start]:#04x} at offset "
                    f"{start + error.start}): convert the file to UTF-8"
                ) from None
            except json.JSONDecodeError as error:
                where = f"{file}: record {number} (line {line_number})"
                raise ValueError(
                    f"{where} is not JSON ({error.msg} at column {error.colno}){hint}"
                ) from None
            if type(record) is dict and type(text := record.get(field)) is str:
                yield text  # the common case, without building `where` for an error
                continue
            where = f"{file}: record {number} (line {line_number})"
            if json_suffix and number == 1 and isinstance(record, dict) and field not in record:
                # one object holding the records in a list, as some exports write them
                lists = [key for key, value in record.items() if isinstance(value, list)]
                if lists:
                    raise ValueError(
                        f"{file} is one JSON object with a list under {lists[0]!r}, "
                        f"not records: {_JSON_FORMS}"
                    )
            yield _text(record, field, where)


def _opens_array(file: Path) -> bool:
    """Whether the first character of file that is not JSON whitespace is "["."""
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            if stripped := block.lstrip(b" \t\n\r"):
                return stripped.startswith(b"[")
    return False


def _utf8_blocks(file: Path, block_bytes: int) -> Iterator[tuple[str, str | None]]:
    """The text of file block by block, each with None; or, last, the text before a byte that is
    not UTF-8, with where that byte is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the block in the file
    with open(file, "rb") as f:
        while True:
            block = f.read(block_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character the last block began
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:  # its object: the pending bytes, then the block
                at = offset - pending + error.start
                bad = f"byte {error.object[error.start]:#04x} at offset {at}"
                yield error.object[: error.start].decode(), bad
                return
            yield text, None
            if not block:
                return
            offset += len(block)


def _json_array(file: Path, field: str, block_bytes: int) -> Iterator[str]:
    """The text of each object in a file holding one JSON array, decoded one element at a time."""
    # The buffer holds the text not yet decoded: about one record plus one block.
    decoder = json.JSONDecoder()
    blocks = _utf8_blocks(file, block_bytes)
    buffer, pos, number, bad, done = "", 0, 0, None, False
    state = "open"  # before "[", then "first" (a value or "]"), "value", "next" ("," or "]"), "end"
    while True:
        pos = _SPACE.match(buffer, pos).end()
        if pos < len(buffer):
            char = buffer[pos]
            if state == "open":  # read_records saw that it is "["
                pos, state = pos + 1, "first"
                continue
            if state == "end":
                break
            if char == "]" and state in ("first", "next"):
                pos, state = pos + 1, "end"
                continue
            if state == "next":
                if char != ",":
                    raise ValueError(
                        f"{file}: record {number} of the JSON array is followed by {char!r}, "
                        "not ',' or ']'"
                    )
                pos, state = pos + 1, "value"
                continue
            try:
                value, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as error:
                cut = "Unterminated string" in error.msg or error.pos >= len(buffer) - _CUT_SLACK
                if done or not cut:
                    raise ValueError(
                        f"{file}: record {number + 1} of the JSON array is not JSON ({error.msg})"
                    ) from None
            else:
                if end < len(buffer) or done or bad:  # at the end, a number may go on
                    number += 1
                    yield _text(value, field, f"{file}: record {number}")
                    pos, state = end, "next"
                    continue
        if bad or done:
            break
        item = next(blocks, None)
        if item is None:
            done = True
        else:
            text, bad = item
            buffer, pos = buffer[pos:] + text, 0
    if state == "end" and (bad or pos < len(buffer)):
        raise ValueError(f"{file} goes on after its JSON array's closing ']': {_JSON_FORMS}")
    if bad:
        raise ValueError(
            f"{file}: record {number + 1} of the JSON array is not UTF-8 ({bad}): "
            "convert the file to UTF-8"
        )
    if state != "end":
        raise ValueError(
            f"{file} ends before its JSON array's closing ']', after record {number}: "
            "is the file cut short?"
        )


def _string_type(kind: Any) -> bool:
    import pyarrow as pa

    types = pa.types
    return types.is_string(kind) or types.is_large_string(kind) or types.is_string_view(kind)


def _column_texts(batches: Iterable[Any], field: str, where: str) -> Iterator[str]:
    """The strings of one arrow string column, given in batches; a null is refused."""
    number = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            number += 1
            yield _string(value, field, f"{where}: record {number}")


def _parquet(file: Path, field: str) -> Iterator[str]:
    """The text column of a Parquet file; only that column is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except pa.ArrowException as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{file} is not a Parquet file ({reason})") from None
    if field not in schema.names:
        raise ValueError(
            f"{file} has no column {field!r} (its columns: {_listing(schema.names)}): "
            "set data.text_field to one of them"
        )
    kind = schema.field(field).type
    if not _string_type(kind):
        raise ValueError(f"{file}: column {field!r} holds {kind}, not strings")
    return _parquet_texts(file, field)


def _parquet_texts(file: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(file) as parquet:
        yield from _column_texts(
            parquet.iter_batches(batch_size=BATCH_ROWS, columns=[field]), field, str(file)
        )


def hub_documents(
    repo: str,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    revision: str | None = None,
) -> Iterator[str]:
    """The text field of each example of a Hugging Face dataset (a hub id or a local folder),
    streamed; revision: a commit, tag or branch (None: the default branch)."""
    _check_field(text_field)
    import datasets

    try:
        examples = datasets.load_dataset(repo, name, split=split, streaming=True, revision=revision)
    except OSError as error:  # ConnectionError, DatasetNotFoundError, HTTP errors
        raise _unreachable(repo, error) from None
    except ValueError as error:  # an unknown split or config; datasets lists the valid ones
        raise ValueError(f"hf://{repo}: {' '.join(str(error).split())}") from None
    return _hub_texts(examples, repo, split, text_field)


def _unreachable(repo: str, error: OSError) -> ValueError:
    import datasets

    if isinstance(error, ConnectionError):
        offline = datasets.config.HF_HUB_OFFLINE
        reason = "offline: HF_HUB_OFFLINE is set" if offline else "no network"
    else:
        reason = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    return ValueError(f"hf://{repo}: cannot load it ({reason}): {_HUB_HINT}")


def _hub_texts(examples: Iterable[dict], repo: str, split: str, field: str) -> Iterator[str]:
    try:
        for number, example in enumerate(examples, 1):
            yield _text(example, field, f"hf://{repo}, split {split!r}, record {number}")
    except OSError as error:  # the connection lost while streaming
        raise _unreachable(repo, error) from None


# The files Dataset.save_to_disk and DatasetDict.save_to_disk write beside the data (named here:
# checking a path must not import datasets).
_DICT_FILE = "dataset_dict.json"
_DATASET_FILES = ("state.json", "dataset_info.json")


def is_saved_dataset(folder: Path) -> bool:
    """Whether folder was written by datasets' Dataset.save_to_disk or DatasetDict.save_to_disk."""
    folder = Path(folder)
    return (folder / _DICT_FILE).is_file() or all((folder / n).is_file() for n in _DATASET_FILES)


def _check_saved(folder: Path) -> None:
    if not is_saved_dataset(folder):
        raise ValueError(
            f"{folder} is not a dataset written by save_to_disk "
            f"(it has no {_DICT_FILE}, nor {' and '.join(_DATASET_FILES)})"
        )


def saved_documents(folder: Path, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """The text field of each record of a dataset written by save_to_disk (split: which one of a
    DatasetDict), read in batches from its memory-mapped arrow files."""
    _check_field(text_field)
    folder = Path(folder)
    _check_saved(folder)
    import datasets

    dataset = datasets.load_from_disk(str(folder))
    where = str(folder)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{folder} has no split {split!r} (its splits: {_listing(dataset)})")
        dataset, where = dataset[split], f"{folder}, split {split!r}"
    if text_field not in dataset.column_names:
        columns = _listing(dataset.column_names)
        raise ValueError(
            f"{where} has no column {text_field!r} (its columns: {columns}): "
            "set data.text_field to one of them"
        )
    kind = dataset.data.schema.field(text_field).type
    if not _string_type(kind):
        raise ValueError(f"{where}: column {text_field!r} holds {kind}, not strings")
    # arrow format: whatever format the dataset was saved with, no per-batch conversion
    batches = dataset.select_columns([text_field]).with_format("arrow").iter(batch_size=BATCH_ROWS)
    return _column_texts(batches, text_field, where)


def saved_dataset_files(folder: Path) -> list[Path]:
    """The files whose bytes decide a saved dataset's content, sorted: a cache key hashes them."""
    # Those its state.json names, not all in the folder: map() on a loaded dataset writes its
    # cache files there, which change nothing saved.
    folder = Path(folder)
    _check_saved(folder)
    parts, files = [folder], []
    if (folder / _DICT_FILE).is_file():
        files.append(folder / _DICT_FILE)
        splits = json.loads((folder / _DICT_FILE).read_bytes())["splits"]
        parts = [folder / split for split in splits]
    for part in parts:
        state = json.loads((part / "state.json").read_bytes())
        files += [part / name for name in _DATASET_FILES]
        files += [part / entry["filename"] for entry in state["_data_files"]]
    return sorted(files)
