"""What the benchmark scripts share: argument checks, timing, hardware ceilings, tables, charts.

The scripts import this as `common` (they are run as files, so their folder is on sys.path).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

Result = TypeVar("Result")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= 0")
    return value


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The torch.device named on the command line, or a parser error if it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is invalid: use cpu or cuda[:index]")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r} is not supported: use cpu or cuda[:index]")
    if device.type == "cpu" and device.index is not None:
        parser.error(f"--device {name!r} is invalid: a CPU has no index, use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name!r} is unavailable: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(
            f"--device {name!r} is unavailable: this machine has {torch.cuda.device_count()} "
            "CUDA device(s), cuda:0 to cuda:N-1"
        )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read afterwards covers all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Result]) -> tuple[float, Result]:
    """Seconds fn() takes on device, its queued GPU work included, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """The device's measured peak FLOP/s: the fastest of `repeats` (size x size) matrix products.

    CPUs have no published peak that torch knows, so MFU is taken against what a large product
    reaches here. The fastest repeat is used because the peak is a ceiling, not a typical value.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pools, GPU kernels' first launch
    best = min(timed(device, lambda: torch.mm(a, b))[0] for _ in range(repeats))
    return 2 * size**3 / best


def read_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Measured memory read bandwidth in bytes/s: the fastest of `repeats` sums over num_bytes.

    A sum reads every element once and writes one number, so it runs at the speed memory
    delivers data. The buffer must be far larger than the caches for this to be DRAM's speed.
    """
    x = torch.ones(num_bytes // 4, device=device, dtype=torch.float32)
    x.sum()  # warm-up: first touch of the pages, thread pools
    best = min(timed(device, x.sum)[0] for _ in range(repeats))
    return x.numel() * x.element_size() / best


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with columns padded to a common width, so it reads as text too."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            + " |"
        )

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])


def save_ratio_chart(path: Path, title: str, ratios: dict[str, float], reference: str) -> None:
    """A horizontal bar per variant: its speed over the reference's (the line at 1.0)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels = list(ratios)
    figure, ax = plt.subplots(figsize=(7.5, 0.8 + 0.38 * len(labels)), dpi=100)
    colors = ["#4c72b0" if value >= 1 else "#c44e52" for value in ratios.values()]
    bars = ax.barh(labels, list(ratios.values()), color=colors)
    ax.bar_label(bars, [f"{value:.2f}x" for value in ratios.values()], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()  # the first variant on top, as in the table
    ax.set_xlim(0, max(ratios.values()) * 1.15)
    ax.set_xlabel(f"speed over {reference}'s (1.0: as fast)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    print(f"chart saved: {path}")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def own_peak_rss_mib() -> float:
    """This process's peak resident memory since it started its program (VmHWM, Linux).

    ru_maxrss keeps the peak of the process that spawned it across exec (a phase started by a
    parent holding 800 MiB reports 800 MiB or more); /proc's VmHWM belongs to the new program.
    Where there is no /proc (macOS), ru_maxrss.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_rss_mib()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def spawn_phase(script: str, phase: str, *args: str) -> dict[str, float]:
    """Run `python <script> --phase <phase> <args>` in a fresh process (its imports and memory
    its own) and return the JSON line it printed last."""
    command = [sys.executable, script, "--phase", phase, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"phase {phase!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
