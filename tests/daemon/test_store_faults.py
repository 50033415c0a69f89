"""The daemon's store under faults of its disk, with the daemon and a station as real subprocesses."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon.procs import (campaign_yaml, completed, free_port, kill9, ran, start_daemon, start_worker,
                                wait_for)


@pytest.mark.slow
def test_a_store_deleted_under_the_daemon_stops_it_and_a_restart_loses_nothing(tmp_path: Path) -> None:
    """``rm s.db*`` while the daemon ran: it stored and acknowledged the 50 results that followed into the deleted
    file, said 'results stored in s.db', exited 0, and there was no s.db (every result lost, the station's outbox
    emptied by the acknowledgements)."""
    experiments = 20
    (tmp_path / "c.yaml").write_text(campaign_yaml("gone", experiments, latency=0.1, concurrency=2))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    store = tmp_path / "s.db"
    daemon = start_daemon(tmp_path, endpoint, control)
    station = start_worker(tmp_path, endpoint, "st1")
    try:
        wait_for(lambda: completed(store) >= 5, 120, "5 experiments")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink()
        assert daemon.wait(timeout=60) == 1
        said = (tmp_path / "daemon.out").read_text()
        assert f"error: the store s.db was deleted or moved while in use: what it held is put back at {store}" in said
        assert "deleted or moved while in use" in (tmp_path / "daemon.log").read_text()

        daemon = start_daemon(tmp_path, endpoint, control, log_name="daemon2")
        assert daemon.wait(timeout=180) == 0, (tmp_path / "daemon2.out").read_text()[-3000:]
    finally:
        kill9(daemon)
        kill9(station)
    runs = ran(tmp_path / "st1.outbox")
    assert not [trial for trial, n in Counter(t for t, _ in runs).items() if n > 1], "a trial ran twice"
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        statuses = Counter(status for (status,) in db.execute("SELECT status FROM trial"))
        stored = {uid for (uid,) in db.execute("SELECT run_uid FROM observation")}
    assert statuses == {"completed": experiments}
    assert {uid for _, uid in runs} == stored, "a run measured and acknowledged is not in the store"
