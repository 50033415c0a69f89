"""Thousands of hostile frames at the daemon's sockets while a campaign runs."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import zmq

from closedloop import protocol
from closedloop.daemon import DROPS_LOGGED, control_request
from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, completed, free_port, kill9, ran, start_daemon, start_worker, wait_for

pytestmark = pytest.mark.slow


def hostile_frames(rng: random.Random, trial_ids: list[int]) -> list[list[bytes]]:
    """One batch of frames a broken or malicious peer might send (each a multipart message)."""
    result = protocol.ResultMessage(trial_id=1, run_uid="x", values={"y": 1.0}).model_dump()
    choices = [
        lambda: [rng.randbytes(rng.randint(0, 200))],
        lambda: [b"{" * rng.randint(1, 5000)],
        lambda: [json.dumps({"v": 1, "type": rng.choice(["hello", "result", "nope", "ack", "assign", 7])}).encode()],
        lambda: [json.dumps({**result, "v": rng.choice([0, 2, "1", None, 1.0000001])}).encode()],
        lambda: [json.dumps({**result, "trial_id": rng.choice(trial_ids + [10**9, -1]),
                             "run_uid": f"forged-{rng.random()}"}).encode()],
        lambda: [json.dumps({**result, "trial_id": rng.choice(trial_ids)}).replace('1.0}', "NaN}").encode()],
        lambda: [json.dumps({**result, "trial_id": rng.choice(trial_ids), "values": {"y": "1"}}).encode()],
        lambda: [json.dumps({**result, "trial_id": rng.choice(trial_ids), "values": {"z": 1.0}}).encode()],
        lambda: [json.dumps({**result, "trial_id": rng.choice(trial_ids), "values": {"y": 1e999}}).encode()],
        lambda: [json.dumps({**result, "extra": 1}).encode()],
        lambda: [protocol.encode(protocol.Failure(trial_id=rng.choice(trial_ids), error="forged failure"))],
        # documents that would overwrite a run's record, or that open another run than they are sent for
        lambda: [protocol.encode(protocol.Failure(
            trial_id=rng.choice(trial_ids), error="forged", run_uid=rng.choice(["forged-run", "a" * 36]),
            documents=json.dumps({"name": "start", "doc": {"uid": rng.choice(["forged-run", "other"])}}) + "\n"))],
        lambda: [protocol.encode(protocol.Started(trial_id=rng.choice(trial_ids)))],
        lambda: [protocol.encode(protocol.Ack(trial_id=rng.choice(trial_ids)))],
        lambda: [b"a", b"b", b"c"],
        lambda: [b""],
        lambda: [json.dumps([1, 2, 3]).encode()],
        lambda: [b"x" * (protocol.MAX_MESSAGE_BYTES + 10)],
    ]
    return [rng.choice(choices)() for _ in range(500)]


def test_hostile_frames_change_nothing_but_valid_results(tmp_path: Path) -> None:
    rng = random.Random(7)
    (tmp_path / "c.yaml").write_text(campaign_yaml("fuzz", 40, latency=0.4))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    workers = [start_worker(tmp_path, endpoint, f"station-{i}") for i in (1, 2)]
    context = zmq.Context()
    sent = 0
    try:
        wait_for(lambda: completed(tmp_path / "s.db") >= 3, 60, "the campaign to start")
        peers = []
        for i in range(6):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, f"fuzz-{i}".encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            peers.append(sock)
        # half the peers register first (serving an instrument no campaign uses), so their forged
        # results reach the result handlers instead of being refused as unregistered
        for i, sock in enumerate(peers[:3]):
            sock.send(protocol.encode(protocol.Hello(station=f"fuzz-{i}", instruments=["nothing:Here"])))
        controller = context.socket(zmq.DEALER)
        controller.setsockopt(zmq.LINGER, 0)
        controller.connect(control)
        trial_ids = list(range(1, 60))
        for _ in range(10):
            if daemon.poll() is not None:
                break  # the campaign finished under fire
            for frames in hostile_frames(rng, trial_ids):
                rng.choice(peers).send_multipart(frames)
                sent += 1
            for _ in range(50):
                body = rng.choice([rng.randbytes(30), b"{}", b'{"method": "nope"}', b'{"method": "cancel"}',
                                   b'{"method": "status", "params": 5}', b'{"method": "x", "extra": 1}', b"[]"])
                controller.send_multipart([b"", body])
                sent += 1
            if daemon.poll() is None:
                assert control_request(control, "health", timeout_s=30)["healthy"]
            time.sleep(0.1)
        assert sent >= 3000, "the campaign ended before thousands of hostile frames reached it"
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in [daemon, *workers]:
            kill9(proc)
        context.destroy(linger=0)

    store = Store(tmp_path / "s.db")
    campaign_id = store.campaign_row("fuzz").id
    trials = store.trials(campaign_id)
    assert len(trials) == 40 and {t.status for t in trials} == {"completed"}
    assert {t.station for t in trials} <= {"station-1", "station-2"}
    observations = store.observations(campaign_id)
    measured = set(ran(tmp_path / "station-1.outbox")) | set(ran(tmp_path / "station-2.outbox"))
    assert {(o.trial_id, o.run_uid) for o in observations.values()} <= measured
    assert not any(o.run_uid.startswith("forged") for o in observations.values())
    # a forged failure attaches no run to a trial: only the station a trial was assigned to records one
    assert not any(uid in ("forged-run", "a" * 36) for t in trials for uid in t.run_uids)
    # every documents record kept opens the run it is named for, and was measured by a station
    kept = sorted((tmp_path / "s.db.documents").glob("*.jsonl"))
    assert kept and {p.stem for p in kept} <= {u for t in trials for u in t.run_uids}
    for path in kept:
        first = json.loads(path.read_text().split("\n", 1)[0])
        assert first["name"] == "start" and first["doc"]["uid"] == path.stem
    log = (tmp_path / "daemon.log").read_text()
    # each peer's first drops in a window are logged one by one, the rest counted in one line
    one_by_one = log.count("dropped a message")
    assert one_by_one < 40 * DROPS_LOGGED
    assert one_by_one + sum(int(n) for n in re.findall(r"dropped (\d+) more messages", log)) > 1000
