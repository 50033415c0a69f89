"""The live dashboard: its JSON, its event stream and its controls against a real daemon, then a real browser."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request
from closedloop.dashboard import DashboardConfig, DashboardServer
from closedloop.store import Store, TrialStatus
from closedloop.worker import StationWorker
from simulators.surfaces import branin_campaign

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CLOSEDLOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def dashboard_campaign(name: str, exposure: float, approve: bool) -> str:
    # in approval mode a person decides on as many proposals as may run at once: two, for the tests' two at a time
    return branin_campaign(name, 400, execution={"approve": approve, **({"concurrency": 2} if approve else {})},
                           options={"noise": 0.01, "seed": 0, "exposure": exposure})


@dataclass
class Loop:
    """A daemon (PUB and control sockets), one simulated station, and the store they write."""

    daemon: Daemon
    store: Store
    name: str
    path: Path

    def dispatched(self) -> int:
        campaign_id = self.store.campaign_row(self.name).id
        return sum(1 for t in self.store.trials(campaign_id) if t.dispatched_at is not None)


@contextmanager
def _running(path: Path, approve: bool = False) -> Iterator[Loop]:
    store = Store(path)
    campaign = Campaign.from_yaml_text(dashboard_campaign("dash", 0.15, approve))
    daemon = Daemon(store, [campaign], publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", heartbeat_s=0.5)
    stop = threading.Event()
    worker = StationWorker(daemon.endpoint, name="station-a", heartbeat_s=0.5)
    threads = [threading.Thread(target=daemon.serve, args=(stop.is_set,), daemon=True),
               threading.Thread(target=worker.run, args=(stop,), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield Loop(daemon, store, campaign.name, path)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        daemon.close()
        store.close()


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    """A daemon (PUB and control sockets) running a Sobol campaign on one simulated station (0.15 s a run)."""
    with _running(tmp_path / "dash.db") as running:
        yield running


def _server(loop: Loop, **options: object) -> DashboardServer:
    config = DashboardConfig(store=str(loop.path), control=loop.daemon.control_endpoint,
                             events=loop.daemon.publish_endpoint, port=0, **options)  # type: ignore[arg-type]
    return DashboardServer(config).start()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_state_events_and_controls(loop: Loop) -> None:
    server = _server(loop)
    base = f"http://127.0.0.1:{server.port}/"
    try:
        _wait(lambda: loop.dispatched() >= 3, 30, "three experiments")
        status, state = _get(base + "api/state")
        assert status == 200 and state["read_only"] is False
        campaign = state["campaigns"][0]
        assert campaign["name"] == "dash" and campaign["live"]["paused"] is False
        assert [s["name"] for s in state["daemon"]["stations"]] == ["station-a"]
        assert campaign["series"] and all(p["best"] <= p["value"] for p in campaign["series"])
        assert any(t["generator"] == "sobol" for t in campaign["trials"])

        # the event stream carries the daemon's PUB events as they happen
        with urllib.request.urlopen(base + "events", timeout=20) as stream:
            kinds = []
            while len(kinds) < 3:
                line = stream.readline().decode()
                if line.startswith("data: "):
                    kinds.append(json.loads(line[6:])["kind"])
        assert {"trial_dispatched", "trial_completed", "trial_started", "trial_proposed"} & set(kinds)

        status, reply = _post(base + "api/control", {"method": "pause", "campaign": "dash"})
        assert status == 200 and reply["success"], reply
        assert control_request(loop.daemon.control_endpoint, "status")["campaigns"][0]["paused"] is True
        status, reply = _post(base + "api/control", {"method": "resume", "campaign": "dash"})
        assert status == 200 and reply["success"]
        status, reply = _post(base + "api/control", {"method": "pause", "campaign": "nope"})
        assert status == 409 and "not run by this daemon" in reply["msg"]

        status, info = _get(base + "api/trial?campaign=dash&trial=1")
        assert status == 200 and info["provenance"]["backend"] == "sobol" and info["lines"]

        _wait(lambda: loop.dispatched() >= 6, 30, "six experiments")
        status, view = _get(base + "api/model?campaign=dash&parameter=x2")
        assert status == 200 and view["available"], view
        assert view["parameter"] == "x2" and len(view["x"]) == len(view["mean"]) == len(view["std"])
        assert all(s >= 0 for s in view["std"]) and view["x"][0] == 0 and view["x"][-1] == 15
        status, plane = _get(base + "api/model?campaign=dash&parameter=x1&second=x2")
        assert status == 200 and plane["second"] == "x2"
        assert len(plane["grid"]) == len(plane["grid_y"]) and len(plane["grid"][0]) == len(plane["grid_x"])
    finally:
        server.stop()


def _first_events(url: str, count: int) -> list[dict]:
    """The first ``count`` events (``data:``) or infos (``event: info``) of the page's event stream."""
    out: list[dict] = []
    with urllib.request.urlopen(url, timeout=20) as stream:
        while len(out) < count:
            line = stream.readline().decode()
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_the_events_of_a_daemon_with_keys_reach_a_dashboard_holding_an_allowed_key(tmp_path: Path) -> None:
    """A daemon with keys publishes to CURVE subscribers alone: a dashboard subscribing without keys heard nothing,
    for good, while the docs said it needs a key pair, which it could not be given. With ``keys`` it hears the
    events; without, it says why it polls the store."""
    from closedloop.keys import ClientKeys, ServerKeys, new_keypair

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("daemon", "station-a", "dashboard"):
        new_keypair(keys, name)
    allowed.mkdir()
    for name in ("station-a", "dashboard"):
        shutil.copy(keys / f"{name}.key", allowed / f"{name}.key")
    store = Store(tmp_path / "keyed.db")
    campaign = Campaign.from_yaml_text(dashboard_campaign("dash", 0.15, False))
    daemon = Daemon(store, [campaign], publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", heartbeat_s=0.5,
                    keys=ServerKeys(keys / "daemon.key_secret", allowed))
    stop = threading.Event()
    worker = StationWorker(daemon.endpoint, name="station-a", heartbeat_s=0.5,
                           keys=ClientKeys(keys / "station-a.key_secret", keys / "daemon.key"))
    threads = [threading.Thread(target=daemon.serve, args=(stop.is_set,), daemon=True),
               threading.Thread(target=worker.run, args=(stop,), daemon=True)]
    for thread in threads:
        thread.start()
    servers = [DashboardServer(DashboardConfig(store=str(tmp_path / "keyed.db"), control=daemon.control_endpoint,
                                               events=daemon.publish_endpoint, port=0, keys=pair)).start()
               for pair in (ClientKeys(keys / "dashboard.key_secret", keys / "daemon.key"), None)]
    try:
        heard = _first_events(f"http://127.0.0.1:{servers[0].port}/events", 3)
        assert {e["kind"] for e in heard} & {"trial_dispatched", "trial_started", "trial_completed", "trial_proposed"}
        (info,) = _first_events(f"http://127.0.0.1:{servers[1].port}/events", 1)
        assert "need a key pair" in info["msg"] and "polling the store" in info["msg"]
    finally:
        for server in servers:
            server.stop()
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        daemon.close()
        store.close()


def test_read_only_and_token(loop: Loop) -> None:
    assert not DashboardConfig(store="x", host="0.0.0.0", token="s3cret").effective_read_only
    server = _server(loop, host="0.0.0.0")  # beyond loopback without a token: read-only by default
    try:
        for method in ("pause", "resume", "stop", "approve", "reject"):
            status, reply = _post(f"http://127.0.0.1:{server.port}/api/control",
                                  {"method": method, "campaign": "dash", "trial": 1})
            assert status == 403 and "beyond loopback, without a token" in reply["msg"], reply
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[1]["read_only"] is True
        live = control_request(loop.daemon.control_endpoint, "status")
        assert live["campaigns"][0]["paused"] is False and live["stopping"] is False
    finally:
        server.stop()
    server = _server(loop, read_only=True)
    try:
        status, reply = _post(f"http://127.0.0.1:{server.port}/api/control", {"method": "pause"})
        assert status == 403 and "read-only" in reply["msg"]
        assert control_request(loop.daemon.control_endpoint, "status")["campaigns"][0]["paused"] is False
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[1]["read_only"] is True
    finally:
        server.stop()
    server = _server(loop)
    try:
        base = f"http://127.0.0.1:{server.port}/"
        status, reply = _post(base + "api/control", {"method": "pause"}, {"Origin": "http://evil.example"})
        assert status == 403 and "evil.example" in reply["msg"]
        request = urllib.request.Request(base + "api/control", data=b'{"method": "pause"}', method="POST",
                                         headers={"Content-Type": "text/plain"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 415
        assert _get(base + "api/state", {"Host": "rebound.example:80"})[0] == 403
        assert control_request(loop.daemon.control_endpoint, "status")["campaigns"][0]["paused"] is False
    finally:
        server.stop()
    server = _server(loop, token="s3cret")
    try:
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 401
        status, state = _get(f"http://127.0.0.1:{server.port}/api/state", {"X-Closedloop-Token": "s3cret"})
        assert status == 200 and state["campaigns"][0]["name"] == "dash"
    finally:
        server.stop()


def test_held_proposals_are_approved_edited_and_rejected(tmp_path: Path) -> None:
    """Approval mode: the page's approve (with an edit) and reject go to the daemon's control socket, as the
    command line's do; read-only, they are refused and nothing changes."""
    with _running(tmp_path / "held.db", approve=True) as held_loop:
        server = _server(held_loop)
        base = f"http://127.0.0.1:{server.port}/"
        try:
            def held() -> list[dict]:
                return _get(base + "api/state")[1]["campaigns"][0]["held"]

            _wait(lambda: len(held()) >= 2, 20, "two held proposals")
            first, second = held()[:2]
            read_only = _server(held_loop, read_only=True)
            try:
                for body in ({"method": "approve", "campaign": "dash", "trial": first["trial"]},
                             {"method": "edit", "campaign": "dash", "trial": first["trial"], "parameters": {"x1": 1}},
                             {"method": "reject", "campaign": "dash", "trial": second["trial"]}):
                    status, reply = _post(f"http://127.0.0.1:{read_only.port}/api/control", body)
                    assert status == 403 and "read-only" in reply["msg"], reply
            finally:
                read_only.stop()
            status, reply = _post(base + "api/control", {"method": "approve", "campaign": "dash",
                                                         "trial": first["trial"], "parameters": {"x1": "99"}})
            assert status == 409 and f"trial #{first['trial']}: x1=99 is outside the bounds [-5, 10]" in reply["msg"]
            assert [t["trial"] for t in held()[:2]] == [first["trial"], second["trial"]]  # refused: nothing changed
            status, reply = _post(base + "api/control", {"method": "approve", "campaign": "dash",
                                                         "trial": first["trial"], "parameters": {"x1": "1.25"}, "by": "ada"})
            assert status == 200 and reply["success"], reply
            status, reply = _post(base + "api/control", {"method": "reject", "campaign": "dash",
                                                         "trial": second["trial"], "by": "grace"})
            assert status == 200 and "rejected by grace" in reply["msg"]

            def trial(index: int) -> dict:
                return next(t for t in _get(base + "api/state")[1]["campaigns"][0]["trials"] if t["trial"] == index)

            # the daemon queued the approved trial as it answered, and runs it as edited
            _wait(lambda: trial(first["trial"])["status"] == "completed", 20, "the approved trial to run")
            assert trial(first["trial"])["parameters"]["x1"] == 1.25
            assert trial(first["trial"])["review"] == "edited by ada"
            assert trial(second["trial"])["status"] == "failed" and trial(second["trial"])["review"] == "rejected by grace"
        finally:
            server.stop()


@contextmanager
def _chromium(**options: object) -> Iterator[Any]:
    """A new page of headless Chromium (``options``: the browser context's, a viewport say); the test is skipped
    where Chromium or playwright is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    profile = tempfile.mkdtemp(prefix="closedloop-chromium-")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           args=CHROMIUM_FLAGS[1:], **options)
            try:
                yield browser.new_page()
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_the_page_in_a_real_browser(loop: Loop, tmp_path: Path) -> None:
    """Headless Chromium: the best-value plot fills as results arrive; pause stops dispatch; resume restarts it."""
    started = time.monotonic()
    server = _server(loop)
    try:
        with _chromium(viewport={"width": 1280, "height": 1400}) as page:
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("Number(document.querySelector('#best-plot').dataset.count) >= 8", timeout=40_000)
            assert page.locator("#best-plot circle").count() >= 8
            assert page.locator("#stations tr[data-station='station-a']").count() == 1
            page.wait_for_selector("#stream-state.ok", timeout=10_000)

            page.click(".card[data-campaign='dash'] button.pause")
            page.wait_for_selector(".card[data-campaign='dash'] [data-state='paused']", timeout=10_000)
            # in-flight experiments finish; nothing new goes out while paused
            time.sleep(0.6)
            before = loop.dispatched()
            time.sleep(2.5)
            assert loop.dispatched() == before, "the campaign dispatched while paused"
            page.click(".card[data-campaign='dash'] button.resume")
            page.wait_for_selector(".card[data-campaign='dash'] [data-state='running']", timeout=10_000)
            _wait(lambda: loop.dispatched() > before, 15, "dispatch after resume")

            page.click("#trials tr[data-trial='1']")
            page.wait_for_selector("#trial-detail:not([hidden]) pre:has-text('planner:')", timeout=10_000)
            page.wait_for_function("document.querySelector('#model-plot polyline') !== null", timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    finally:
        server.stop()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_held_proposals_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium, approval mode: an edit typed into a held proposal survives the page's redraws, approve
    sends it through the daemon, which runs the trial as edited; reject fails the next one; read-only, the
    buttons are disabled."""
    with _running(tmp_path / "held.db", approve=True) as held_loop:
        server, read_only = _server(held_loop), _server(held_loop, read_only=True)
        campaign_id = held_loop.store.campaign_row("dash").id
        try:
            with _chromium() as page:
                page.goto(f"http://127.0.0.1:{read_only.port}/")
                page.wait_for_selector("#held tr[data-trial] button.approve", timeout=20_000)
                assert page.locator("#held button.approve").first.is_disabled()
                assert page.locator("#held input.edit").first.is_disabled()

                page.goto(f"http://127.0.0.1:{server.port}/")
                row = page.locator("#held tr[data-trial]").first
                row.wait_for(timeout=20_000)
                first = int(row.get_attribute("data-trial"))
                page.fill(f"#held tr[data-trial='{first}'] input[name='x1']", "1.25")
                time.sleep(2.5)  # the page redraws every 2 s: the typed value must stay
                assert page.input_value(f"#held tr[data-trial='{first}'] input[name='x1']") == "1.25"
                page.click(f"#held tr[data-trial='{first}'] button.approve")
                page.wait_for_selector("#message:has-text('edited and approved by dashboard')", timeout=10_000)
                _wait(lambda: held_loop.store.trials(campaign_id)[first - 1].status == "completed", 20,
                      "the edited trial to run")
                second = page.locator(f"#held tr[data-trial]:not([data-trial='{first}'])").first
                second.wait_for(timeout=20_000)
                other = int(second.get_attribute("data-trial"))
                second.locator("button.reject").click()
                page.wait_for_selector("#message:has-text('rejected by dashboard')", timeout=10_000)
        finally:
            server.stop()
            read_only.stop()
        trials = held_loop.store.trials(campaign_id)
        assert trials[first - 1].parameters["x1"] == 1.25
        assert trials[other - 1].status == "failed" and trials[other - 1].error == "rejected by dashboard"
        from closedloop import provenance

        record = provenance.provenance(held_loop.store, "dash", first)
        assert (record.review, record.reviewed_by) == ("edited", "dashboard")


@pytest.mark.slow
def test_the_charts_label_zero_as_zero(tmp_path: Path) -> None:
    """Headless Chromium: the axes' ticks were added up step by step from below, so with results from -0.0173 to
    0.0005 the tick at zero read '1.73472e-18' (cut to '3472e-18' at the plot's edge)."""
    store = Store(tmp_path / "small.db")
    cid = store.open_campaign(Campaign.from_yaml_text(dashboard_campaign("small", 0, False)))
    for i, y in enumerate([-0.01731, 0.000527, -0.0092], start=1):
        (trial,) = store.add_trials(cid, [({"x1": float(i), "x2": 1.0}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": y})
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "small.db"), port=0)).start()
    try:
        with _chromium() as page:
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelector('#best-plot').dataset.count === '3'", timeout=20_000)
            labels = page.evaluate("[...document.querySelectorAll('#best-plot text')].map((t) => t.textContent)")
    finally:
        server.stop()
    assert ["-0.015", "-0.01", "-0.005", "0"] == labels[:4], labels  # the y axis, from the bottom
    assert not [label for label in labels if "e-" in label], labels


@pytest.mark.slow
def test_the_best_so_far_chart_marks_every_failure(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium: failures were marked × from the trials table, which held the last 2,000 trials, while the
    chart draws every result: of a campaign of 5,000 trials failing one in fifty, none was marked before trial 3,000."""
    import closedloop.dashboard.state

    monkeypatch.setattr(closedloop.dashboard.state, "MAX_TRIALS", 4)
    store = Store(tmp_path / "faulty.db")
    cid = store.open_campaign(Campaign.from_yaml_text(dashboard_campaign("faulty", 0, False)))
    for i in range(1, 9):
        (trial,) = store.add_trials(cid, [({"x1": float(i), "x2": 1.0}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        if i in (2, 3):
            store.record_failure(trial.id, "device fault", status=TrialStatus.failed if i == 2 else TrialStatus.abandoned)
        else:
            store.record_result(trial.id, f"run-{i}", {"y": float(i)})
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "faulty.db"), port=0)).start()
    try:
        with _chromium() as page:
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelector('#best-plot').dataset.count === '6'", timeout=20_000)
            marked = page.evaluate("[...document.querySelectorAll('#best-plot text')].filter((t) => t.firstChild.textContent === '×')"
                                   ".map((t) => t.querySelector('title').textContent)")
    finally:
        server.stop()
    assert marked == ["#2 failed: ", "#3 abandoned: "]  # before the table's four trials: their errors are not sent


@pytest.mark.slow
def test_the_page_draws_a_campaign_of_65000_results(tmp_path: Path) -> None:
    """Headless Chromium: the charts' ranges were taken with Math.min(...values), one argument per value; a campaign
    of 65,000 results (130,000 values and bests) overflowed the stack on every redraw, and the held proposal and
    the trials table, drawn after the chart, never appeared."""
    from datetime import timezone

    from closedloop.dashboard.state import MAX_POINTS, MAX_TRIALS
    from closedloop.store import ObservationRow, TrialRow

    n = 65_000
    store = Store(tmp_path / "long.db")
    cid = store.open_campaign(Campaign.from_yaml_text(branin_campaign("long", n + 1)))
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with store.engine.begin() as connection:  # SQL Core bulk inserts, as benchmarks/dashboard_state.py builds a soak
        connection.execute(TrialRow.__table__.insert(), [  # type: ignore[attr-defined]
            {"id": i, "campaign_id": cid, "index": i, "parameters": {"x1": i % 15 - 5.0, "x2": 1.0},
             "status": "completed", "station": "station-a", "attempts": 1, "planner": {"generator": "sobol"},
             "proposed_at": at, "dispatched_at": at, "finished_at": at, "run_uids": [f"run-{i}"]} for i in range(1, n + 1)])
        connection.execute(ObservationRow.__table__.insert(), [  # type: ignore[attr-defined]
            {"trial_id": i, "run_uid": f"run-{i}", "values": {"y": float(i % 97)}, "received_at": at}
            for i in range(1, n + 1)])
    store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"})], TrialStatus.held)
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "long.db"), port=0)).start()
    errors: list[str] = []
    try:
        with _chromium() as page:
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function(f"document.querySelector('#best-plot').dataset.count === '{n}'", timeout=60_000)
            page.wait_for_selector(f"#held tr[data-trial='{n + 1}']", timeout=20_000)
            assert page.locator("#trials tbody tr").count() == MAX_TRIALS
            # sent thinned: the best line's steps and each stretch's extremes, not 65,000 circles every 2 s
            assert page.locator("#best-plot circle").count() <= MAX_POINTS + 100
    finally:
        server.stop()
    assert not errors


def test_dashboard_command_serves_a_store(tmp_path: Path, free_port: int) -> None:
    """``closedloop dashboard`` in its own process, on a store alone (no daemon): the page and its state."""
    import subprocess
    import sys

    store = Store(tmp_path / "alone.db")
    store.open_campaign(Campaign.from_yaml_text(dashboard_campaign("alone", 0, False)))
    store.close()
    process = subprocess.Popen([sys.executable, "-m", "closedloop.cli", "dashboard", "--store", str(tmp_path / "alone.db"),
                                "--port", str(free_port), "--control", "", "--events", ""],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{free_port}/"

        def up() -> bool:
            try:
                return _get(base + "api/state")[0] == 200
            except OSError:
                return False

        _wait(up, 30, "the dashboard process")
        state = _get(base + "api/state")[1]
        assert state["daemon"] is None and state["campaigns"][0]["name"] == "alone"
        with urllib.request.urlopen(base, timeout=10) as page:
            html = page.read().decode()
        assert "best-plot" in html and "http" not in html.replace("http-equiv", "")  # nothing from the network
        for method in ("pause", "approve"):
            status, reply = _post(base + "api/control", {"method": method, "campaign": "alone", "trial": 1})
            assert status == 409 and "no daemon control endpoint" in reply["msg"]
        status, reply = _post(base + "api/control", {"method": "status"})
        assert status == 409 and "unknown method 'status'" in reply["msg"]
    finally:
        process.terminate()
        process.wait(timeout=15)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_daemon_with_dashboard_option(tmp_path: Path) -> None:
    """``closedloop daemon --dashboard PORT`` serves the page from the daemon's process, live from its sockets."""
    import signal
    import subprocess
    import sys

    spec = tmp_path / "dash.yaml"
    spec.write_text(dashboard_campaign("dash", 0.1, False))
    bind, board = _free_port(), _free_port()
    cli = [sys.executable, "-m", "closedloop.cli"]
    daemon = subprocess.Popen([*cli, "daemon", str(spec), "--store", str(tmp_path / "d.db"), "--bind",
                               f"tcp://127.0.0.1:{bind}", "--control", "tcp://127.0.0.1:0", "--publish",
                               "tcp://127.0.0.1:0", "--dashboard", str(board), "--drain", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    station = subprocess.Popen([*cli, "worker", "--connect", f"tcp://127.0.0.1:{bind}", "--name", "station-b"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    base = f"http://127.0.0.1:{board}/"
    try:
        def results() -> int:
            try:
                state = _get(base + "api/state")[1]
            except OSError:
                return 0
            return len(state["campaigns"][0]["series"]) if state.get("campaigns") else 0

        _wait(lambda: results() >= 3, 40, "three results on the daemon's dashboard")
        state = _get(base + "api/state")[1]
        assert [s["name"] for s in state["daemon"]["stations"]] == ["station-b"] and not state["read_only"]
        assert _post(base + "api/control", {"method": "pause", "campaign": "dash"})[1]["success"]
        assert _get(base + "api/state")[1]["campaigns"][0]["live"]["paused"] is True
    finally:
        station.send_signal(signal.SIGTERM)
        daemon.send_signal(signal.SIGTERM)
        output = daemon.communicate(timeout=30)[0]
        station.wait(timeout=15)
    assert f"dashboard on http://127.0.0.1:{board}/" in output


def test_a_daemons_dashboard_beyond_loopback_takes_its_token_from_the_environment(tmp_path: Path) -> None:
    """`closedloop daemon --dashboard-host 0.0.0.0` had no way to be given a token: read-only, telling the operator to
    start it with --token, which the daemon does not have."""
    import os
    import signal
    import subprocess
    import sys

    spec = tmp_path / "dash.yaml"
    spec.write_text(dashboard_campaign("dash", 0.1, False))
    board = _free_port()
    daemon = subprocess.Popen([sys.executable, "-m", "closedloop.cli", "daemon", str(spec), "--store",
                               str(tmp_path / "d.db"), "--bind", f"tcp://127.0.0.1:{_free_port()}", "--control",
                               "tcp://127.0.0.1:0", "--publish", "tcp://127.0.0.1:0", "--dashboard", str(board),
                               "--dashboard-host", "0.0.0.0", "--drain", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              env={**os.environ, "CLOSEDLOOP_DASHBOARD_TOKEN": "s3cret+key", "COLUMNS": "200"})
    try:
        assert daemon.stdout is not None
        line = next(line for line in daemon.stdout if "dashboard on" in line or "error" in line)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert f"dashboard on http://0.0.0.0:{board}/?token=s3cret%2Bkey" in line and "read-only" not in line, line


CONSTRAINED_YAML = """
name: anneal
parameters:
  temperature: {type: continuous, bounds: [80, 250]}
objectives:
  quality: {goal: maximize}
outcome_constraints:
  - "yield >= 0.8"
budget: {experiments: 10}
planner: {backend: sobol, initial_experiments: 2}
instrument: {simulator: "simulators.materials:PerovskiteAnneal"}
"""


def _annealing_state(tmp_path: Path, spec: str, readings: list[dict[str, float]]) -> dict:
    """The dashboard's /api/state for a store holding one campaign of ``spec`` whose trials read ``readings``."""
    store = Store(tmp_path / "anneal.db")
    cid = store.open_campaign(Campaign.from_yaml_text(spec, check_instrument=False))
    for i, values in enumerate(readings, start=1):
        (trial,) = store.add_trials(cid, [({"temperature": 100.0 + i}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", values)
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "anneal.db"), port=0)).start()
    try:
        status, state = _get(f"http://127.0.0.1:{server.port}/api/state")
    finally:
        server.stop()
    assert status == 200
    return state


def test_best_so_far_counts_only_results_within_the_outcome_constraints(tmp_path: Path) -> None:
    """The page's best quality was 0.9 from a film with a yield of 0.3, where `status` and the report said 0.6."""
    state = _annealing_state(tmp_path, CONSTRAINED_YAML, [{"quality": quality, "yield": yield_} for quality, yield_
                                                          in [(0.5, 0.9), (0.9, 0.3), (0.6, 0.95)]])
    series = state["campaigns"][0]["series"]
    assert [(p["trial"], p["value"], p["best"]) for p in series] == [(1, 0.5, 0.5), (2, 0.9, 0.5), (3, 0.6, 0.6)]
    assert [p["counts"] for p in series] == [True, False, True]  # the page draws the second hollow


def test_the_pareto_chart_marks_results_outside_the_outcome_constraints_and_gives_the_thresholds_as_written(
        tmp_path: Path) -> None:
    """A film with a yield of 0.3 that beat the front on both objectives was drawn as a plain point off the front,
    with nothing to say why it was not on it; and the reference point read ``cost: -5.0`` for a threshold of 5."""
    spec = CONSTRAINED_YAML.replace("  quality: {goal: maximize}", "  quality: {goal: maximize, threshold: 0.2}\n"
                                    "  cost: {goal: minimize, threshold: 5.0}")
    state = _annealing_state(tmp_path, spec, [{"quality": quality, "cost": cost, "yield": yield_} for quality, cost, yield_
                                              in [(0.5, 3.0, 0.9), (0.9, 1.0, 0.3), (0.6, 4.0, 0.95)]])
    pareto = state["campaigns"][0]["pareto"]
    assert [(p["trial"], p["front"], p["counts"]) for p in pareto["points"]] == [
        (1, True, True), (2, False, False), (3, True, True)]  # the page draws the second hollow
    assert pareto["reference"] == [0.2, 5.0]
    assert pareto["hypervolume"] == pytest.approx(0.3 * 2.0 + 0.1 * 1.0)


def test_the_models_view_says_why_it_has_no_best_to_draw_through(tmp_path: Path) -> None:
    """Three films, none with the yield the campaign asks for: the model's view said 'no completed experiment yet'."""
    store = Store(tmp_path / "anneal.db")
    cid = store.open_campaign(Campaign.from_yaml_text(CONSTRAINED_YAML, check_instrument=False))
    for i, (quality, yield_) in enumerate([(0.5, 0.4), (0.9, 0.3), (0.6, 0.5)], start=1):
        (trial,) = store.add_trials(cid, [({"temperature": 100.0 + 40 * i}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"quality": quality, "yield": yield_})
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "anneal.db"), port=0)).start()
    try:
        status, view = _get(f"http://127.0.0.1:{server.port}/api/model?campaign=anneal&parameter=temperature")
    finally:
        server.stop()
    assert status == 200 and view["available"] is False
    assert view["reason"] == ("none of the 3 completed experiments counts (within the outcome constraints, from the "
                              "campaign's source): no best to draw through")


def test_a_campaign_no_daemon_runs_any_more_is_idle_not_running(tmp_path: Path) -> None:
    """A daemon stopped (or killed) leaves its unfinished campaign 'running' in the store: `closedloop status` says
    idle, the page said running, beside 'daemon not answering', for as long as it stayed open."""
    with _running(tmp_path / "dash.db") as loop:
        server = _server(loop)
        base = f"http://127.0.0.1:{server.port}/"
        _wait(lambda: loop.dispatched() >= 2, 30, "two experiments")
        assert _get(base + "api/state")[1]["campaigns"][0]["status"] == "running"
    try:
        store = Store(tmp_path / "dash.db", read_only=True)
        assert store.campaign_row("dash").status == "running"  # resumable: the store still says so
        store.close()
        state = _get(base + "api/state")[1]
        assert state["daemon"]["success"] is False
        assert state["campaigns"][0]["status"] == "idle"
    finally:
        server.stop()


def test_a_store_put_back_from_an_earlier_copy_is_read_anew(tmp_path: Path) -> None:
    """A backup of the store copied back over it, the daemon restarted on it: the campaign has the same record, so
    the page kept what it had read of the other file, trials the store no longer holds among them, and never read
    the new trials numbered as those were (the first poll after the copy showed 10 trials of a store of 4; after
    the restart, the old trials' values)."""
    import sqlite3

    path, copy = tmp_path / "dash.db", tmp_path / "backup.db"

    def table() -> list[tuple]:
        store = Store(path, read_only=True)
        try:
            return [(t.index, t.status, t.parameters) for t in store.trials(store.campaign_row("dash").id)]
        finally:
            store.close()

    def shown() -> tuple[list[tuple], list[int]]:
        campaign = _get(base + "api/state")[1]["campaigns"][0]
        return ([(t["trial"], t["status"], t["parameters"]) for t in campaign["trials"]],
                [p["trial"] for p in campaign["series"]])

    with _running(path) as loop:
        server = _server(loop)
        base = f"http://127.0.0.1:{server.port}/"
        _wait(lambda: loop.dispatched() >= 3, 30, "three experiments")
        with sqlite3.connect(path) as source, sqlite3.connect(copy) as backup:
            source.backup(backup)
        backed = len(table())
        _wait(lambda: loop.dispatched() >= backed + 4 and len(shown()[0]) >= backed + 4, 30, "four more experiments")
    try:
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.replace(copy, path)
        assert shown()[0] == table()
        with _running(path) as again:
            _wait(lambda: again.dispatched() >= backed + 3, 30, "experiments after the restart")
            shown()
        trials = table()
        assert shown() == (trials, [index for index, status, _ in trials if status == "completed"])
    finally:
        server.stop()


def test_a_mistyped_store_is_refused_not_served_empty(tmp_path: Path) -> None:
    """`closedloop dashboard --store` with a wrong path had created an empty store there and served it."""
    import subprocess
    import sys

    try:
        result = subprocess.run([sys.executable, "-m", "closedloop.cli", "dashboard", "--store",
                                 str(tmp_path / "reslts" / "branin.db"), "--port", str(_free_port()), "--control", "",
                                 "--events", ""], capture_output=True, text=True, cwd=ROOT, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the dashboard served a store that does not exist")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no store {tmp_path / 'reslts' / 'branin.db'}"
    assert not (tmp_path / "reslts").exists()


def test_the_page_state_names_a_database_store_without_its_password() -> None:
    """A dashboard beyond loopback is read-only but open to all: its /api/state carried the store URL's password."""
    from sqlalchemy.engine import make_url

    from tests.test_store_backends import postgres_database

    for url in postgres_database():
        if not make_url(url).password:
            pytest.skip("the PostgreSQL test URL has no password to hide")
        Store(url).open_campaign(Campaign.from_yaml_text(dashboard_campaign("pg", 0, False)))
        server = DashboardServer(DashboardConfig(store=url, port=0)).start()
        try:
            status, state = _get(f"http://127.0.0.1:{server.port}/api/state")
        finally:
            server.stop()
        assert status == 200 and state["campaigns"][0]["name"] == "pg"
        # as it stands in the URL (CI's password is also the user's and the database's name)
        assert f":{make_url(url).password}@" not in json.dumps(state)
        assert state["store"] == make_url(url).render_as_string(hide_password=True)


# -- the state kept between polls -----------------------------------------------------------------------

TWO_OBJECTIVES_YAML = """
name: film
parameters:
  x1: {type: continuous, bounds: [-5, 10]}
  x2: {type: continuous, bounds: [0, 15]}
objectives:
  y: {goal: minimize}
  cost: {goal: minimize}
outcome_constraints:
  - "y <= 50"
budget: {experiments: 100}
planner: {backend: botorch, seed: 1}
instrument: {simulator: "simulators.surfaces:Branin"}
"""


def _from_scratch(store: Store, name: str, max_trials: int) -> dict:
    """A campaign's page state as the dashboard computed it before it kept anything between polls: every trial,
    result and decision read anew through the ORM (the reference the kept state must equal)."""
    from closedloop import provenance
    from closedloop.planner.observations import ObservationLog
    from closedloop.view import Snapshot

    row = store.campaign_row(name)
    spec = store.campaign(row.id)
    observations = store.observations(row.id)
    decisions = provenance.rows(store, row.id)
    first, goal = next(iter(spec.objectives)), next(iter(spec.objectives.values())).goal
    series, best, table = [], None, []
    for t in store.trials(row.id):
        obs = observations.get(t.id)
        values = obs.values if obs else None
        if values is not None and first in values:
            v = values[first]
            counts = spec.counts(t.parameters) and all(b.satisfied(values[b.output]) for b in spec.output_bounds
                                                       if b.output in values)
            if counts:
                best = v if best is None or (v > best if goal == "maximize" else v < best) else best
            series.append({"trial": t.index, "value": v, "best": best, "counts": counts})
        prov = decisions.get(t.id)
        table.append({
            "trial": t.index, "status": t.status, "parameters": t.parameters, "values": values, "error": t.error,
            "station": t.station, "attempts": t.attempts, "run_uid": obs.run_uid if obs else None,
            "generator": (prov.generator if prov else None) or t.planner.get("generator"),
            "acquisition": prov.acquisition if prov else None,
            "acquisition_value": prov.acquisition_value if prov else None,
            "predicted": prov.predicted if prov else None,
            "review": f"{prov.review} by {prov.reviewed_by}" if prov and prov.review else t.planner.get("approved_by"),
            "execution": t.planner.get("execution"),
            "dispatched_at": _iso(t.dispatched_at), "finished_at": _iso(t.finished_at),
        })
    from closedloop.store import used_instrument

    spent = sum(spec.cost_of(t.parameters) for t in store.trials(row.id)
                if t.status in ("completed", "failed", "abandoned") and used_instrument(t.attempts, t.error))
    out = {"name": name, "status": Snapshot.from_store(store, name, recent=0).status, "budget": spec.max_experiments,
           "experiments": spec.budget.experiments, "cost_budget": spec.budget.cost, "spent": spent,
           "objectives": [{"name": n, "goal": o.goal} for n, o in spec.objectives.items()], "outputs": spec.outputs,
           "backend": spec.planner.backend,
           "parameters": {n: {"type": p.type, "bounds": list(p.bounds)} for n, p in spec.parameters.items()},
           "counts": store.counts(row.id), "results": len(series), "series": series, "trials": table[-max_trials:],
           "failures": [{"trial": r["trial"], "status": r["status"]} for r in table if r["status"] in ("failed", "abandoned")],
           "held": [r for r in table if r["status"] == "held"]}
    log_ = ObservationLog(spec)
    log_.add(store.results(row.id))
    front = {r.trial for r in log_.pareto_front()}
    points = [{"trial": r.trial, "x": r.values["y"], "y": r.values["cost"], "front": r.trial in front,
               "counts": log_.feasible(r)} for r in log_.completed]
    out["pareto"] = {"x": "y", "y": "cost", "points": points, "hypervolume": log_.hypervolume() if points else 0.0,
                     "reference": [-v for v in log_.reference_point()] if points else None}  # both minimized
    return json.loads(json.dumps(out))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() + ("" if moment.tzinfo else "Z") if moment is not None else None


class _Film:
    """A two-objective campaign with an outcome constraint, changed the ways a daemon and people change one."""

    def __init__(self, path: Path):
        self.store = Store(path)
        self.cid = self.store.open_campaign(Campaign.from_yaml_text(TWO_OBJECTIVES_YAML, check_instrument=False))
        self.ids: dict[int, int] = {}  # trial number -> id

    def propose(self, n: int, status: str = "proposed") -> list[int]:
        from closedloop.provenance import ProvenanceRow

        def decisions(connection, rows) -> None:  # type: ignore[no-untyped-def]
            connection.execute(ProvenanceRow.__table__.insert(), [ProvenanceRow(
                trial_id=r.id, campaign_id=r.campaign_id, backend="botorch", generator="botorch",
                acquisition="qLogNEI", acquisition_value=0.1 * r.index,
                predicted={"y": {"mean": 1.0, "std": 0.5}}).model_dump() for r in rows])

        start = len(self.ids)
        rows = self.store.add_trials(self.cid, [({"x1": float((start + k) % 15 - 5), "x2": 1.0}, {"generator": "botorch"})
                                                for k in range(n)], TrialStatus(status), companion=decisions)
        self.ids.update({r.index: r.id for r in rows})
        return [r.index for r in rows]

    def dispatch(self, *numbers: int) -> None:
        for number in numbers:
            self.store.mark_dispatched(self.ids[number], "station-a")

    def complete(self, number: int, y: float, cost: float) -> None:
        self.store.record_results([(self.ids[number], f"run-{number}-{y}", {"y": y, "cost": cost}, None, 1.0)])


def test_the_state_kept_between_polls_equals_the_state_read_from_scratch(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The dashboard keeps each campaign's rows and series between polls and reads only new and open trials;
    after every kind of change a trial can make (out-of-order results, failures, retries, approvals with edits,
    rejections, abandoned and imported experiments, a trial finishing after it left the table) its reply must be
    what reading everything anew gives."""
    import closedloop.dashboard.state

    monkeypatch.setattr(closedloop.dashboard.state, "MAX_TRIALS", 4)  # the table's window slides within the test
    film = _Film(tmp_path / "film.db")
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "film.db"), port=0)).start()

    def same() -> None:
        status, state = _get(f"http://127.0.0.1:{server.port}/api/state")
        assert status == 200
        (campaign,) = state["campaigns"]
        assert campaign.pop("live") is None
        assert campaign == _from_scratch(film.store, "film", 4)

    try:
        same()
        film.propose(4)
        film.dispatch(1, 2, 3)
        film.complete(1, 30.0, 5.0)
        film.complete(3, 20.0, 1.0)
        same()
        film.complete(2, 10.0, 9.0)  # after 3: the series' best changes from trial 2 on
        film.dispatch(4)
        film.store.record_failure(film.ids[4], "device fault", run_uid="run-4-failed")
        same()
        film.propose(2, "held")  # 5 and 6
        same()
        film.store.approve_held(film.ids[5], "ada", {"x1": 1.25, "x2": 2.0})
        film.store.reject(film.ids[6], "grace")
        same()
        film.dispatch(5)
        film.store.requeue(film.ids[5], "station lost", "run-5-lost")  # a retry
        same()
        film.dispatch(5)
        film.complete(5, 5.0, 5.0)
        film.propose(4)  # 7 to 10
        film.dispatch(7, 8, 9)
        film.store.record_failure(film.ids[7], "station gone", status=TrialStatus.abandoned)
        film.store.reject(film.ids[10], "ada")
        film.complete(9, 99.0, 0.5)  # breaks y <= 50: drawn, never the best nor on the front
        same()
        film.propose(5)  # 11 to 15: trial 8, still dispatched, leaves the table's window
        film.dispatch(11, 12, 13)
        for number in (11, 12, 13):
            film.complete(number, 40.0 + number, 2.0)
        same()
        film.complete(8, 1.0, 1.0)  # the new best, long after it left the table
        film.store.import_results(film.cid, [({"x1": 2.0, "x2": 3.0}, {"y": 0.5, "cost": 8.0}, None),
                                             ({"x1": 3.0, "x2": 3.0}, None, "clogged")], "old.csv")
        same()
        film.store.record_run(film.ids[4], "run-4-late")  # a finished trial's late run: nothing shown changes
        same()
    finally:
        server.stop()
        film.store.close()


def test_a_repeated_poll_reads_only_the_trials_that_are_new_or_open(tmp_path: Path) -> None:
    """Every poll (each 2 s and each daemon event) re-read and rebuilt every trial, result and decision: 2 s a
    request at 23 000 trials. Rows the dashboard's queries return, counted by running them again."""
    import sqlite3

    from sqlalchemy import event

    film = _Film(tmp_path / "film.db")
    film.propose(40)
    film.dispatch(*range(1, 38))
    for number in range(1, 36):
        film.complete(number, float(number), 1.0)
    film.propose(1, "held")  # 41; 36 and 37 dispatched, 38 to 40 proposed
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "film.db"), port=0)).start()
    statements: list[tuple[str, tuple]] = []
    event.listen(server.dashboard.store.engine, "before_cursor_execute",
                 lambda _c, _cursor, statement, parameters, _x, _m: statements.append((statement, parameters)))

    def rows_read() -> int:
        statements.clear()
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 200
        with sqlite3.connect(tmp_path / "film.db") as again:
            return sum(len(again.execute(s, p).fetchall()) for s, p in statements if s.lstrip().upper().startswith("SELECT"))

    try:
        assert rows_read() >= 41  # the first poll reads them all
        film.complete(36, 0.5, 0.5)
        film.propose(2)  # 42 and 43
        # one campaign row, the six trials open before (36 to 41) and the two new ones, a count per status (four)
        assert rows_read() == 1 + 6 + 2 + 4
        assert rows_read() == 1 + 7 + 4  # nothing new: the open ones only
    finally:
        server.stop()
        film.store.close()


def _branin_results(path: Path, n: int = 6) -> None:
    """A Branin campaign in a store with ``n`` Sobol results: enough for a model."""
    from simulators.surfaces import branin

    store = Store(path)
    campaign = Campaign.from_yaml_text(branin_campaign("seen", 30, options={"noise": 0.0, "seed": 0}))
    cid = store.open_campaign(campaign)
    from closedloop.planner import make_planner

    for i, proposal in enumerate(make_planner(campaign).suggest(n), start=1):
        (trial,) = store.add_trials(cid, [(proposal.parameters, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": branin([proposal.parameters["x1"], proposal.parameters["x2"]])})
    store.close()


def test_unknown_parameter_names_reuse_the_models_view_rather_than_fit_one_each(tmp_path: Path) -> None:
    """/api/model?parameter=ANYTHING fell back to the first parameter but kept (and fitted) one view per name asked:
    a read-only dashboard open to the network (or a script) could make the daemon's process fit a GP per request,
    under the lock the daemon's own planner takes, and keep every view in memory until the next result."""
    _branin_results(tmp_path / "seen.db")
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    try:
        base = f"http://127.0.0.1:{server.port}/api/model?campaign=seen"
        status, first = _get(base + "&parameter=x1")
        assert status == 200 and first["available"], first
        for i in range(5):
            status, view = _get(base + f"&parameter=nope{i}&second=nor{i}")
            assert status == 200 and view["parameter"] == "x1" and "grid" not in view, view
            assert view["mean"] == first["mean"]
        assert len(server.dashboard.models._cache) == 1
    finally:
        server.stop()


def _with_failures(path: Path, failures: int) -> None:
    """``failures`` failed experiments added to campaign "seen" (after its results)."""
    store = Store(path)
    cid = store.campaign_row("seen").id
    for i in range(failures):
        (trial,) = store.add_trials(cid, [({"x1": -4.0 + i, "x2": 14.0}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_failure(trial.id, "gripper dropped the vial")
    store.close()


def test_the_models_view_counts_failures_apart_from_results(tmp_path: Path) -> None:
    """The model's view said "8 results" of 6 results and 2 failures, which have no value: the model takes them as
    where experiments fail, and the caption names them so."""
    _branin_results(tmp_path / "seen.db")
    _with_failures(tmp_path / "seen.db", 2)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    try:
        status, view = _get(f"http://127.0.0.1:{server.port}/api/model?campaign=seen&parameter=x1")
        assert status == 200 and view["available"], view
        assert view["results"] == 6 and view["failures"] == 2
        assert len(view["observed"]) == 6
    finally:
        server.stop()


@pytest.mark.slow
def test_the_models_caption_in_a_real_browser_names_failures_apart(tmp_path: Path) -> None:
    """Headless Chromium: the model's caption gives results and failures apart, as /api/model counts them."""
    _branin_results(tmp_path / "seen.db")
    _with_failures(tmp_path / "seen.db", 2)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    try:
        with _chromium() as page:
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelector('#model-plot polyline') !== null", timeout=30_000)
            caption = page.locator("#model-caption").inner_text()
            assert "(6 results; 2 failures, modelled as where experiments fail; botorch" in caption, caption
    finally:
        server.stop()


def test_a_control_request_of_deeply_nested_json_is_a_bad_request(tmp_path: Path) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: the page's control got a 500 and the log a
    traceback; it is now refused as a bad request, as any malformed body is."""
    _branin_results(tmp_path / "seen.db", 1)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/control", method="POST",
                                         data=b"[" * 100_000 + b"]" * 100_000,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and "bad request" in json.loads(refused.value.read())["msg"]
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 200
    finally:
        server.stop()


def test_the_token_can_come_from_the_environment_and_stay_out_of_the_process_list(tmp_path: Path,
                                                                                  free_port: int) -> None:
    """``--token SECRET`` is in the process's command line, which every user of the machine reads (ps, /proc):
    CLOSEDLOOP_DASHBOARD_TOKEN gives it to the dashboard without showing it."""
    import subprocess
    import sys

    _branin_results(tmp_path / "seen.db", 1)
    process = subprocess.Popen([sys.executable, "-m", "closedloop.cli", "dashboard", "--store", str(tmp_path / "seen.db"),
                                "--host", "0.0.0.0", "--port", str(free_port), "--control", "", "--events", ""],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={**os.environ, "CLOSEDLOOP_DASHBOARD_TOKEN": "s3cret"})
    try:
        base = f"http://127.0.0.1:{free_port}/api/state"

        def up() -> bool:
            try:
                return _get(base)[0] == 401
            except OSError:
                return False

        _wait(up, 30, "the dashboard process, asking for its token")
        status, state = _get(base, {"X-Closedloop-Token": "s3cret"})
        assert status == 200 and state["read_only"] is False  # beyond loopback, and the token allows control
        assert "s3cret" not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
    finally:
        process.terminate()
        process.wait(timeout=15)


HOSTILE = '"><img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

XSS_YAML = """
name: film
parameters:
  x1: {type: continuous, bounds: [0, 1]}
  solvent: {type: categorical, values: ["water", '"><img src=x onerror="window.__pwned=1">']}
objectives:
  y: {goal: minimize}
budget: {experiments: 10}
instrument: {simulator: "simulators.surfaces:Branin"}
"""


@pytest.mark.slow
def test_the_page_shows_hostile_text_as_text_and_sends_its_token_in_a_header(tmp_path: Path) -> None:
    """Station names, failure messages and categorical values holding markup are drawn as text (no element, no
    script); and the page sent its token in every request's address (?token=), where a TLS proxy's access log kept it
    every 2 s, as well as in its X-Closedloop-Token header: now only the event stream, which cannot set a header,
    carries it in its address."""
    store = Store(tmp_path / "film.db")
    cid = store.open_campaign(Campaign.from_yaml_text(XSS_YAML, check_instrument=False))
    solvents = ["water", '"><img src=x onerror="window.__pwned=1">']
    for i in range(1, 5):
        (trial,) = store.add_trials(cid, [({"x1": i / 5, "solvent": solvents[i % 2]}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, f"st-{i}{HOSTILE}")
        if i % 2:
            store.record_result(trial.id, f"run-{i}", {"y": float(i)})
        else:
            store.record_failure(trial.id, f"device fault {HOSTILE}")
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "film.db"), port=0, token="s3cret")).start()
    urls: list[str] = []
    try:
        with _chromium() as page:
            page.on("request", lambda request: urls.append(request.url))
            page.goto(f"http://127.0.0.1:{server.port}/?token=s3cret")
            page.wait_for_selector("#trials tr[data-trial='4']", timeout=30_000)
            page.click("#trials tr[data-trial='2']")
            page.wait_for_selector("#trial-detail:not([hidden])", timeout=10_000)
            page.wait_for_timeout(2500)  # a poll or two more
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0 and page.locator("script:not([src])").count() == 0
            assert HOSTILE in page.locator("#trials").inner_text()
    finally:
        server.stop()
    fetched = [u for u in urls if "/api/" in u]
    assert fetched, urls
    assert all("s3cret" not in u for u in fetched), fetched


def test_event_streams_beyond_the_limit_are_refused_and_the_daemons_process_keeps_its_files(loop: Loop) -> None:
    """Each /events stream held a SUB socket on the daemon's PUB (about 4 file descriptors of the daemon's process with
    `daemon --dashboard`): 300 streams opened by anyone who could read a read-only dashboard took the process to
    1008 of a service's usual 1024 ('Too many open files'). Streams beyond MAX_STREAMS are answered 503; the page
    polls instead."""
    import socket

    from closedloop.dashboard.app import MAX_STREAMS

    server = _server(loop, host="0.0.0.0")
    held: list[socket.socket] = []
    try:
        def open_stream() -> bytes:
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(conn)
            conn.sendall(b"GET /events HTTP/1.1\r\nHost: lab\r\n\r\n")
            reply = b""
            while b"retry:" not in reply and b"\r\n\r\n{" not in reply and len(reply) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply

        replies = [open_stream() for _ in range(MAX_STREAMS + 5)]
        assert all(r.startswith(b"HTTP/1.1 200") for r in replies[:MAX_STREAMS]), replies[0][:200]
        assert all(r.startswith(b"HTTP/1.1 503") and b"event streams" in r for r in replies[MAX_STREAMS:]), replies[-1]
        for conn in held:
            conn.close()
        held.clear()
        _wait(lambda: open_stream().startswith(b"HTTP/1.1 200"), 10, "a stream once the others closed")
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 200
    finally:
        for conn in held:
            conn.close()
        server.stop()


def test_a_daemon_endpoint_on_every_interface_is_reached_by_loopback_of_its_family() -> None:
    """The dashboard's SUB connected to 'tcp://[::]:5702' as given, an address no peer reaches; IPv6's every interface
    is now reached by [::1], as IPv4's by 127.0.0.1."""
    from closedloop.dashboard.app import _connectable

    assert _connectable("tcp://[::]:5702") == "tcp://[::1]:5702"
    assert _connectable("tcp://*:5702") == _connectable("tcp://0.0.0.0:5702") == "tcp://127.0.0.1:5702"
    assert _connectable("tcp://[::1]:5702") == "tcp://[::1]:5702"


def _steps(series: list[dict]) -> list[tuple[int, float]]:
    """The best-so-far line as the page draws it: a step at each point where the best changes."""
    out: list[tuple[int, float]] = []
    for p in series:
        if p["best"] is not None and (not out or out[-1][1] != p["best"]):
            out.append((p["trial"], p["best"]))
    return out


def test_a_long_campaign_is_sent_thinned_charts_with_the_same_best_line_and_extremes(tmp_path: Path,
                                                                                      monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every poll sent every result twice over (the best-so-far series and, with two objectives, the Pareto cloud):
    4 MB each 2 s at 50,000 trials, drawn as 50,000 circles each time. Past MAX_POINTS the page gets the best line's
    steps, each stretch's lowest and highest result, the front in full, and the number of results."""
    import random

    import closedloop.dashboard.state

    monkeypatch.setattr(closedloop.dashboard.state, "MAX_POINTS", 10)
    film = _Film(tmp_path / "film.db")
    n = 60
    film.propose(n)
    film.dispatch(*range(1, n + 1))
    rng = random.Random(2)
    for number in range(1, n + 1):
        film.complete(number, rng.uniform(0, 45), rng.uniform(0, 10))
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "film.db"), port=0)).start()
    try:
        status, state = _get(f"http://127.0.0.1:{server.port}/api/state")
    finally:
        server.stop()
    assert status == 200
    (campaign,) = state["campaigns"]
    full = _from_scratch(film.store, "film", 4)
    film.store.close()
    series, every = campaign["series"], full["series"]
    assert campaign["results"] == len(every) == n
    steps = _steps(every)
    assert len(series) <= 10 + len(steps) + 1 < n
    assert _steps(series) == steps and series[-1] == every[-1]
    assert {p["value"] for p in series} >= {min(p["value"] for p in every), max(p["value"] for p in every)}
    assert all(p in every for p in series)
    front = [p for p in full["pareto"]["points"] if p["front"]]
    points = campaign["pareto"]["points"]
    assert [p for p in points if p["front"]] == front and len(points) <= len(front) + 10


def test_idle_connections_are_closed_and_capped_so_the_daemons_process_keeps_its_files(tmp_path: Path,
                                                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A connection that never finished its request (nothing sent, or a header line and no more) was held open for
    good: each a file descriptor of the daemon's process under `daemon --dashboard`, and 300 of them, opened by anyone
    who could reach the port (a read-only dashboard on 0.0.0.0 too), stopped a daemon allowed 300 ('Too many open
    files' when it kept a run's documents). Connections beyond MAX_CONNECTIONS are answered 503 and closed; one that
    sends no whole request within REQUEST_TIMEOUT_S is closed."""
    import socket

    from closedloop.dashboard import app

    monkeypatch.setattr(app, "REQUEST_TIMEOUT_S", 1.0)
    _branin_results(tmp_path / "seen.db", 1)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0, host="0.0.0.0")).start()
    held: list[socket.socket] = []

    def closed(conn: socket.socket, timeout_s: float) -> bytes | None:
        """What the server sent before closing ``conn`` within ``timeout_s``; None if it is still open."""
        conn.settimeout(timeout_s)
        reply = b""
        try:
            while chunk := conn.recv(4096):
                reply += chunk
        except TimeoutError:
            return None
        except ConnectionResetError:  # closed with the half request it sent unread
            pass
        return reply

    try:
        for i in range(app.MAX_CONNECTIONS + 5):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(conn)
            if i % 2 and i < app.MAX_CONNECTIONS:
                conn.sendall(b"GET /api/state HTTP/1.1\r\n")
        beyond = [closed(conn, 5) for conn in held[app.MAX_CONNECTIONS:]]
        assert all(r is not None and r.startswith(b"HTTP/1.1 503") for r in beyond), beyond
        assert all(closed(conn, 5) is not None for conn in held[:app.MAX_CONNECTIONS])
        for conn in held:
            conn.close()
        held.clear()
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 200
    finally:
        for conn in held:
            conn.close()
        server.stop()


def test_a_stop_naming_a_campaign_is_refused_and_stops_nothing(loop: Loop) -> None:
    """The dashboard's API takes `{"method": "pause"|"resume"|"stop", "campaign"?}`, but the daemon's stop ignored the
    campaign: a stop meant for one campaign (or naming one it does not run) stopped the daemon and every campaign."""
    server = _server(loop)
    base = f"http://127.0.0.1:{server.port}/"
    try:
        for name in ("dash", "nope"):
            status, reply = _post(base + "api/control", {"method": "stop", "campaign": name})
            assert status == 409 and "takes no campaign" in reply["msg"], reply
        status = control_request(loop.daemon.control_endpoint, "status")
        assert status["stopping"] is False and status["campaigns"][0]["stopping"] is False, status
        done = loop.dispatched()
        _wait(lambda: loop.dispatched() > done, 30, "dispatch going on")
    finally:
        server.stop()


def test_a_campaign_with_a_budget_in_cost_shows_the_cost_spent(tmp_path: Path) -> None:
    """A campaign with sources and a budget in cost showed '31/120 done' and a quarter-full bar once it had spent its
    whole cost: 120 is only what the cost buys at the cheapest source. The card says what `closedloop status` says."""
    spec = Campaign.from_yaml_text((ROOT / "campaigns" / "branin_multifidelity.yaml").read_text())
    store = Store(tmp_path / "mf.db")
    cid = store.open_campaign(spec)
    for i, source in enumerate(["simulation"] * 10 + ["robot"] * 11, start=1):
        (trial,) = store.add_trials(cid, [({"x1": 1.0 + i / 10, "x2": 2.0, "source": source}, {"generator": "mf-ucb"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": 10.0 - i / 10})
    store.close()
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "mf.db"), port=0)).start()
    try:
        status, state = _get(f"http://127.0.0.1:{server.port}/api/state")
        campaign = state["campaigns"][0]
        assert status == 200 and campaign["cost_budget"] == 12 and campaign["spent"] == pytest.approx(12.0), campaign
        with _chromium() as page:
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelector('#best-plot').dataset.count === '21'", timeout=20_000)
            card = page.text_content("#campaigns .card")
            width = page.evaluate("document.querySelector('#campaigns .bar div').style.width")
    finally:
        server.stop()
    assert "cost 12/12, 21 experiments" in card and "/120" not in card, card
    assert width == "100%", width


def test_a_dashboard_port_in_use_is_named_in_one_line(tmp_path: Path) -> None:
    """`closedloop dashboard` (and `daemon --dashboard`) on a port in use said 'error: OSError: [Errno 98] Address
    already in use', naming neither the dashboard nor the port: the daemon has three endpoints of its own."""
    import socket
    import subprocess
    import sys

    _branin_results(tmp_path / "seen.db", 1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "closedloop.cli", "dashboard", "--store", str(tmp_path / "seen.db"),
                                 "--port", str(port), "--control", "", "--events", ""],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        f"error: the dashboard cannot listen on 127.0.0.1:{port}: Address already in use (another dashboard or "
        "program listens there: stop it, or choose another port)"], result.stderr


def test_the_address_printed_with_a_token_opens_the_page_whatever_the_token_holds(tmp_path: Path) -> None:
    """The address the dashboard prints held its token as typed: a token of base64 ('openssl rand -base64 16') has
    '+', which an address reads as a space, so the page the printed address opened was refused (401), and so was
    every request the page then made with the token it read from its address."""
    from urllib.parse import parse_qs, urlsplit

    _branin_results(tmp_path / "seen.db", 1)
    token = "ab+cd/ef==&x #y%"
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0, token=token)).start()
    try:
        with urllib.request.urlopen(server.url, timeout=30) as page:
            assert page.status == 200 and "best-plot" in page.read().decode()
        read = parse_qs(urlsplit(server.url).query)["token"][0]  # as the page reads it (URLSearchParams)
        assert read == token
        assert _get(f"http://127.0.0.1:{server.port}/api/state", {"X-Closedloop-Token": read})[0] == 200
    finally:
        server.stop()


def test_a_store_that_cannot_be_read_is_one_line_not_a_traceback_per_poll(tmp_path: Path) -> None:
    """With its store deleted or moved (or a database server down), every poll of every open page logged a full
    traceback and was answered 500 'Internal Server Error', which the page showed as 'dashboard unreachable'. It is
    answered 503 with why, in one line, which the page shows."""
    _branin_results(tmp_path / "seen.db", 1)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    try:
        base = f"http://127.0.0.1:{server.port}/"
        assert _get(base + "api/state")[0] == 200
        for path in tmp_path.glob("seen.db*"):
            if path.is_file():
                path.unlink()
        for url in ("api/state", "api/trial?campaign=seen&trial=1", "api/model?campaign=seen&parameter=x1"):
            status, reply = _get(base + url)
            assert status == 503 and reply["msg"].startswith(f"cannot read the store {tmp_path / 'seen.db'}: "), reply
    finally:
        server.stop()


def _an_address_beyond_loopback() -> str | None:
    """One of this machine's addresses that is not loopback, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface a route would use
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_control_request_from_beyond_loopback_needs_the_token_whatever_the_app_was_told(tmp_path: Path) -> None:
    """create_app (for uvicorn deployments) believes the host its config names, 127.0.0.1 by default: served on
    0.0.0.0, a peer from another machine that named 'Host: 127.0.0.1' passed the DNS-rebinding check, and its stop
    was relayed to the daemon with no token. The peer's own address now decides."""
    import socket

    import uvicorn

    from closedloop.dashboard import create_app

    address = _an_address_beyond_loopback()
    if address is None:
        pytest.skip("this machine has no address beyond loopback")
    _branin_results(tmp_path / "seen.db", 1)
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(DashboardConfig(store=str(tmp_path / "seen.db"))),
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, 10, "the server")
        status, reply = _post(f"http://{address}:{port}/api/control", {"method": "stop"}, {"Host": "127.0.0.1"})
        assert status == 403 and "needs the dashboard's token" in reply["msg"], reply
        status, reply = _post(f"http://127.0.0.1:{port}/api/control", {"method": "stop"})
        assert status == 409 and "no daemon control endpoint" in reply["msg"], reply  # loopback: relayed as before
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def test_a_control_request_cut_off_before_its_body_is_whole_logs_no_traceback(tmp_path: Path) -> None:
    """A POST whose client went away before sending the body it announced raised ClientDisconnect out of the handler:
    'Exception in ASGI application' and a traceback in the log (the daemon's own log under `daemon --dashboard`)."""
    import logging
    import socket

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    _branin_results(tmp_path / "seen.db", 1)
    server = DashboardServer(DashboardConfig(store=str(tmp_path / "seen.db"), port=0)).start()
    logger.addHandler(handler)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"POST /api/control HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"met")
            time.sleep(0.5)
        time.sleep(1.0)
        assert _get(f"http://127.0.0.1:{server.port}/api/state")[0] == 200
    finally:
        logger.removeHandler(handler)
        server.stop()
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
