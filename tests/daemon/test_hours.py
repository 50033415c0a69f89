"""A campaign's ``budget.hours`` is wall-clock time since the campaign started, across daemon restarts."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from closedloop.campaign import Campaign
from closedloop.daemon import Daemon
from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, serving, station


def test_a_restarted_daemon_keeps_the_campaigns_hours_from_its_start(tmp_path: Path) -> None:
    """Each daemon counted the hours from its own start: a campaign of `hours: 1`, restarted after 1.5 h (a
    crash, systemd's restart), ran on for another hour, while `closedloop status` said no time remained."""
    text = campaign_yaml("clock", 50, latency=0.05).replace("budget:\n", "budget:\n  hours: 1\n", 1)
    campaign = Campaign.from_yaml_text(text)
    assert campaign.budget.hours == 1
    store = Store(tmp_path / "s.db")
    store.open_campaign(campaign)
    started = datetime.now(timezone.utc) - timedelta(hours=1.5)  # as an earlier daemon left it
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("UPDATE campaign SET created_at = ?", (started.replace(tzinfo=None).isoformat(" "),))
    daemon = Daemon(store, [campaign], heartbeat_s=0.3)
    with station(daemon.endpoint, "station", tmp_path), serving(daemon) as thread:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the daemon ran on past the campaign's hours"
    assert store.trials(store.campaign_row("clock").id) == []
    store.close()
