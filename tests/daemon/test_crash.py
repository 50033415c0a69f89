"""kill -9 of the daemon (three times) and of a station during a 100-experiment campaign on four stations."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, completed, free_port, kill9, ran, start_daemon, start_worker, wait_for

pytestmark = pytest.mark.slow


def test_campaign_survives_three_daemon_kills_and_a_station_kill(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    (tmp_path / "c.yaml").write_text(campaign_yaml("crash", 100, latency=0.25))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    store_path = tmp_path / "s.db"
    daemon = start_daemon(tmp_path, endpoint, control)
    names = ["station-1", "station-2", "station-3", "station-4"]
    workers = {name: start_worker(tmp_path, endpoint, name) for name in names}
    try:
        # kill the daemon at random points spread over the campaign; kill a station after the second
        for round_, (low, high) in enumerate([(8, 25), (35, 50), (60, 80)]):
            target = rng.randint(low, high)
            wait_for(lambda: completed(store_path) >= target, 120, f"{target} completed trials (seed {seed})")
            kill9(daemon)
            if round_ == 1:
                # a station dies mid-run; started again on its host, it delivers what its outbox holds (a result
                # measured while no daemon ran, or one the killed daemon had not stored), which a station of
                # another name may not: see test_worker's outbox tests
                kill9(workers["station-4"])
                workers["station-4"] = start_worker(tmp_path, endpoint, "station-4")
            daemon = start_daemon(tmp_path, endpoint, control)
        assert daemon.wait(timeout=150) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in [daemon, *workers.values()]:
            kill9(proc)

    store = Store(store_path)
    campaign_id = store.campaign_row("crash").id
    trials = store.trials(campaign_id)
    statuses = Counter(t.status for t in trials)
    assert statuses == {"completed": 100}, (statuses, seed)
    observations = store.observations(campaign_id)
    assert len(observations) == 100 and all("y" in o.values for o in observations.values())
    assert len({o.run_uid for o in observations.values()}) == 100

    # the stations' own evidence: every stored run was measured exactly once, by one station
    measured = [entry for name in ["station-1", "station-2", "station-3", "station-4"] for entry in
                ran(tmp_path / f"{name}.outbox")]
    by_trial = Counter(trial_id for trial_id, _ in measured)
    assert not [t for t, n in by_trial.items() if n > 1], f"trials measured twice (seed {seed})"
    stored = {(o.trial_id, o.run_uid) for o in observations.values()}
    assert stored <= set(measured), f"stored results no station measured (seed {seed})"
    # the daemon really was killed with trials in flight: a restart reconciled them
    assert "state=\"reconciling\"" in (tmp_path / "daemon.log").read_text()
