"""CURVE key files: a secret key is never readable by another user, not even for a moment."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_secret_key_file_is_created_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """The secret was written into a file made with the umask's mode (0644 here) and restricted afterwards: a user
    who opened it in between (inotify tells when it appears) kept reading it after the chmod. Its file is now
    created 0600 before the key is written."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: the file's mode at creation cannot be watched")
    trace = tmp_path / "trace.txt"
    done = subprocess.run([strace, "-f", "-qq", "-e", "trace=openat,open,creat", "-o", str(trace), sys.executable,
                           "-m", "closedloop.cli", "keys", "new", "station-a", "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "keys" / "station-a.key_secret"
    creations = [line for line in trace.read_text().splitlines() if "station-a.key_secret" in line and "O_CREAT" in line]
    assert creations, trace.read_text()[-2000:]
    # the first open that may create it makes it (the command refuses a key that exists); later ones keep its mode
    mode = re.search(r"O_CREAT[^,]*, (0\d+)\)", creations[0])
    assert mode and int(mode.group(1), 8) & 0o077 == 0, creations
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys" / "station-a.key").stat().st_mode) & 0o044  # the public key stays readable
