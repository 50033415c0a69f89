"""The simulated EPICS IOC's command line (serving PVs is tested with a driver in tests/drivers/test_epics.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("caproto")

ROOT = Path(__file__).resolve().parents[2]


def ioc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simulators.epics_ioc", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_help_lists_the_stage_options_beside_caprotos() -> None:
    """`--help` listed caproto's options alone, not --limit, --velocity and --exposure, which docs/instruments.md
    documents and which work."""
    result = ioc("--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for option in ("--limit NAME=LOW:HIGH", "--velocity", "--exposure", "--prefix", "--list-pvs"):
        assert option in help_text, result.stdout
    assert "default: 50" in help_text and "x1=-5:10" in help_text


@pytest.mark.parametrize("args, message", [
    (["--limit", "x1"], "--limit 'x1': write NAME=LOW:HIGH, e.g. x1=-5:10"),
    (["--limit", "x1=0:1"], "exactly two axes"),
    (["--velocity", "fast"], "--velocity: invalid float value: 'fast'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_option_is_a_usage_error_before_anything_is_served(args: list[str], message: str) -> None:
    result = ioc(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
