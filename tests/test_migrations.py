"""Schema migrations (closedloop/migrations): fresh stores, stores from before migrations, concurrent starts.

Each test runs on SQLite and, when CLOSEDLOOP_TEST_POSTGRES_URL is set, on a fresh PostgreSQL database.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect, text
from sqlmodel import SQLModel

from closedloop.errors import StoreError
from closedloop.migrations import BASELINE, alembic_config, current_revision, head_revision, migrate
from closedloop.store import Store
from tests.conftest import branin_campaign
from tests.test_store_backends import postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield from postgres_database()


def test_the_migrations_alone_build_exactly_the_tables_the_models_describe(url: str) -> None:
    """Fails when a table changes in the models without a revision in closedloop/migrations/versions."""
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       SQLModel.metadata)
    engine.dispose()
    assert differences == [], ("the models differ from the migrations; add a revision "
                               "(python -m closedloop.migrations revision MESSAGE): " + repr(differences))


def test_a_fresh_store_is_created_and_stamped_at_the_newest_revision(url: str) -> None:
    Store(url).close()
    engine = create_engine(url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        assert {"campaign", "trial", "observation"} <= set(inspect(connection).get_table_names())
    assert migrate(engine) == "up to date"
    engine.dispose()


def _insert_campaign(connection: Any, campaign: Any) -> None:
    """``campaign``'s row as every revision of the tables has it (SQL, not the models: they describe the newest)."""
    connection.execute(text("INSERT INTO campaign (name, spec_yaml, spec_hash, status, created_at) "
                            "VALUES (:n, :y, :h, 'running', CURRENT_TIMESTAMP)"),
                       {"n": campaign.name, "y": campaign.to_yaml(), "h": campaign.spec_hash})


def _first_release_store(url: str) -> None:
    """A store as the first release wrote it: the baseline tables, no alembic_version, one campaign."""
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
        campaign = branin_campaign("from-release-1")
        _insert_campaign(connection, campaign)
        cid = connection.execute(text("SELECT id FROM campaign")).scalar_one()
        for index, (x1, y) in enumerate([(1.0, 12.5), (2.0, 7.25)], start=1):
            connection.execute(text('INSERT INTO trial (campaign_id, "index", parameters, status, attempts, planner, '
                                    "proposed_at) VALUES (:c, :i, :p, 'completed', 1, '{}', CURRENT_TIMESTAMP)"),
                               {"c": cid, "i": index, "p": json.dumps({"x1": x1, "x2": 3.0})})
            tid = connection.execute(text('SELECT id FROM trial WHERE "index" = :i'), {"i": index}).scalar_one()
            connection.execute(text('INSERT INTO observation (trial_id, run_uid, "values", received_at) '
                                    "VALUES (:t, :u, :v, CURRENT_TIMESTAMP)"),
                               {"t": tid, "u": f"run-{index}", "v": json.dumps({"y": y})})
        assert "provenance" not in inspect(connection).get_table_names()
    engine.dispose()


def test_a_store_from_before_migrations_is_upgraded_without_losing_its_campaign(url: str) -> None:
    _first_release_store(url)
    store = Store(url)
    cid = store.campaign_row("from-release-1").id
    assert store.campaign("from-release-1") == branin_campaign("from-release-1")
    assert [(r.trial, r.parameters["x1"], r.values) for r in store.results(cid)] == [(1, 1.0, {"y": 12.5}),
                                                                                     (2, 2.0, {"y": 7.25})]
    # and the upgraded store keeps working: new trials continue the numbering
    # the run of each completed trial is its only known attempt's
    assert [t.run_uids for t in store.trials(cid)] == [["run-1"], ["run-2"]]
    (row,) = store.add_trials(cid, [({"x1": 3.0, "x2": 3.0}, {})])
    assert row.index == 3 and store.trial(row.id).run_uids == []
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        assert "provenance" in inspect(connection).get_table_names()
    store.close()


def test_daemons_starting_together_on_a_fresh_store_migrate_it_once(url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            Store(url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    engine.dispose()


def test_python_dash_m_closedloop_migrations_runs_the_revision_command() -> None:
    """docs/scaling.md drafts a revision with ``python -m closedloop.migrations revision MESSAGE``; a package needs
    a ``__main__`` module for ``-m`` (the ``if __name__ == "__main__"`` of its ``__init__`` never runs): it said
    "No module named closedloop.migrations.__main__". Without a message it prints its usage and exits 2."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "closedloop.migrations"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "python -m closedloop.migrations revision MESSAGE" in done.stdout


def _store_of_a_newer_release(url: str) -> None:
    """A store a later closedloop wrote: this release's schema, stamped with a revision this release does not ship."""
    Store(url).close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_store_of_a_newer_release_is_refused_in_one_line_and_left_as_it_was(url: str, read_only: bool) -> None:
    """A lab that upgrades one host and then runs an older closedloop on the store: 'closedloop run' said
    "CommandError: Can't locate revision identified by '9999' (run with --debug for the traceback)", and status/show
    said it 'was written by an older closedloop' and to open it 'with closedloop where it can be written'."""
    _store_of_a_newer_release(url)
    with pytest.raises(StoreError) as refused:
        Store(url, read_only=read_only)
    message = str(refused.value)
    assert "\n" not in message
    assert "newer closedloop" in message and "9999" in message and head_revision() in message, message
    assert "older" not in message
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["9999"]
    engine.dispose()


def test_a_store_of_0006_gets_the_index_by_campaign_and_status_and_keeps_its_trials(tmp_path: Path) -> None:
    """Counting a campaign's trials per status (every dashboard poll; a daemon once a second) and finding the ones
    waiting read every trial of the campaign: EXPLAIN QUERY PLAN said 'SEARCH trial USING INDEX
    ix_trial_campaign_id (campaign_id=?)', then each row from the table."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine(url)
    campaign = branin_campaign("from-0006")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0006")
        _insert_campaign(connection, campaign)
        for index, status in enumerate(["completed", "failed", "proposed"], start=1):
            connection.execute(text('INSERT INTO trial (campaign_id, "index", parameters, status, attempts, planner, '
                                    "proposed_at) VALUES (1, :i, '{}', :s, 1, '{}', CURRENT_TIMESTAMP)"),
                               {"i": index, "s": status})
    engine.dispose()
    store = Store(url)
    assert store.counts(store.campaign_row("from-0006").id) == {"completed": 1, "failed": 1, "proposed": 1}
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        plans = [" ".join(str(part) for part in row) for query in (
            "SELECT status, count(*) FROM trial WHERE campaign_id = 1 GROUP BY status",
            "SELECT count(*) FROM trial WHERE campaign_id = 1 AND status IN ('completed', 'failed')")
            for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + query)]
        assert all("COVERING INDEX ix_trial_campaign_status" in plan for plan in plans), plans
    # the trials of some statuses (the daemon's look for those waiting, every second) come from the index too
    statements: list[tuple[str, Any]] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append((args[2], args[3])))
    assert [t.index for t in store.trials(1, ["proposed", "failed"])] == [2, 3]
    with store.engine.connect() as connection:
        plan = str(connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statements[-1][0], statements[-1][1]).all())
    assert "ix_trial_campaign_status" in plan, plan
    store.close()


def test_a_store_of_0007_gets_the_source_evidence_columns_and_its_decisions_are_still_explained(tmp_path: Path) -> None:
    """Migration 0008 adds the evidence of a multi-fidelity decision for its source to the provenance table: a store
    from before it opens, and a decision recorded there is explained as before, with no source evidence."""
    from closedloop import provenance

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine(url)
    campaign = branin_campaign("from-0007")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0007")
        _insert_campaign(connection, campaign)
        connection.execute(text('INSERT INTO trial (campaign_id, "index", parameters, status, attempts, planner, '
                                "proposed_at) VALUES (1, 1, :p, 'proposed', 0, '{}', CURRENT_TIMESTAMP)"),
                           {"p": json.dumps({"x1": 1.0, "x2": 3.0})})
        connection.execute(text("INSERT INTO provenance (trial_id, campaign_id, backend, versions, generator, batch_size, "
                                "batch_position, observed, failed, pending, pending_parameters, proposed_parameters) "
                                "VALUES (1, 1, 'sobol', '{}', 'sobol', 1, 0, '[]', '[]', '[]', '[]', :p)"),
                           {"p": json.dumps({"x1": 1.0, "x2": 3.0})})
    engine.dispose()
    store = Store(url)
    try:
        with store.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
        record = provenance.provenance(store, "from-0007", 1)
        assert record is not None and record.generator == "sobol"
        assert record.source_std is None and record.source_threshold is None
        lines = provenance.explain_lines(provenance.explain(store, "from-0007", 1))
        assert any("generator sobol" in line for line in lines) and not any("source:" in line for line in lines)
        (row,) = store.add_trials(store.campaign_row("from-0007").id, [({"x1": 2.0, "x2": 3.0}, {})])
        assert row.index == 2  # and the store goes on taking trials
    finally:
        store.close()
