"""`python -m gpt2_lightning.generate`: run for real in a subprocess, and its settings' checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_training_checkpoint
from hydra import compose, initialize_config_dir

from gpt2_lightning import GPT, GPTConfig, get_tokenizer
from gpt2_lightning.cli import check_generate_command
from gpt2_lightning.generate import generate
from gpt2_lightning.generate_cli import _run

CONF = Path(__file__).parent.parent / "gpt2_lightning" / "conf"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # the download fails at once, as on a machine without network
        "HF_HOME": str(cwd / "hf_home"),
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",  # as the one_thread fixture does in-process
    }
    command = [sys.executable, "-m", "gpt2_lightning.generate", *overrides]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_rejects_bad_top_p_before_loading(tmp_path: Path) -> None:
    # checkpoint=124M is not in this offline cache: the error is about top_p, found first
    result = run_cli(tmp_path, "top_p=1.5")
    assert_one_line_error(result, "top_p=1.5", "(0, 1]")


def test_cli_rejects_unknown_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    result = run_cli(tmp_path, f"checkpoint={missing}")
    assert_one_line_error(result, f"checkpoint='{missing}'", "124M")


def test_cli_explains_offline_download_failure(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "checkpoint=gpt2")
    assert_one_line_error(result, "openai-community/gpt2", "download gpt2", "local folder")


@pytest.mark.parametrize("source", ["lightning", "huggingface"])
def test_cli_streams_the_seeded_sample(tmp_path: Path, source: str) -> None:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, num_layers=1, num_heads=2)
    )
    if source == "lightning":
        checkpoint = tmp_path / "tiny.ckpt"
        save_training_checkpoint(model, checkpoint)
    else:
        checkpoint = tmp_path / "tiny-hf"
        model.save_pretrained(checkpoint)
    before = set(tmp_path.iterdir())
    prompt = "Café au lait"  # multi-byte characters survive the round trip
    result = run_cli(
        tmp_path,
        f"checkpoint={checkpoint}",
        f"prompt='{prompt}'",
        "max_new_tokens=12",
        "seed=5",
        "top_k=40",
        "top_p=0.9",
    )
    assert result.returncode == 0, result.stderr
    tokenizer = get_tokenizer()
    generator = torch.Generator().manual_seed(5)
    idx = torch.tensor([tokenizer.encode(prompt)])
    new = generate(model, idx, 12, top_k=40, top_p=0.9, eos_id=50256, generator=generator)
    new_ids = [token for token in new[0, idx.size(1) :].tolist() if token != 50256]
    assert result.stdout == prompt + tokenizer.decode(new_ids) + "\n"
    assert len(result.stdout) > len(prompt) + 1
    # no outputs/ run folder, no .hydra/, no log file
    assert set(tmp_path.iterdir()) - {tmp_path / "hf_home"} == before


def test_generate_cli_rejects_an_unknown_dtype(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_lightning.generate", "checkpoint=124M", "dtype=int8"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "dtype='int8' is invalid" in result.stderr and "bfloat16" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=meta", "device='meta' is not supported: use auto, cpu or cuda[:index]"),
        ("seed=99999999999999999999", "seed=99999999999999999999 is invalid: must be an integer"),
        ("prompt=1e3", "prompt=1000.0 is not text: quote it for Hydra"),
        ("prompt=null", "prompt=None is not text"),
    ],
)
def test_generate_cli_settings_fail_before_the_weights_load(override, message):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("generate", overrides=["checkpoint=/nonexistent.ckpt", override])
    with pytest.raises(ValueError) as error:
        _run(cfg)  # the checkpoint does not exist: the setting must be refused first
    assert str(error.value).startswith(message)


def test_generate_cli_stops_on_an_id_the_tokenizer_lacks(tmp_path, capsys):
    torch.manual_seed(0)
    padded = GPT(
        GPTConfig(vocab_size=50304, context_length=16, emb_dim=16, num_layers=1, num_heads=2)
    )
    with torch.no_grad():  # every greedy step picks 50300 or 50301: padding ids
        direction = torch.randn(16)
        padded.tok_emb.weight.zero_()
        padded.tok_emb.weight[50300], padded.tok_emb.weight[50301] = direction, -direction
    state = {f"model.{k}": v for k, v in padded.state_dict().items()}
    ckpt = tmp_path / "padded.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": padded.cfg.to_dict()}}, ckpt)
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("generate", overrides=[f"checkpoint={ckpt}", "temperature=0"])
    with pytest.raises(ValueError, match=r"the model sampled id 5030[01], which the GPT-2 tok"):
        _run(cfg)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("top_kk=5", "top_kk=5: the config has no key 'top_kk' (it has: checkpoint, prompt, "),
        ("prompt=Hello, world", "'prompt=Hello, world' is a list of values to Hydra (a sweep)"),
        ("prompt=it's", '"prompt=it\'s" is not an override Hydra can read'),
        ("prompt=héllo", "'prompt=héllo' is not an override Hydra can read"),
        ("+foo=1", "'+foo=1': generate takes only its own keys (checkpoint, prompt, "),
        ("~top_k", "'~top_k': generate takes only its own keys"),
        ("-m", "generate runs once: -m/--multirun is for train's sweeps"),
    ],
)
def test_generate_command_line_mistakes_are_one_line(arg, message):
    with pytest.raises(ValueError) as error:
        check_generate_command(["checkpoint=tiny.ckpt", arg])
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
    check_generate_command(["checkpoint=tiny.ckpt", "'prompt=\"Hello, world\"'".strip("'")])


def test_generate_cli_unknown_key_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_lightning.generate", "top_kk=5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: top_kk=5: the config has no key 'top_kk'")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_generate_cli_stops_quietly_when_the_reader_goes_away(tmp_path):
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, num_layers=1, num_heads=2)
    )
    model.save_pretrained(tmp_path / "tiny-hf")
    # `generate ... | head -c 0`: the pipe is closed long before the first token (imports alone
    # take a second), so every write fails with EPIPE
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2_lightning.generate",
            "checkpoint=tiny-hf",
            "max_new_tokens=50",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert stderr == ""  # was "error: [Errno 32] Broken pipe"


def test_generate_cli_ctrl_c_exits_130_without_a_traceback(tmp_path):
    model = GPT(
        GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, num_layers=1, num_heads=2)
    )
    model.save_pretrained(tmp_path / "tiny-hf")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2_lightning.generate",
            "checkpoint=tiny-hf",
            "max_new_tokens=1000000",  # the window slides: it streams until stopped
            "prompt=Hi",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.stdout.read(2) == "Hi"  # the prompt is out: tokens are streaming
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)  # reads stdout too: a full pipe would block
    assert process.returncode == 130
    assert stderr == "\ninterrupted\n"  # no traceback
