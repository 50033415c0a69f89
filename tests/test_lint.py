"""The code base passes ruff's defect rules (pyproject.toml ``[tool.ruff.lint]``): undefined and unused names,
syntax errors. Run in the suite, so a change that leaves one does not land."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_no_undefined_or_unused_names() -> None:
    checked = ["closedloop", "drivers", "simulators", "tests", "benchmarks", "tasks.py"]
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *checked],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stdout + found.stderr
