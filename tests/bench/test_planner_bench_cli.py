"""``closedloop bench planner`` as a user runs it: interrupted, resumed, its output files and its messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLOSEDLOOP = [sys.executable, "-m", "closedloop.cli"]
REPOSITORY = Path(__file__).resolve().parents[2]


def _wait_for_runs(path: Path, runs: int, process: subprocess.Popen, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ended with {process.returncode}"
        try:
            if len(json.loads(path.read_text())["runs"]) >= runs:
                return
        except (OSError, ValueError, KeyError):
            pass  # not written yet
        time.sleep(0.1)
    raise AssertionError(f"no {runs} runs in {path} after {limit} s")


def _group_ends(group: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_with_jobs_stops_at_once_and_keeps_the_runs_that_ended(tmp_path):
    path = tmp_path / "planner.json"
    log = tmp_path / "output.txt"
    # forty seeds of our planner on Branin: more than a minute of work for two worker processes; in a session of its own, so that the worker processes of a run that fails here can be ended with it
    with log.open("w") as out:
        process = subprocess.Popen(
            [*CLOSEDLOOP, "bench", "planner", "-p", "branin", "--peer", "sobol", "--peer", "botorch", "--seeds", "40",
             "--jobs", "2", "--speed", "0", "--json", str(path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPOSITORY, start_new_session=True,
            # a suite started in the background (nohup, `&`) ignores SIGINT, and a child inherits that: this one
            # must take Ctrl-C as a person's terminal gives it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_runs(path, 1, process)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        # it had waited for every run submitted (the whole suite) before exiting, and kept none of them
        process.wait(timeout=10)
        assert time.monotonic() - interrupted < 10
        assert process.returncode == 130, log.read_text()
        # and its worker processes end with it, rather than going on with the suite
        assert _group_ends(process.pid, 5.0)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # every process of the session has ended
        process.wait()
    report = json.loads(path.read_text())
    assert report["finished"] is None and 1 <= len(report["runs"]) < 80
    assert all(r["status"] == "ok" for r in report["runs"])
    # and it says where they are and how to go on
    assert f"the runs that ended are in {path}: go on with --resume {path}" in " ".join(log.read_text().split())



def test_a_missing_peer_is_named_with_the_whole_install_command(tmp_path):
    from typer.testing import CliRunner

    from closedloop.bench import PEERS
    from closedloop.cli import app

    missing = [name for name, peer in PEERS.items() if peer.missing()]
    if not missing:
        pytest.skip("every peer is installed here")
    args = ["bench", "planner", "-p", "branin", "--peer", "sobol", "--seeds", "1", "--budget-scale", "0.1",
            "--speed", "0"]
    result = CliRunner().invoke(app, args + [a for name in missing for a in ("--peer", name)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # as one line, whatever the console's width
    # read as markup, the hint lost its extra: "pip install -c constraints.txt -e '.'"
    assert "-e '.')" not in output
    # once as it is left out, once with the tables
    assert output.count("pip install -c constraints.txt -e '.[bench]')") == 2 * len(missing), result.output
    # only missing peers: nothing can run, said so with exit 2 (it had exited 0 with no table and an empty report)
    result = CliRunner().invoke(app, args[:4] + ["--peer", missing[0], "--json", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "none of the planners chosen can run here" in result.output, result.output
    assert not (tmp_path / "none.json").exists()


def test_resume_from_a_file_that_is_no_report_or_into_itself_with_runs_left_out_is_refused(tmp_path):
    from typer.testing import CliRunner

    from closedloop.cli import app

    def bench(*args: str):
        return CliRunner().invoke(app, ["bench", "planner", "--peer", "sobol", "--seeds", "1", "--budget-scale", "0.1",
                                        "--speed", "0", *args])

    report = tmp_path / "planner.json"
    assert bench("-p", "branin", "--json", str(report)).exit_code == 0
    whole = report.read_text()
    # a copy cut short, another JSON file, a run without its keys: exit 2 saying so, not a bare JSONDecodeError
    broken = {"cut.json": whole[: len(whole) // 2], "list.json": "[1, 2]",
              "keys.json": '{"runs": [{"status": "ok", "problem": "branin"}]}'}
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
        result = bench("-p", "branin", "--resume", str(tmp_path / name), "--json", str(tmp_path / name))
        assert result.exit_code == 2, result.output
        assert f"--resume {tmp_path / name}" in " ".join(result.output.split())
        assert (tmp_path / name).read_text() == text
    # resumed into itself with another problem: its Branin run would have been dropped from the file
    result = bench("-p", "constrained", "--resume", str(report), "--json", str(report))
    assert result.exit_code == 2 and "would be lost" in result.output, result.output
    assert report.read_text() == whole
    # into another file it goes on, and into itself where every run is taken over or added
    assert bench("-p", "constrained", "--resume", str(report), "--json", str(tmp_path / "other.json")).exit_code == 0
    assert bench("-p", "branin", "-p", "constrained", "--resume", str(report), "--json", str(report)).exit_code == 0
    runs = json.loads(report.read_text())["runs"]
    assert sorted((r["problem"], "reused_from" in r) for r in runs) == [("branin", True), ("constrained", False)]


def test_output_files_are_checked_and_their_folders_made_before_a_benchmark_runs(tmp_path):
    from typer.testing import CliRunner

    from closedloop.cli import app

    planner = ["bench", "planner", "-p", "branin", "--peer", "sobol", "--seeds", "1", "--budget-scale", "0.1",
               "--speed", "0"]
    (tmp_path / "a-file").write_text("")
    # a path under a file, a folder: refused at once, where they had failed once the runs were done
    for option, path in (("--json", tmp_path / "a-file" / "planner.json"), ("--markdown", tmp_path)):
        result = CliRunner().invoke(app, [*planner, option, str(path)])
        assert result.exit_code == 2, result.output
        assert f"{option} {path}" in " ".join(result.output.split()) and "branin sobol seed 0" not in result.output
    # --output of the other benchmarks makes its folder, as --json and --markdown do (it failed at the end)
    output = tmp_path / "new" / "folder" / "library.json"
    result = CliRunner().invoke(app, ["bench", "library", "--rows", "200", "--columns", "2", "--results", "3",
                                      "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())
