#!/usr/bin/env python3
"""Set-up and entry points that need only Python 3.11 and pip.

    python3 tasks.py demo    # create .venv, install, run the Branin demo campaign
    python3 tasks.py test    # create .venv, install, run the whole test suite (slow tests included)
    python3 tasks.py setup   # create .venv and install, nothing more
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
NO_TESTS_COLLECTED = 5  # pytest's exit code when a selection leaves nothing to run


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


def _pytest(rest: list[str]) -> int:
    """The test suite in one pytest process per core and one more (up to four; one on a single core), then the
    tests marked ``alone`` in one process by themselves; with arguments that choose processes or markers
    (``-n 0``, ``-m``), one run as given. Most of the suite's time is daemons, stations and planners waiting on
    each other: on two cores, two processes kept the cores 62 % busy (877 s, 2026-12-07), three 84 % (717 s,
    the same tests passing). Each process's PyTorch gets one thread (unless OMP_NUM_THREADS says otherwise), so
    that the processes do not crowd the cores that the daemons and stations they start must also answer on."""
    pytest = [str(BIN / "python"), "-m", "pytest"]
    cores = os.cpu_count() or 1
    workers = min(4, cores + 1) if cores > 1 else 1
    if workers < 2 or any(a.startswith(("-n", "--numprocesses", "--dist", "-m")) or a == "no:xdist" for a in rest):
        return subprocess.call([*pytest, *rest])
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    codes = [subprocess.call([*pytest, "-n", str(workers), "-m", "not alone", *rest], env=env),
             subprocess.call([*pytest, "-m", "alone", *rest])]
    failed = [code for code in codes if code not in (0, NO_TESTS_COLLECTED)]
    return failed[0] if failed else min(codes)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in ("-h", "--help"):
        print(__doc__)
        return 0
    if command not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    os.chdir(ROOT)
    if command == "demo":
        return subprocess.call([str(BIN / "closedloop"), "run", "campaigns/branin.yaml", *rest])
    if command == "test":
        return _pytest(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
