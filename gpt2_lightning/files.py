"""Small file helpers the rest of the package shares: atomic writes, their orphans, the cache."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

# A temporary file is named .tmp-<pid>@<host>-<random>.tmp: recognisable, and its writer known, so
# a later run can tell a file whose writer was killed (an orphan) from one being written now.
TEMP_PREFIX = ".tmp-"


def cache_home(name: str) -> Path:
    """$XDG_CACHE_HOME/gpt2_lightning/<name> (~/.cache/gpt2_lightning/<name> by default)."""
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    return Path(xdg) / "gpt2_lightning" / name


def umask_mode(mode: int) -> int:
    """mode with the process's umask applied, as open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


class AtomicFile:
    """A temporary file (.file, open) beside target that becomes target only on commit(): no reader
    ever sees it half-written. discard(), or a commit that fails (a full disk refuses the last
    bytes), leaves nothing behind. For a file written over a long time; atomic_file for a block."""

    def __init__(self, target: str | os.PathLike, mode: str = "wb") -> None:
        self.target = Path(target)
        prefix = f"{TEMP_PREFIX}{os.getpid()}@{socket.gethostname()}-"
        self.file = tempfile.NamedTemporaryFile(
            mode, dir=self.target.parent, prefix=prefix, suffix=".tmp", delete=False
        )

    def commit(self) -> None:
        try:
            self.file.close()  # writes the last bytes
            os.chmod(self.file.name, umask_mode(0o666))  # a temp file is private (0600); ours not
            os.replace(self.file.name, self.target)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with suppress(OSError):  # the last bytes, which a full disk refused
            self.file.close()
        os.unlink(self.file.name)


@contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator[IO]:
    """An AtomicFile's file for the block, committed when the block completes; an error (or
    Ctrl-C) inside it discards it."""
    file = AtomicFile(target, mode)
    try:
        yield file.file
    except BaseException:
        file.discard()
        raise
    file.commit()


def remove_orphans(folder: Path) -> int:
    """Remove the temporary files in folder whose writer, a process of this machine, is gone (a
    kill -9, a crash); the bytes freed. Files of other machines (a shared folder) are left."""
    freed = 0
    for path in Path(folder).glob(f"{TEMP_PREFIX}*@*-*.tmp"):
        pid, _, rest = path.name.removeprefix(TEMP_PREFIX).partition("@")
        host = rest.rpartition("-")[0]
        if not pid.isdigit() or host != socket.gethostname() or _running(int(pid)):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # removed by another run meanwhile, or not ours to remove
            continue
        freed += size
    return freed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
