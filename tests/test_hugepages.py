"""Importing the package asks PyTorch's allocator for transparent huge pages (see __init__)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ROOT = Path(__file__).resolve().parents[1]

# Import the package, make a 64 MB tensor, and report the setting and the process's huge pages.
PROBE = """
import gpt2_lightning, os, torch
x = torch.ones(16 << 20)
rollup = open("/proc/self/smaps_rollup").read()
huge_kb = int(rollup.split("AnonHugePages:")[1].split()[0])
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge_kb)
"""


def probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    setting, huge_kb = out.stdout.split()
    return setting, int(huge_kb)


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="huge pages on request need Linux with transparent_hugepage=madvise",
)
def test_import_turns_on_huge_pages_unless_the_user_said_otherwise():
    setting, huge_kb = probe(None)
    assert setting == "1"
    assert huge_kb >= 32 << 10  # most of the 64 MB tensor sits in 2 MB pages
    setting, huge_kb = probe("0")
    assert setting == "0"
    assert huge_kb == 0  # the user's choice wins: 4 KB pages only
