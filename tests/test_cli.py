"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def closedloop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "closedloop.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_malformed_campaign_exits_2_with_one_line_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "campaigns" / "branin.yaml").read_text().replace("bounds: [-5, 10]", "bounds: [10, -5]"))
    result = closedloop("run", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "parameters.x1.bounds" in lines[0] and "bad.yaml:4:" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_validate_accepts_the_demo_campaign(tmp_path: Path) -> None:
    result = closedloop("validate", str(ROOT / "campaigns" / "branin.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "branin" in result.stdout and "minimize y" in result.stdout


@pytest.mark.slow
def test_run_prints_the_best_experiment_and_the_store(tmp_path: Path) -> None:
    campaign = (ROOT / "campaigns" / "branin.yaml").read_text().replace("experiments: 30", "experiments: 10")
    (tmp_path / "c.yaml").write_text(campaign)
    result = closedloop("run", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "best experiment: #" in result.stdout
    assert "results stored in results/branin.db" in result.stdout
    assert (tmp_path / "results" / "branin.db").exists()
