"""Messages that are valid but list far more trials than a station can hold cost the daemon little."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq

from closedloop import protocol
from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request
from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, free_port

MANY = list(range(10**6, 10**6 + 100_000))  # as many trial ids as the protocol lets one list hold


def test_a_station_listing_100000_trials_gets_no_flood_of_cancels_and_the_loop_keeps_answering(tmp_path: Path) -> None:
    """Each listed id the daemon did not give the station was answered with a cancel: five such heartbeats held
    the loop 14 s (past the 5 s after which real stations are lost) and wrote 400 000 log lines."""
    store = Store(tmp_path / "s.db")
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [Campaign.from_yaml_text(campaign_yaml("flood", 4))], control=control, lost_after=1000)
    logged: list[int] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(len(record.getMessage()))  # type: ignore[method-assign]
    logger = logging.getLogger("closedloop")
    level, logger.level = logger.level, logging.INFO  # what a daemon's --logfile records
    logger.addHandler(handler)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.serve, args=(stop.is_set,), daemon=True)
    context = zmq.Context()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.ROUTING_ID, b"flooder")
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(daemon.endpoint)
    loop.start()
    try:
        # registered for an instrument no campaign uses: it is given nothing, so it holds nothing of ours
        peer.send(protocol.encode(protocol.Hello(station="flooder", instruments=["nothing:Here"], outstanding=MANY)))
        assert peer.poll(10_000) and protocol.decode(peer.recv()).type in ("welcome", "cancel")
        for _ in range(3):
            peer.send(protocol.encode(protocol.Heartbeat(running=MANY, holds=MANY)))
        time.sleep(1.0)  # the frames are across
        started = time.monotonic()
        assert control_request(control, "health", timeout_s=30)["healthy"]
        answered = time.monotonic() - started
        received = 0
        while peer.poll(500):
            peer.recv()
            received += 1
    finally:
        stop.set()
        loop.join(timeout=60)
        daemon.close()
        peer.close()
        context.term()
        store.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert answered < 3, f"the loop answered health after {answered:.1f} s"
    assert received < 20, f"{received} messages sent back to one peer"
    assert sum(logged) < 100_000, f"{len(logged)} log lines, {sum(logged)} characters"
