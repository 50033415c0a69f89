"""The SQLite store's file under faults of its disk: deleted, moved, corrupt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.errors import StoreError
from closedloop.store import Store
from tests.conftest import branin_campaign


def _store_with_one_result(path: Path) -> tuple[Store, int]:
    store = Store(path)
    cid = store.open_campaign(branin_campaign("disk"))
    trial = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {})])[0]
    assert store.record_result(trial.id, "run-1", {"y": 1.0})  # type: ignore[arg-type]
    return store, cid


def _statuses(path: Path, cid: int) -> list[str]:
    store = Store(path, read_only=True)
    try:
        return [t.status for t in store.trials(cid)]
    finally:
        store.close()


def test_a_store_deleted_while_open_refuses_to_write_and_puts_back_what_it_held(tmp_path: Path) -> None:
    """``rm s.db*`` under a daemon: it wrote on into the deleted file, acknowledged every result, said 'results
    stored in s.db', and when it ended there was no s.db (60 of 60 results lost in a probe)."""
    path = tmp_path / "s.db"
    store, cid = _store_with_one_result(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink()
    with pytest.raises(StoreError, match=r"s\.db was deleted or moved while in use.* put back"):
        store.add_trials(cid, [({"x1": 3.0, "x2": 4.0}, {})])
    with pytest.raises(StoreError, match="deleted or moved"):  # and every later write, not only the first
        store.record_failure(1, "late")
    store.close()
    assert _statuses(path, cid) == ["completed"]


def test_a_store_moved_while_open_refuses_to_write_and_saves_what_it_held_beside_it(tmp_path: Path) -> None:
    """``mv s.db elsewhere.db``: the -wal file stays behind under the old name, so the moved file lacks the commits
    not yet merged into it (here: all of them), and a restarted daemon began an empty s.db."""
    path = tmp_path / "s.db"
    store, cid = _store_with_one_result(path)
    os.rename(path, tmp_path / "elsewhere.db")
    with pytest.raises(StoreError, match=r"deleted or moved while in use.*saved in (\S+\.rescued-\S+\.db)") as caught:
        store.add_trials(cid, [({"x1": 3.0, "x2": 4.0}, {})])
    store.close()
    rescued = Path(str(caught.value).split("saved in ", 1)[1].split()[0].rstrip(":;,"))
    assert rescued.parent == tmp_path
    assert _statuses(rescued, cid) == ["completed"]
    assert not path.exists(), "nothing is written where the store was: its old -wal file is still there"


def test_results_and_finished_trials_read_no_orm_object_and_give_what_the_orm_rows_gave(tmp_path: Path) -> None:
    # Store.results built an ORM object of every trial and observation (12.8 s at 50,000 trials), and a daemon
    # starting read the finished trials that way twice over (34 s to answer health); the same, field for field
    from closedloop.store import TrialStatus
    from tests.reportdata import mixed_store, orm_rows_loaded

    store, _ = mixed_store(tmp_path / "s.db", n=16, fail=(3, 9))
    cid = store.campaign_row("mixed").id
    abandoned = store.add_trials(cid, [({**store.trials(cid)[0].parameters}, {"execution": "manual"})])[0]
    store.record_failure(abandoned.id, "gave up", status=TrialStatus.abandoned)  # type: ignore[arg-type]
    observations = store.observations(cid)
    finished = store.trials(cid, ["completed", "failed", "abandoned"])
    expected = [(t.parameters, observations[t.id].values if t.id in observations else None, t.index)
                for t in finished if t.status != "abandoned"]
    with orm_rows_loaded() as loaded:
        results = store.results(cid)
        facts = store.finished_trials(cid)
    assert loaded == []
    assert repr([(r.parameters, r.values, r.trial) for r in results]) == repr(expected)
    assert [(f.id, f.index, f.status, f.parameters, f.attempts, f.error, f.dispatched_at, f.finished_at)
            for f in facts] == [(t.id, t.index, t.status, t.parameters, t.attempts, t.error, t.dispatched_at,
                                 t.finished_at) for t in finished]
    assert [f.values for f in facts] == [observations[t.id].values if t.id in observations else None for t in finished]
    assert [f.execution for f in facts] == [t.planner.get("execution") for t in finished]
    assert facts[-1].execution == "manual" and sum(f.status == "failed" for f in facts) == 2


@pytest.mark.parametrize("url, says", [("mysql://lab/db", "the module MySQLdb it needs is not installed"),
                                       ("nosuchdb://lab/db", "SQLAlchemy knows no such database")])
def test_a_store_url_whose_database_cannot_be_spoken_is_named_with_what_is_missing(url: str, says: str) -> None:
    """Said as 'ModuleNotFoundError: No module named MySQLdb' and 'NoSuchModuleError: Can't load plugin'."""
    for open_store in (Store, lambda u: Store(u, read_only=True)):
        with pytest.raises(StoreError, match=f"cannot open the store {url}: {says}"):
            open_store(url)


# a result and its run's documents kept, between two markers on stdout, in a process of its own under strace
_KEEP_ONE = """
import sys
from closedloop.store import Store
from tests.conftest import branin_campaign
store = Store(sys.argv[1])
cid = store.open_campaign(branin_campaign("durable"))
trial = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {})])[0]
print("KEEPING", flush=True)
store.save_documents("run-1", '{"name":"start","doc":{"uid":"run-1"}}\\n')
store.record_result(trial.id, "run-1", {"y": 1.0})
print("KEPT", flush=True)
store.close()
"""


def test_a_result_and_its_documents_are_on_the_disk_when_the_store_returns(tmp_path: Path) -> None:
    """The daemon acknowledges a result once the store returns, and the station deletes its copy: the commit and
    the documents must then survive a power cut, not only a crash of the process. In WAL mode with
    synchronous=NORMAL the -wal was synced only at checkpoints, and the documents file never: a probe's 12
    acknowledged results were in no synced file."""
    path = tmp_path / "s.db"
    store = Store(path)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is needed to see the store's fsync calls")
    trace = tmp_path / "trace"
    kept = subprocess.run([strace, "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,write", "-o", str(trace),
                           sys.executable, "-c", _KEEP_ONE, str(tmp_path / "t.db")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    if kept.returncode != 0 and "ptrace" in kept.stderr:
        pytest.skip(f"strace cannot trace here: {kept.stderr.strip()[:200]}")
    assert kept.returncode == 0, kept.stderr
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "KEEPING" in line)
    end = next(i for i, line in enumerate(lines) if "KEPT" in line)
    synced = [line for line in lines[start:end] if "fsync(" in line or "fdatasync(" in line]
    assert any("t.db-wal>" in line for line in synced), synced
    assert any("run-1.partial>" in line for line in synced), synced
    assert any("t.db.documents>" in line for line in synced), synced
