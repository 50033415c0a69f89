"""Days of unattended running, compressed: a daemon and station workers as real ``closedloop`` subprocesses on a
fast simulated Branin campaign, sampled every ``--every`` experiments for what could grow without bound: each
process's RSS, open file descriptors and threads, and the store, its -wal file, the documents folder, each
station's outbox and the log files. Prints the table and the growth per 1000 experiments (from the
sample at ``--every`` to the last)::

    .venv/bin/python benchmarks/soak.py --experiments 3000                       # sobol: the loop alone
    .venv/bin/python benchmarks/soak.py --experiments 300 --every 50 --backend botorch
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemon.procs import CLI, campaign_yaml, env, free_port  # noqa: E402


def proc_stats(pid: int) -> tuple[float, int, int]:
    """RSS in MB, open file descriptors, threads of a live process (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir())), int(fields["Threads"])


def size_kb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024
    return path.stat().st_size / 1024 if path.exists() else 0.0


def completed(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM trial WHERE status IN ('completed', 'failed')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--stations", type=int, default=2)
    ap.add_argument("--backend", default="sobol")
    args = ap.parse_args()
    cwd = Path(tempfile.mkdtemp(prefix="soak-"))
    (cwd / "c.yaml").write_text(campaign_yaml("soak", args.experiments, latency=0.0, backend=args.backend,
                                              concurrency=4))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    out = (cwd / "procs.out").open("a")
    run = dict(cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env())
    procs = {"daemon": subprocess.Popen([*CLI, "daemon", "c.yaml", "--bind", endpoint, "--store", "s.db", "--publish",
                                         "", "--control", control, "--drain", "5", "--logfile", "daemon.log"], **run)}
    for k in range(1, args.stations + 1):
        procs[f"st{k}"] = subprocess.Popen([*CLI, "worker", "--connect", endpoint, "--name", f"st{k}", "--outbox",
                                            f"st{k}.outbox", "--logfile", f"st{k}.log"], **run)
    files = {"store": cwd / "s.db", "wal": cwd / "s.db-wal", "docs": cwd / "s.db.documents",
             "logs": cwd / "daemon.log", **{f"{n}.outbox": cwd / f"{n}.outbox" for n in procs if n != "daemon"}}
    cols = ["done", "s"] + [f"{n} {c}" for n in procs for c in ("MB", "fd", "thr")] + [f"{f} KB" for f in files]
    rows: list[list[float]] = []
    started = time.monotonic()
    try:
        for target in [1, *range(args.every, args.experiments, args.every)]:  # the end is no steady state
            while (done := completed(files["store"])) < target and procs["daemon"].poll() is None:
                time.sleep(0.2)
            if procs["daemon"].poll() is not None:
                break  # the daemon left (finished or failed): procs.out says why
            stats = [v for p in procs.values() for v in proc_stats(p.pid)]
            logs = sum(size_kb(p) for p in cwd.glob("*.log*"))
            sizes = [size_kb(p) if f != "logs" else logs for f, p in files.items()]
            rows.append([done, time.monotonic() - started, *stats, *sizes])
            print("  ".join(f"{c}={v:.0f}" for c, v in zip(cols, rows[-1])), flush=True)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
    first, last = rows[min(1, len(rows) - 1)], rows[-1]  # from --every on: the first sample is start-up
    per_k = [(b - a) * 1000 / max(last[0] - first[0], 1) for a, b in zip(first, last)]
    print(f"\n{args.experiments} experiments, backend {args.backend}, {args.stations} stations, in {cwd}\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.1f}" if "MB" in c or c == "s" else f"{v:.0f}" for c, v in zip(cols, r)) + " |")
    print("| per 1000 | " + " | ".join(f"{v:+.1f}" for v in per_k[1:]) + " |")


if __name__ == "__main__":
    main()
