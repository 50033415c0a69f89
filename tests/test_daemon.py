"""The daemon and station workers as separate processes on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.store import Store
from tests.conftest import BRANIN_YAML

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_daemon_and_worker_in_separate_processes_complete_a_campaign(tmp_path: Path, free_port: int) -> None:
    (tmp_path / "c.yaml").write_text(BRANIN_YAML.format(name="apart", experiments=8, initial=4, seed=1, noise=0.0,
                                                        backend="botorch"))
    endpoint = f"tcp://127.0.0.1:{free_port}"
    env_python = [sys.executable, "-m", "closedloop.cli"]
    daemon = subprocess.Popen([*env_python, "daemon", "c.yaml", "--bind", endpoint, "--store", "s.db"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen([*env_python, "worker", "--connect", endpoint, "--name", "station-a", "--outbox", "o.db"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = daemon.communicate(timeout=240)
    finally:
        worker.kill()
        daemon.kill()
    assert daemon.returncode == 0, out
    store = Store(tmp_path / "s.db")
    campaign_id = store.campaign_row("apart").id
    trials = store.trials(campaign_id)
    assert len(trials) == 8 and {t.status for t in trials} == {"completed"}
    assert {t.station for t in trials} == {"station-a"}
    assert len(store.observations(campaign_id)) == 8
