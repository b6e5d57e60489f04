"""The scripts in examples/ run as a reader would run them and print the right figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_lightning import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path, *args: str) -> list[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def value_of(lines: list[str], label: str) -> str:
    """The text after 'label: ' on the first line that starts with it."""
    matches = [line[len(label) + 2 :] for line in lines if line.startswith(label + ": ")]
    assert matches, f"no line starts with {label!r}"
    return matches[0]


def weight_table(lines: list[str], title: str, size: int) -> torch.Tensor:
    """The (size, size) matrix print_weights printed under `title` (header row skipped)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title + " (rows"))
    rows = lines[start + 2 : start + 2 + size]
    return torch.tensor([[float(v) for v in row.split()[-size:]] for row in rows])


@pytest.fixture(scope="module")
def basic_usage(tmp_path_factory) -> list[str]:
    return run_example("basic_usage.py", tmp_path_factory.mktemp("basic_usage"))


@pytest.fixture(scope="module")
def attention_demo(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("attention_demo")
    return run_example("attention_demo.py", folder, "--plot", str(folder / "attention.png"))


def test_basic_usage_prints_parameter_counts(basic_usage):
    assert value_of(basic_usage, "124M") == "124,439,808 parameters, 474.7 MiB in fp32"
    with torch.device("meta"):
        tiny = GPT(GPTConfig.from_name("tiny")).num_parameters()
    assert tiny == 7_242_624
    expected = f"{tiny:,} parameters, {tiny * 4 / 2**20:.1f} MiB in fp32"  # 27.6 MiB
    assert value_of(basic_usage, "tiny") == expected


def test_basic_usage_tokenizes_and_decodes(basic_usage):
    assert value_of(basic_usage, "token ids") == "[31373, 995]"
    assert value_of(basic_usage, "decoded") == "'hello world'"


def test_basic_usage_prints_the_logits_shape(basic_usage):
    # "Every effort moves you" is 4 tokens; one row of 50257 scores per token.
    assert value_of(basic_usage, "input ids shape") == "(1, 4)"
    assert value_of(basic_usage, "logits shape") == "(1, 4, 50257)"


def test_basic_usage_generates_eight_valid_new_ids(basic_usage):
    for label in ("greedy new ids", "sampled new ids"):
        ids = [int(i) for i in value_of(basic_usage, label).strip("[]").split(",")]
        assert len(ids) == 8 and all(0 <= i < 50257 for i in ids)
    assert value_of(basic_usage, "sampled text").startswith("'Every effort moves you")


def test_attention_demo_prints_the_shapes(attention_demo):
    assert value_of(attention_demo, "token ids") == "[7120, 7002, 4940, 351, 530, 2239]"
    assert value_of(attention_demo, "embeddings x").startswith("(1, 6, 3)")
    assert value_of(attention_demo, "queries, keys, values").startswith("(1, 6, 2)")
    assert value_of(attention_demo, "scores = queries @ keys^T").startswith("(1, 6, 6)")
    assert value_of(attention_demo, "weights").startswith("(1, 2, 6, 6)")
    assert value_of(attention_demo, "context").startswith("(1, 6, 2), weights: (1, 6, 6)")
    assert value_of(attention_demo, "the module computes the same") == "True"


def test_attention_demo_causal_weights_hide_the_future(attention_demo):
    future = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)
    self_weights = weight_table(attention_demo, "self-attention weights", 6)
    causal = weight_table(attention_demo, "causal attention weights", 6)
    assert torch.all(causal[future] == 0.0)
    assert torch.all(self_weights[future] > 0.0)
    for weights in (self_weights, causal):
        assert (weights.sum(dim=-1) - 1.0).abs().max().item() < 1e-3  # printed to 4 decimals
    assert torch.equal(causal[-1], self_weights[-1])
    assert causal[0, 0].item() == 1.0  # the first token can only look at itself
    assert value_of(attention_demo, "largest weight above the diagonal") == "0.0000"
    assert value_of(attention_demo, "last token's context unchanged by the mask") == "True"


def test_attention_demo_dropout_and_heads(attention_demo):
    causal = weight_table(attention_demo, "causal attention weights", 6)
    dropped = weight_table(attention_demo, "train-mode weights", 6)
    kept = dropped != 0.0
    assert 0 < kept.sum().item() < 21  # 21 visible weights, some dropped
    assert (dropped[kept] - 2.0 * causal[kept]).abs().max().item() < 2e-4
    assert value_of(attention_demo, "eval mode is dropout-free") == "True"
    for head in (0, 1):
        weights = weight_table(attention_demo, f"head {head} weights", 6)
        assert (weights.sum(dim=-1) - 1.0).abs().max().item() < 1e-3
        assert torch.all(weights.triu(diagonal=1) == 0.0)


def test_attention_demo_saves_the_heat_maps(attention_demo):
    path = Path(value_of(attention_demo, "heat-maps saved"))
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 3 * height > 900  # four square panels side by side
    assert path.stat().st_size < 200_000
