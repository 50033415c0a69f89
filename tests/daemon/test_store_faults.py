"""The daemon's store under faults of its disk, with the daemon and a station as real subprocesses."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon.procs import (campaign_yaml, completed, free_port, kill9, ran, start_daemon, start_worker,
                                wait_for)
from tests.disks import fill, small_tmpfs


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


@pytest.mark.slow
def test_documents_on_a_full_disk_stop_the_daemon_saying_where_and_a_restart_loses_nothing(tmp_path: Path) -> None:
    """The folder of a store's run documents on a full disk: the daemon stopped with 'error: OSError: [Errno 28] No
    space left on device', naming no file and saying nothing of what to do, and left an empty .partial file."""
    import subprocess

    experiments = 4
    (tmp_path / "c.yaml").write_text(campaign_yaml("docs", experiments, latency=0.05, concurrency=1))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    documents = tmp_path / "s.db.documents"
    small_tmpfs(documents)
    fill(documents)
    try:
        daemon = start_daemon(tmp_path, endpoint, control)
        station = start_worker(tmp_path, endpoint, "st1")
        try:
            assert daemon.wait(timeout=120) == 1
        finally:
            kill9(daemon)
        said = (tmp_path / "daemon.out").read_text()
        errors = [line for line in said.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in said, said
        assert f"{documents}" in errors[0] and "No space left on device" in errors[0], errors[0]
        assert "nothing unstored was acknowledged" in errors[0] and "start the daemon again" in errors[0], errors[0]
        assert sorted(p.name for p in documents.iterdir()) == ["filler"]
        # stored, then its documents failed: not acknowledged, so the station sends it again after the restart
        assert completed(tmp_path / "s.db") == 1
    finally:
        subprocess.run(["umount", str(documents)], check=True)
    try:
        daemon = start_daemon(tmp_path, endpoint, control)
        wait_for(lambda: completed(tmp_path / "s.db") == experiments, 120, "the campaign")
        assert daemon.wait(timeout=60) == 0
    finally:
        kill9(daemon)
        kill9(station)
    runs = ran(tmp_path / "st1.outbox")
    assert len(runs) == experiments and len({trial for trial, _ in runs}) == experiments  # none run twice
    assert len(list(documents.glob("*.jsonl"))) == experiments
