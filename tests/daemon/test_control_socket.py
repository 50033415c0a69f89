"""Hostile requests on the daemon's control socket: each gets an error, the daemon keeps serving, nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq
from sqlalchemy.engine import make_url

from closedloop import provenance
from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request
from closedloop.store import Store
from simulators.surfaces import branin_campaign
from tests.daemon.procs import serving
from tests.test_hitl import held_campaign
from tests.test_hitl import serving as serving_held
from tests.test_store_backends import postgres_database


def _raw(endpoint: str, body: bytes) -> dict | None:
    """Send ``body`` as it is (no client-side checks) and return the daemon's reply, None if none came in 5 s."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(body)
        return json.loads(sock.recv()) if sock.poll(5000) else None
    finally:
        sock.close()


def test_hostile_control_requests_are_refused_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    store, campaign, cid = held_campaign(tmp_path)
    before = [(t.status, t.parameters, t.error) for t in store.trials(cid)]
    edit = {"method": "edit", "params": {"campaign": "review", "trial": 1}}
    hostile = [
        # an integer beyond a float: float() raised OverflowError, which ended the daemon's loop (no reply ever again)
        json.dumps({**edit, "params": {**edit["params"], "parameters": {"x1": 10**400}}}).encode(),
        json.dumps({**edit, "params": {**edit["params"], "parameters": {"x1": None}}}).encode(),
        json.dumps({**edit, "params": {**edit["params"], "parameters": {"": 1}}}).encode(),
        b'{"method": "edit", "params": {"campaign": "review", "trial": 1, "parameters": {"x1": NaN}}}',
        json.dumps({"method": "approve", "params": {"campaign": "review", "trial": 10**400}}).encode(),
        json.dumps({"method": "cancel", "params": {"campaign": "review", "trial": 10**400}}).encode(),
        json.dumps({"method": "pause", "params": {"campaign": {"a": [1]}}}).encode(),
        b"{" * 30_000,
        b"\xff\xfe",
    ]
    with serving_held(store, campaign) as (daemon, _):
        endpoint = daemon.control_endpoint
        assert endpoint is not None
        for body in hostile:
            reply = _raw(endpoint, body)
            assert reply is not None, f"no reply to {body[:80]!r}: the daemon's loop died"
            assert reply["success"] is False and reply["msg"], (body[:80], reply)
        assert control_request(endpoint, "status", timeout_s=5)["success"]
    assert [(t.status, t.parameters, t.error) for t in store.trials(cid)] == before
    assert all(provenance.provenance(store, "review", i).review is None for i in (1, 2, 3))



def test_the_status_request_names_a_database_store_without_its_password() -> None:
    """Any local user can ask the control socket (it has no keys): its status carried the store URL's password."""
    for url in postgres_database():
        password = make_url(url).password
        if not password:
            pytest.skip("the PostgreSQL test URL has no password to hide")
        store = Store(url)
        campaign = Campaign.from_yaml_text(branin_campaign("pg", 2, options={"noise": 0.0, "seed": 0}))
        daemon = Daemon(store, [campaign], control="tcp://127.0.0.1:0", heartbeat_s=0.5)
        try:
            with serving(daemon):
                assert daemon.control_endpoint is not None
                status = control_request(daemon.control_endpoint, "status", timeout_s=5)
        finally:
            store.close()
        assert status["success"] and f":{password}@" not in json.dumps(status)
        assert status["store"] == make_url(url).render_as_string(hide_password=True)
