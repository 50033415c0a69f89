"""A full disk for the tests of what is written when space runs out: a small tmpfs (root only, else the test skips)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def small_tmpfs(folder: Path) -> None:
    """``folder`` made and mounted as a 64 KiB tmpfs; the caller unmounts it."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")


def fill(folder: Path) -> None:
    """The disk of ``folder`` filled by a file named ``filler``: remove it to free the space."""
    try:
        with (folder / "filler").open("wb") as filler:
            filler.write(b"\0" * 1_000_000)
    except OSError:
        pass  # full: what is wanted
