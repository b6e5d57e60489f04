"""Shared helpers: run the real command lines in a subprocess with tiny shapes, write small
corpora and checkpoints, read a run's TensorBoard logs."""

from __future__ import annotations

import fcntl
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]

# A model and run small enough that a CLI test takes seconds on 2 CPU cores.
TINY_RUN = [
    "model.emb_dim=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.context_length=32",
    "data.batch_size=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.precision=32-true",  # the same numbers on every CPU (the default follows the CPU)
    "sample.max_new_tokens=8",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: models this small are all synchronisation with two threads, which
    costs ~50x when another process holds the second core; one thread is fast under any load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session, so the embedded corpus is tokenized once."""
    return tmp_path_factory.mktemp("token_cache")


def run_module(
    module: str, *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a subprocess; returns the finished process (text output)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def in_a_terminal(command: list[str], cwd: Path) -> str:
    """What a command prints in a terminal (a pseudo-terminal 120 columns wide), as text."""
    main, other = pty.openpty()
    fcntl.ioctl(other, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=other, stderr=other, cwd=cwd, env=env)
    os.close(other)
    output = b""
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the command ended: the terminal's other side is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert process.wait() == 0, output.decode(errors="replace")[-2000:]
    return output.decode(errors="replace")


@pytest.fixture
def run_train(tmp_path, token_cache):
    """Run `python -m gpt2_lightning.train` with TINY_RUN into tmp_path/run (plus overrides)."""

    def run(*overrides: str, run_dir: Path | None = None) -> subprocess.CompletedProcess:
        run_dir = run_dir or tmp_path / "run"
        args = [*TINY_RUN, f"data.cache_dir={token_cache}", f"hydra.run.dir={run_dir}", *overrides]
        return run_module("gpt2_lightning.train", *args, cwd=tmp_path)

    return run


def resume_against_straight(run, tmp_path: Path, given: list[str], stop: int, steps: int) -> dict:
    """Train `steps` steps straight, and `stop` steps then resumed from last.ckpt to `steps`, both
    with the overrides given; assert the two end with equal weights and log equal train losses on
    the resumed steps. The straight and resumed runs' final checkpoints and scalars."""
    common = [
        *given,
        "model.dropout=0.1",  # dropout and shuffling both draw from the RNGs being restored
        f"scheduler.total_steps={steps}",  # the first run's lr follows the straight run's curve
        "scheduler.warmup_steps=2",
    ]
    straight = run(*common, f"trainer.max_steps={steps}", run_dir=tmp_path / "straight")
    first = run(*common, f"trainer.max_steps={stop}", run_dir=tmp_path / "first")
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr + first.stderr
    resumed = run(
        *common,
        f"trainer.max_steps={steps}",
        f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
        run_dir=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.stderr
    runs = {}
    for name in ("straight", "resumed"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        runs[name] = {"ckpt": ckpt, "scalars": scalars(tmp_path / name)}
    a, b = runs["straight"]["ckpt"], runs["resumed"]["ckpt"]
    assert a["global_step"] == b["global_step"] == steps
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    straight_losses = runs["straight"]["scalars"]["train/loss"]
    resumed_losses = runs["resumed"]["scalars"]["train/loss"]
    assert sorted(resumed_losses) == list(range(stop, steps))  # 0-based: steps stop+1 to steps
    assert {s: straight_losses[s] for s in resumed_losses} == resumed_losses
    return runs


TEXT = "\n".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog, and the dog sleeps on."
    for i in range(30)
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def save_training_checkpoint(model, path: Path) -> None:
    """The layout gpt2_lightning.train writes: hyperparameters plus the module's state dict."""
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": {"model": model.cfg.to_dict()}, "state_dict": state}, path)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the run's TensorBoard logs, as {tag: {step: value}}."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def text_samples(run_dir: Path) -> list[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors("sample/text_summary")]


def dead_pid() -> int:
    """The pid of a process that has ended (a writer killed with -9, as remove_orphans sees it)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def temp_file(folder: Path, pid: int, size: int, host: str | None = None) -> Path:
    """A file named as files.atomic_file names its temporary files, left by writer pid on host,
    of size bytes (sparse)."""
    path = folder / f".tmp-{pid}@{host or socket.gethostname()}-k3x9_q.tmp"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def messages(stderr: str) -> list[str]:
    """stderr's lines, the progress bar's left out."""
    return [line for line in stderr.splitlines() if line and "tokenizing:" not in line]
