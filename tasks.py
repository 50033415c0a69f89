#!/usr/bin/env python3
"""Set-up and entry points that need only Python 3.11 and pip.

    python3 tasks.py demo    # create .venv, install, run the Branin demo campaign
    python3 tasks.py test    # create .venv, install, run the whole test suite (slow tests included)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed"


def _fingerprint() -> str:
    files = [ROOT / "pyproject.toml", ROOT / "constraints.txt"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def setup() -> None:
    """Create the virtual environment and install the project (PyTorch first, the CPU build)."""
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    if not (BIN / "python").exists():
        print("creating virtual environment in .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # exactly this spelling takes the local CPU build; anything looser may pull CUDA wheels
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(_fingerprint())


def _workers(rest: list[str]) -> list[str]:
    """One pytest process per core, up to four, unless the arguments choose (``-n 0``: one process). Most of
    the suite's time is daemons, stations and planners waiting on each other; on two cores two processes take
    the whole suite from about 16 minutes to about 8."""
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in rest)
    workers = min(4, os.cpu_count() or 1)
    return [] if chosen or workers < 2 else ["-n", str(workers)]


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    os.chdir(ROOT)
    if command == "demo":
        return subprocess.call([str(BIN / "closedloop"), "run", "campaigns/branin.yaml", *rest])
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", *_workers(rest), *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
