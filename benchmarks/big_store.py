"""What every path a scientist uses costs on a campaign of tens of thousands of trials.

Builds a store with one Sobol campaign of N trials (most completed, with observations and provenance rows; a few
failed, dispatched and held) by SQL Core bulk inserts, then runs each command as a scientist would, in its own
process under ``/usr/bin/time -v``, and prints per path: seconds, peak RSS and the size of what it wrote::

    .venv/bin/python benchmarks/big_store.py                     # N = 5000 20000 50000
    .venv/bin/python benchmarks/big_store.py 100000 --only status show export
    .venv/bin/python benchmarks/big_store.py 50000 --keep /tmp/big   # keep the store to look at it

The paths: ``status``, ``list``, ``show`` (the campaign, and one trial), ``explain --json``, ``export`` (CSV and
JSON), ``report``, ``replay --until`` (the last trial), the Python API (``trial_records``, ``Store.results``,
``best``), the dashboard (``GET /`` and ``/api/state`` cold and warm, ``/api/trial``) and the daemon's start-up
on the store (until its control socket answers ``health``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from closedloop.campaign import Campaign  # noqa: E402
from closedloop.provenance import ProvenanceRow  # noqa: E402
from closedloop.store import ObservationRow, Store, TrialRow, TrialStatus  # noqa: E402

BIN = Path(sys.executable).parent
OPEN, HELD = 4, 2
FAILED_EVERY = 50
NAME = "big"


def campaign_yaml(budget: int) -> str:
    return f"""
name: {NAME}
parameters:
  x1: {{type: continuous, bounds: [-5, 10]}}
  x2: {{type: continuous, bounds: [0, 15]}}
objectives:
  y: {{goal: minimize}}
budget: {{experiments: {budget}}}
planner: {{backend: sobol, seed: 1}}
instrument: {{simulator: "simulators.surfaces:Branin"}}
"""


def build(path: Path, n: int) -> Path:
    """A store of one Sobol campaign of ``n`` trials; the campaign file beside it (budget ``n`` + 10)."""
    text = campaign_yaml(n + 10)
    spec_file = path.with_suffix(".yaml")
    spec_file.write_text(text)
    store = Store(path)
    campaign_id = store.open_campaign(Campaign.from_yaml_text(text, check_instrument=False))
    rng = random.Random(0)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    trials, observations, decisions = [], [], []
    for index in range(1, n + 1):
        parameters = {"x1": rng.uniform(-5, 10), "x2": rng.uniform(0, 15)}
        at = start + timedelta(seconds=10 * index)
        status = (TrialStatus.held if index > n - HELD else TrialStatus.dispatched if index > n - HELD - OPEN
                  else TrialStatus.failed if index % FAILED_EVERY == 0 else TrialStatus.completed).value
        finished = status in (TrialStatus.completed.value, TrialStatus.failed.value)
        uid = f"run-{index}"
        trials.append({"id": index, "campaign_id": campaign_id, "index": index, "parameters": parameters,
                       "status": status, "station": None if status == "held" else "station-a",
                       "attempts": 0 if status == "held" else 1, "planner": {"generator": "sobol"},
                       "error": "device fault" if status == "failed" else None, "proposed_at": at,
                       "dispatched_at": None if status == "held" else at,
                       "finished_at": at + timedelta(seconds=5) if finished else None,
                       "run_uids": [uid] if finished else []})
        if status == TrialStatus.completed.value:
            observations.append({"trial_id": index, "run_uid": uid, "values": {"y": rng.gauss(50, 20)}, "noise": None,
                                 "duration_s": 5.0, "received_at": at + timedelta(seconds=5)})
        decisions.append(ProvenanceRow(trial_id=index, campaign_id=campaign_id, backend="sobol", generator="sobol",
                                       seed=1, observed=[[1, index - 1]] if index > 1 else [],
                                       proposed_parameters=parameters, decided_at=at).model_dump())
    with store.engine.begin() as connection:
        for table, rows in ((TrialRow, trials), (ObservationRow, observations), (ProvenanceRow, decisions)):
            connection.execute(table.__table__.insert(), rows)  # type: ignore[attr-defined]
    store.close()
    return spec_file


def timed(command: list[str], cwd: Path, output: Path | None = None) -> dict[str, Any]:
    """Seconds, peak RSS and output size of one command run under ``/usr/bin/time -v``."""
    stdout = cwd / "stdout.txt"
    with stdout.open("wb") as sink:
        done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, stdout=sink, stderr=subprocess.PIPE)
    report = done.stderr.decode(errors="replace")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))  # type: ignore[union-attr]
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", report).group(1)  # type: ignore[union-attr]
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    written = output if output is not None else stdout
    size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) if written.is_dir() else (
        written.stat().st_size if written.exists() else 0)
    if done.returncode not in (0, 1):
        print(report[-2000:], file=sys.stderr)
    return {"seconds": round(seconds, 2), "rss_mb": round(rss / 1024), "output_kb": round(size / 1024), "rc": done.returncode}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(store: Path, n: int) -> str:
    return f"""
import resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
from closedloop import Store, best, trial_records
store = Store({str(store)!r}, read_only=True)
times = {{}}
for label, call in (("trial_records", lambda: trial_records(store, {NAME!r})),
                    ("Store.results", lambda: store.results(store.campaign_row({NAME!r}).id)),
                    ("best", lambda: best(store, {NAME!r}))):
    began = time.perf_counter(); call(); times[label] = round(time.perf_counter() - began, 2)
print(times)
"""


def dashboard(store: Path, cwd: Path, n: int) -> list[tuple[str, dict[str, Any]]]:
    import psutil

    port = free_port()
    process = subprocess.Popen([str(BIN / "closedloop"), "dashboard", "--store", str(store), "--port", str(port),
                                "--control", "", "--events", ""], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    rows = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(base + "/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        watched = psutil.Process(process.pid)
        for label, path in (("dashboard GET /", "/"), ("dashboard /api/state (first)", "/api/state"),
                            ("dashboard /api/state (again)", "/api/state"),
                            ("dashboard /api/trial", f"/api/trial?campaign={NAME}&trial={n // 2}")):
            began = time.perf_counter()
            with urllib.request.urlopen(base + path, timeout=600) as reply:
                body = reply.read()
            rows.append((label, {"seconds": round(time.perf_counter() - began, 2),
                                 "rss_mb": round(watched.memory_info().rss / 2**20), "output_kb": round(len(body) / 1024)}))
    finally:
        process.terminate()
        process.wait(30)
    return rows


def daemon(spec_file: Path, store: Path, cwd: Path) -> dict[str, Any]:
    """Seconds from the daemon's start until its control socket answers health, and its peak RSS."""
    copy = cwd / "daemon.db"
    shutil.copy(store, copy)
    bind, publish, control = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    began = time.perf_counter()
    process = subprocess.Popen(["/usr/bin/time", "-v", str(BIN / "closedloop"), "daemon", str(spec_file), "--store", str(copy),
                                "--bind", bind, "--publish", publish, "--control", control], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = None
    while process.poll() is None and time.perf_counter() - began < 600:
        check = subprocess.run([str(BIN / "closedloop"), "health", "--control", control, "--timeout", "1"],
                               capture_output=True)
        if check.returncode == 0:
            seconds = time.perf_counter() - began
            break
    import psutil

    for child in psutil.Process(process.pid).children():
        child.terminate()
    _, err = process.communicate(timeout=120)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err.decode()).group(1))  # type: ignore[union-attr]
    return {"seconds": round(seconds, 2) if seconds else None, "rss_mb": round(rss / 1024), "output_kb": 0, "rc": 0}


def one(n: int, only: set[str] | None, keep: Path | None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="big-store-")) if keep is None else keep
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / f"{NAME}.db"
    for stale in folder.glob(f"{NAME}.db*"):
        stale.unlink() if stale.is_file() else shutil.rmtree(stale)
    began = time.perf_counter()
    spec_file = build(store, n)
    print(f"## {n} trials: store built in {time.perf_counter() - began:.1f} s, "
          f"{store.stat().st_size / 2**20:.1f} MB", flush=True)
    cl = str(BIN / "closedloop")
    s = ["--store", str(store)]
    paths: list[tuple[str, list[str], Path | None]] = [
        ("status", [cl, "status", NAME, *s, "--control", ""], None),
        ("list", [cl, "list", *s], None),
        ("show", [cl, "show", NAME, *s], None),
        ("show TRIAL", [cl, "show", NAME, str(n // 2), *s], None),
        ("explain --json", [cl, "explain", NAME, str(n // 2), *s, "--json"], None),
        ("export csv", [cl, "export", NAME, *s, "-o", str(folder / "out.csv")], folder / "out.csv"),
        ("export json", [cl, "export", NAME, *s, "-f", "json", "-o", str(folder / "out.json")], folder / "out.json"),
        ("report", [cl, "report", NAME, *s, "-o", str(folder / "report" / "report.html")], folder / "report"),
        ("replay --until", [cl, "replay", NAME, *s, "--until", str(n - OPEN - HELD - 1)], None),
        ("python API", [sys.executable, "-c", api(store, n)], None),
    ]
    for label, command, output in paths:
        if only and label.split()[0] not in only:
            continue
        if output is not None and output.is_dir():
            shutil.rmtree(output)
        row = timed(command, folder, output)
        extra = (folder / "stdout.txt").read_text()[:200].strip() if label == "python API" else ""
        print(f"| {n} | {label} | {row['seconds']} | {row['rss_mb']} | {row['output_kb']} | rc {row['rc']} {extra}",
              flush=True)
    if not only or "dashboard" in only:
        for label, row in dashboard(store, folder, n):
            print(f"| {n} | {label} | {row['seconds']} | {row['rss_mb']} | {row['output_kb']} |", flush=True)
    if not only or "daemon" in only:
        row = daemon(spec_file, store, folder)
        print(f"| {n} | daemon start-up (health answers) | {row['seconds']} | {row['rss_mb']} | - |", flush=True)
    if keep is None:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="*", type=int, default=[5000, 20000, 50000], help="trials in the campaign")
    parser.add_argument("--only", nargs="*", help="paths to time (first word: status list show explain export "
                        "report replay python dashboard daemon)")
    parser.add_argument("--keep", type=Path, help="build the store in this folder and keep it")
    args = parser.parse_args()
    os.environ.setdefault("COLUMNS", "200")
    print("| trials | path | seconds | peak RSS MB | output KB |\n|---|---|---|---|---|", flush=True)
    for n in args.n:
        one(n, set(args.only) if args.only else None, args.keep)


if __name__ == "__main__":
    main()
