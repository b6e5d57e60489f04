"""get_tokenizer() builds tiktoken's GPT-2 encoding from packaged files, with no network."""

from __future__ import annotations

import hashlib
import socket

import pytest
import tiktoken.registry

from gpt2_lightning import get_tokenizer

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
