"""Files are replaced whole or not at all: a kill mid-write or a full disk keeps the old one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch

from petlkit.errors import CheckpointError
from petlkit.io import atomic_write, read_safetensors, write_safetensors


def test_a_full_disk_is_reported_and_the_old_file_kept(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, {"w": torch.ones(3)})

    def no_space(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match="No space left on device.*previous version"):
        atomic_write(path, no_space)
    assert torch.equal(read_safetensors(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temp file left


def test_sigkill_in_the_middle_of_a_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, {"w": torch.ones(3)})
    script = f"""
import os, signal
from petlkit.io import atomic_write
def half(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a file")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write({str(path)!r}, half)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9
    assert torch.equal(read_safetensors(path)["w"], torch.ones(3))
