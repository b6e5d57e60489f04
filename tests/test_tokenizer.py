"""get_tokenizer() builds tiktoken's GPT-2 encoding from packaged files, with no network, and
write_hf_tokenizer() writes the same tokenizer as transformers reads it."""

from __future__ import annotations

import hashlib
import random
import socket

import pytest
import tiktoken.registry
import transformers

from gpt2_lightning import get_tokenizer
from gpt2_lightning.tokenizer import HF_TOKENIZER_FILES, write_hf_tokenizer

URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# tiktoken's own sha256 of the two files (tiktoken_ext/openai_public.py).
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """No network, an empty tiktoken cache, and no encoding already built in this process."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cache_dir = tmp_path / "tiktoken"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    # tiktoken keeps every encoding it built; without this it would not read the files again.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    get_tokenizer.cache_clear()
    yield cache_dir
    get_tokenizer.cache_clear()


def test_network_is_really_off(offline_cache):
    with pytest.raises(OSError, match="disabled"):
        socket.create_connection(("openaipublic.blob.core.windows.net", 443))


def test_known_ids(offline_cache):
    enc = get_tokenizer()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_unicode_round_trips(offline_cache):
    enc = get_tokenizer()
    text = "Déjà vu, naïve café — 東京で寿司 🍣🚀 and ünïcödé"
    ids = enc.encode(text)
    assert len(ids) > len(text.split())  # the rarer characters take several byte-level tokens
    assert enc.decode(ids) == text


def test_files_are_cached_under_tiktokens_names_and_reused(offline_cache):
    get_tokenizer()
    expected = {hashlib.sha1((URL + name).encode()).hexdigest(): name for name in SHA256}
    assert sorted(p.name for p in offline_cache.iterdir()) == sorted(expected)
    for key, name in expected.items():
        assert hashlib.sha256((offline_cache / key).read_bytes()).hexdigest() == SHA256[name]
    stats = {key: (offline_cache / key).stat() for key in expected}

    get_tokenizer.cache_clear()
    tiktoken.registry.ENCODINGS.clear()  # the fixture's empty dict: force a fresh build
    enc = get_tokenizer()

    assert enc.encode("hello world") == [31373, 995]
    for key, before in stats.items():
        after = (offline_cache / key).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_interrupted_copy_leaves_nothing_in_the_cache(offline_cache, monkeypatch):
    import gpt2_lightning.tokenizer as tokenizer

    def interrupted(src, dst):
        dst.write(src.read(100))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer.shutil, "copyfileobj", interrupted)
        with pytest.raises(KeyboardInterrupt):
            get_tokenizer()
    assert list(offline_cache.iterdir()) == []  # no half-written file under any name

    assert get_tokenizer().encode("hello world") == [31373, 995]  # the next call copies them whole
    assert len(list(offline_cache.iterdir())) == 2


# Pieces that stress the byte-level BPE: the contraction rules, runs of spaces before a word,
# bytes split inside one character, and the special token next to anything.
PIECES = [
    *"the quick brown fox jumps over a lazy dog".split(),
    *["Déjà", "naïve", "café", "Ünïcödé", "e\u0301", "Ωμέγα", "Привет", "مرحبا", "नमस्ते"],
    *["東京", "寿司", "日本語の文章", "한국어", "中文字符"],
    *["🍣", "🚀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷"],
    *["0", "42", "2024", "3.14159", "1,000,000", "½", "٣"],
    *[".", ",", "!?", "...", "—", "'s", "'ll", "n't", "(", ")", '"', "#", "$", "<|", "|>"],
    *["<|endoftext|>", "<|endoftext", "endoftext|>"],
]
# A single space three times: the usual separator, as in text.
SPACES = [" ", " ", " ", "", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000"]


def random_texts(count: int, seed: int) -> list[str]:
    """count strings of PIECES joined by SPACES, reproducible from seed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = [rng.choice(SPACES) if rng.random() < 0.2 else ""]  # some start with a space
        for _ in range(rng.randint(1, 12)):
            parts += [rng.choice(PIECES), rng.choice(SPACES)]
        texts.append("".join(parts))
    return texts


@pytest.fixture
def hf_tokenizer(offline_cache, tmp_path):
    """transformers' tokenizer read from the files write_hf_tokenizer writes, with no network."""
    write_hf_tokenizer(tmp_path / "hf", context_length=1024)
    return transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")


def test_hf_tokenizer_files_are_the_official_bytes(hf_tokenizer, tmp_path):
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_TOKENIZER_FILES)
    # The Hugging Face gpt2 repository's vocab.json and merges.txt have these sha256 too.
    for hf_name, name in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        assert hashlib.sha256((folder / hf_name).read_bytes()).hexdigest() == SHA256[name]
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert type(hf_tokenizer).__name__.startswith("GPT2Tokenizer")
    assert (len(hf_tokenizer), hf_tokenizer.model_max_length) == (50257, 1024)
    ids = (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.unk_token_id)
    assert ids == (50256, 50256, 50256)
    assert hf_tokenizer.pad_token is None  # as the official gpt2: none


def test_hf_tokenizer_encodes_like_tiktoken(hf_tokenizer):
    # Both sides read "<|endoftext|>" as the special token 50256: transformers always (it is an
    # added special token), tiktoken when it is allowed. Plain text around it is ordinary BPE.
    enc = get_tokenizer()
    texts = random_texts(1000, seed=0)
    assert sum("<|endoftext|>" in text for text in texts) > 100
    expected = [enc.encode(text, allowed_special={"<|endoftext|>"}) for text in texts]
    got = hf_tokenizer(texts)["input_ids"]
    mismatches = [
        text for text, ours, theirs in zip(texts, expected, got, strict=True) if ours != theirs
    ]
    assert mismatches == []
    assert sum(ids.count(50256) for ids in got) > 100
    assert hf_tokenizer.encode("hello world") == [31373, 995]


def test_hf_tokenizer_decodes_like_tiktoken(hf_tokenizer):
    enc = get_tokenizer()
    texts = [
        "Hello , world . It 's here !",  # spaces before punctuation stay (no clean-up)
        "  Déjà vu\t東京 🍣\n\n<|endoftext|>next",
        *random_texts(20, seed=1),
    ]
    for text in texts:
        ids = enc.encode(text, allowed_special="all")
        assert hf_tokenizer.decode(ids) == enc.decode(ids) == text
