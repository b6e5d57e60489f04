"""The benchmark scripts run with --quick and print every row of their tables, with numbers that
are positive and agree with each other (the figures themselves are never asserted)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each --quick run imports torch, Lightning and transformers in one or more fresh processes:
# about 20-40 s on 2 busy cores, so all of them are slow tests.
pytestmark = pytest.mark.slow


def run_quick(script: str, *args: str) -> list[str]:
    """stdout lines of `python benchmarks/<script> --quick`, run from the repository root."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def table(lines: list[str]) -> list[dict[str, str]]:
    """The rows of the first markdown table in lines, each as {column name: cell}."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line[:1] == "|"]
    header, body = cells[0], cells[2:]  # cells[1] is the |---| line
    return [dict(zip(header, row, strict=True)) for row in body]


def number(cell: str) -> float:
    """A printed figure such as '1,234.5', '3.20%' or '0.98x' as a float."""
    return float(cell.replace(",", "").rstrip("%x"))


def line_value(lines: list[str], label: str) -> str:
    """The text after 'label: ' on the first line that starts with it."""
    matches = [line[len(label) + 2 :] for line in lines if line.startswith(label + ": ")]
    assert matches, f"no line starts with {label!r}"
    return matches[0]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_train_throughput_prints_every_variant(tmp_path) -> None:
    lines = run_quick("train_throughput.py", "--chart", str(tmp_path / "train.png"))
    rows = {row["variant"]: row for row in table(lines)}
    assert set(rows) == {
        "ours: plain loop",
        "ours: Lightning Trainer",
        "transformers GPT2LMHeadModel",
    }
    for row in rows.values():
        for column in ("tokens/s", "ms/step", "MFU", "vs transformers"):
            assert number(row[column]) > 0, (row["variant"], column)
        # --quick trains on batches of 2 x 32 tokens: tokens/s x s/step is that, up to rounding.
        tokens_per_step = number(row["tokens/s"]) * number(row["ms/step"]) / 1000
        assert tokens_per_step == pytest.approx(64, rel=0.01)
    assert rows["transformers GPT2LMHeadModel"]["vs transformers"] == "1.00x"
    assert number(line_value(lines, "Lightning / plain loop")) > 0
    width, height = png_size(Path(line_value(lines, "chart saved")))
    assert width > height > 100 and (tmp_path / "train.png").stat().st_size < 200_000


def test_generate_throughput_prints_every_variant_with_the_same_ids(tmp_path) -> None:
    lines = run_quick("generate_throughput.py", "--chart", str(tmp_path / "decode.png"))
    rows = {(row["shape"], row["batch"], row["variant"]): row for row in table(lines)}
    bf16, fp16 = "ours, KV cache, bf16 steps", "ours, KV cache, fp16 steps"  # ids may differ
    variants = ("ours, KV cache", "ours, no cache", bf16, fp16, "transformers")
    assert set(rows) == {("small", batch, v) for batch in ("1", "8") for v in variants}
    for key, row in rows.items():
        for column in ("tokens/s", "ms/step", "vs transformers"):
            assert number(row[column]) > 0, (key, column)
        either = {"True", "False"}
        expected = {"transformers": {"-"}, bf16: either, fp16: either}.get(key[2], {"True"})
        assert row["same ids"] in expected, key
    assert line_value(lines, "greedy ids equal to transformers'") == "True"
    width, height = png_size(Path(line_value(lines, "chart saved")))
    assert width > height > 100  # one bar for each of ours per shape and batch
    ceilings = {}
    for label in ("small", "small, fp16 steps"):
        roofline = line_value(lines, label)
        ceiling = re.search(r"([\d,.]+) MB .* at most ([\d,.]+) tokens/s", roofline)
        assert ceiling and number(ceiling.group(2)) > 0, roofline
        ceilings[label] = number(ceiling.group(1))
    # fp16 products' weights: the 7.2M-parameter shape reads ~half the bytes (norms stay fp32).
    assert 0.49 < ceilings["small, fp16 steps"] / ceilings["small"] < 0.51


def test_data_throughput_prints_every_phase(tmp_path) -> None:
    lines = run_quick("data_throughput.py", "--chart", str(tmp_path / "data.png"))
    rows = {row["phase"]: row for row in table(lines)}
    tokenizers = ("tiktoken encode_ordinary_batch", "tokenize_to_cache, cold cache")
    assert set(rows) == {*tokenizers, "warm start"}
    for name, row in rows.items():
        for column in ("seconds", "peak RSS (MiB)", "RSS after imports (MiB)"):
            assert number(row[column]) > 0, (name, column)
        assert number(row["peak RSS (MiB)"]) >= number(row["RSS after imports (MiB)"])
    assert all(number(rows[name]["MB/s"]) > 0 for name in tokenizers)
    label = "token counts agree (cache = tiktoken + one <|endoftext|> per file)"
    assert line_value(lines, label) == "True"
    width, height = png_size(Path(line_value(lines, "chart saved")))
    assert 500 < width < 1000 and 50 < height < 300


def test_hellaswag_throughput_prints_every_variant_with_the_harness_numbers(tmp_path) -> None:
    pytest.importorskip("lm_eval")
    lines = run_quick("hellaswag_throughput.py", "--chart", str(tmp_path / "hellaswag.png"))
    rows = {row["variant"]: row for row in table(lines)}
    lm_eval = "lm-eval HFLM loglikelihood"
    assert set(rows) == {"ours: harness style", "ours: completion style", lm_eval}
    for row in rows.values():
        for column in ("items/s", "ms/item", "vs lm-eval"):
            assert number(row[column]) > 0, (row["variant"], column)
        # items/s x ms/item is a second, up to the printed rounding
        assert number(row["items/s"]) * number(row["ms/item"]) == pytest.approx(1000, rel=0.02)
    assert rows[lm_eval]["vs lm-eval"] == "1.00x"
    assert number(line_value(lines, "ours (harness style) / lm-eval")) > 0
    # The harness style computes lm-eval's log-likelihoods: equal up to float32 rounding.
    label = "log-likelihoods, harness style vs lm-eval (max abs difference)"
    assert float(line_value(lines, label)) < 1e-3
    width, height = png_size(Path(line_value(lines, "chart saved")))
    assert width > height > 100


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cpu:0", "--device 'cpu:0' is invalid: a CPU has no index, use cpu"),
        ("tpu", "--device 'tpu' is invalid: use cpu or cuda[:index]"),
    ],
)
def test_a_device_the_scripts_cannot_use_is_refused_in_one_line(device, message, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import resolve_device
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parser = argparse.ArgumentParser(prog="bench")
    with pytest.raises(SystemExit) as exit_info:
        resolve_device(parser, device)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"bench: error: {message}"


def test_cache_startup_times_both_starts() -> None:
    lines = run_quick("cache_startup.py")
    rows = table(lines)
    assert len(rows) == 2  # a start that checks the size only, and one that checksums too
    for row in rows:
        assert number(row["total (s)"]) > 0 and number(row["peak RSS (MiB)"]) > 0
    assert "GB/s" in line_value(lines, "CRC-32 of the file alone")


def test_prepare_throughput_prints_both_phases_both_sizes_and_the_warm_start(tmp_path) -> None:
    lines = run_quick("prepare_throughput.py", "--chart", str(tmp_path / "prepare.png"))
    # Two tables: speed, then prepare's memory at --quick's two corpus sizes (2 and 4 MB).
    start = next(i for i, line in enumerate(lines) if line.startswith("peak memory of prepare"))
    rows = {row["phase"]: row for row in table(lines[:start])}
    assert set(rows) == {"tiktoken encode_ordinary, 1 process", "prepare_shards"}
    for name, row in rows.items():
        for column in ("seconds", "tokens/s", "tokens/s per core", "peak RSS (MiB)"):
            assert number(row[column]) > 0, (name, column)
    assert number(line_value(lines, "prepare per core / tiktoken")) > 0
    label = "token counts agree (shards = tiktoken + one <|endoftext|> per document)"
    assert line_value(lines, label) == "True"
    memory = table(lines[start:])
    assert [row["jsonl"] for row in memory] == ["2 MB", "4 MB"]
    for row in memory:
        assert number(row["process peak RSS (MiB)"]) > 0
        # "-": a pool that lived between two reads of /proc (the quick corpora take ~0.3 s)
        assert row["peak PSS, all (MiB)"] == "-" or number(row["peak PSS, all (MiB)"]) > 0
    assert number(memory[1]["tokens"]) > number(memory[0]["tokens"])
    warm = line_value(lines, "warm start")
    assert "8 MiB of shards" in warm and "one *val*" in warm, warm
    width, height = png_size(Path(line_value(lines, "chart saved")))
    assert width > height > 100
