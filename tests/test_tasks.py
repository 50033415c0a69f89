"""tasks.py's usage: asked for, it is given (exit 0) and names every command; an unknown command is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parent.parent / "tasks.py"


def test_help_prints_the_usage_naming_every_command_and_exits_0() -> None:
    for ask in ("--help", "-h"):
        done = subprocess.run([sys.executable, str(TASKS), ask], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for command in ("demo", "test", "setup"):
            assert f"tasks.py {command}" in done.stdout


def test_an_unknown_command_prints_the_usage_and_exits_2() -> None:
    done = subprocess.run([sys.executable, str(TASKS), "tset"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "tasks.py demo" in done.stdout
