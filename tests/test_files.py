"""The file helpers: atomic writes, and the orphans a killed writer leaves."""

from __future__ import annotations

import os

import pytest
from conftest import dead_pid, temp_file

from gpt2_lightning.files import atomic_file, remove_orphans


def test_remove_orphans_removes_the_files_of_writers_that_are_gone(tmp_path):
    orphan = temp_file(tmp_path, dead_pid(), 3000)
    other = temp_file(tmp_path, dead_pid(), 500)
    being_written = temp_file(tmp_path, os.getpid(), 700)
    another_host = temp_file(tmp_path, dead_pid(), 900, host="node-7.cluster")
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"\0" * 100)

    assert remove_orphans(tmp_path) == 3500
    assert not orphan.exists() and not other.exists()
    # a live writer's file, and one whose writer another machine would know about, stay
    assert sorted(tmp_path.iterdir()) == sorted([being_written, another_host, checkpoint])
    assert remove_orphans(tmp_path) == 0


def test_atomic_file_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "data.bin"
    with pytest.raises(ValueError), atomic_file(target) as out:
        out.write(b"half")
        raise ValueError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_leaves_nothing_when_the_last_bytes_cannot_be_written(tmp_path):
    # The buffered bytes are written when the file is closed: on a full disk, that is where the
    # write fails. A closed descriptor fails there the same way.
    target = tmp_path / "data.bin"
    target.write_bytes(b"the good one")
    with pytest.raises(OSError), atomic_file(target) as out:
        out.write(b"new")
        os.close(out.fileno())
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"the good one"
