"""Small file helpers the rest of the package shares: atomic writes and the cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def cache_home(name: str) -> Path:
    """$XDG_CACHE_HOME/gpt2_lightning/<name> (~/.cache/gpt2_lightning/<name> by default)."""
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    return Path(xdg) / "gpt2_lightning" / name


def umask_mode(mode: int) -> int:
    """mode with the process's umask applied, as open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator[IO]:
    """A temporary file beside target that becomes target only when the block completes: no reader
    ever sees it half-written, and an error (or Ctrl-C) inside the block leaves nothing behind."""
    with tempfile.NamedTemporaryFile(mode, dir=target.parent, suffix=".tmp", delete=False) as tmp:
        try:
            yield tmp
            os.chmod(tmp.name, umask_mode(0o666))  # a temp file is private (0600); ours are not
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, target)
