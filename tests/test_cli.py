"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
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


@pytest.mark.parametrize("args", [["run"], ["validate"], ["bogus"], ["show", "branin", "abc"]])
def test_a_usage_error_gets_the_usage_and_exit_2(args: list[str], tmp_path: Path) -> None:
    result = closedloop(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr and "error:" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_closing_summary_names_the_best_experiment_stored_even_when_the_goal_stops_the_run(tmp_path: Path) -> None:
    campaign = (ROOT / "campaigns" / "branin.yaml").read_text().replace(
        "experiments: 30", 'experiments: 30\n  stop_when: "y <= 20"')
    (tmp_path / "c.yaml").write_text(campaign)
    result = closedloop("run", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status = closedloop("status", "branin", "--store", "results/branin.db", cwd=tmp_path)
    best = [line for line in status.stdout.splitlines() if "best" in line][0]
    number = best.split("(#", 1)[1].split(",", 1)[0]
    assert f"best experiment: #{number} " in result.stdout, (result.stdout, status.stdout)


@pytest.mark.slow
def test_a_second_run_of_a_campaign_being_run_is_refused_and_the_budget_holds(tmp_path: Path) -> None:
    campaign = (ROOT / "campaigns" / "branin.yaml").read_text().replace("experiments: 30", "experiments: 8").replace(
        "options: {noise: 0.01, seed: 0}", "options: {noise: 0.01, seed: 0, latency: 1.5}")  # >= 12 s in all
    (tmp_path / "c.yaml").write_text(campaign)
    first = subprocess.Popen([sys.executable, "-m", "closedloop.cli", "run", "c.yaml"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = tmp_path / "results" / "branin.db"
        for _ in range(600):  # until the first run holds the campaign
            if (tmp_path / "results" / "branin.db.claims").exists() and first.poll() is None:
                break
            time.sleep(0.1)
        second = closedloop("run", "c.yaml", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second started: make it slower"
        assert second.returncode == 1
        assert "campaign 'branin' is being run by another process" in second.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    status = closedloop("status", "branin", "--store", str(store), cwd=tmp_path)
    assert "8/8 experiments (8 completed, 0 failed)" in status.stdout, status.stdout
