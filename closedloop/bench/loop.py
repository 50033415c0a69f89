"""``closedloop bench loop``: what the loop itself costs, how fast it stores results, how busy it keeps stations.

Three measurements, each with real sockets, a real SQLite store and (except intake) real station
processes running real RunEngines:

- **overhead**: one station, zero-latency simulated instrument, a trivial (random) planner, one
  experiment at a time. Overhead per experiment = (wall time - time the station spent inside its
  RunEngine runs) / experiments: dispatch, messages, the station's outbox, result storage and ack.
- **intake**: a station registered with a large capacity answers every assignment at once; results
  stored and acknowledged per second (each acknowledged only after its batch is committed).
- **utilization**: four stations, experiments of ``seconds`` each, the full BoTorch planner.
  Utilization = time stations spent running experiments / (stations x wall time from the first
  dispatch to the last result).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from closedloop import protocol
from closedloop.campaign import Campaign
from simulators.surfaces import branin_campaign


def _campaign(name: str, experiments: int, backend: str, latency: float, concurrency: int) -> Campaign:
    return Campaign.from_yaml_text(branin_campaign(name, experiments, planner={"backend": backend, "seed": 1},
                                                   execution={"concurrency": concurrency},
                                                   options={"latency": latency, "seed": 1}))


def _worker(endpoint: str, name: str, directory: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "closedloop.cli", "worker", "--connect", endpoint, "--name", name,
                             "--outbox", str(directory / f"{name}.outbox"), "--heartbeat", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


class EventClock:
    """Collects the first dispatch, the last result and the stations' busy time from daemon events."""

    def __init__(self) -> None:
        self.first_dispatch: float | None = None
        self.last_result: float | None = None
        self.busy = 0.0
        self.results = 0

    def __call__(self, kind: str, details: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "trial_dispatched" and self.first_dispatch is None:
            self.first_dispatch = now
        elif kind == "trial_completed":
            self.last_result = now
            self.busy += details.get("duration_s") or 0.0
            self.results += 1

    @property
    def wall(self) -> float:
        """Seconds from the first dispatch to the last stored result."""
        assert self.first_dispatch is not None and self.last_result is not None, "no experiment completed"
        return self.last_result - self.first_dispatch


def _generators(directory: Path, campaign: Campaign) -> dict[str, int]:
    from closedloop.store import Store

    store = Store(directory / f"{campaign.name}.db")
    counts: dict[str, int] = {}
    for trial in store.trials(store.campaign_row(campaign.name).id):
        generator = str((trial.planner or {}).get("generator"))
        counts[generator] = counts.get(generator, 0) + 1
    return counts


def _run_with_stations(campaign: Campaign, stations: int, directory: Path) -> tuple[EventClock, float]:
    """Serve ``campaign`` to ``stations`` worker processes; the clock starts once all have registered."""
    from closedloop.daemon import Daemon
    from closedloop.store import Store

    clock = EventClock()
    daemon = Daemon(Store(directory / f"{campaign.name}.db"), [campaign], on_event=clock, heartbeat_s=0.5)
    run = next(iter(daemon.runs.values()))
    run.paused = True
    procs = [_worker(daemon.endpoint, f"bench-{i}", directory) for i in range(stations)]
    try:
        deadline = time.monotonic() + 120
        while len(daemon.stations) < stations:
            if time.monotonic() > deadline:
                raise RuntimeError("the bench stations did not register within 120 s")
            daemon.step(50)
        run.paused = False
        started = time.perf_counter()
        daemon.serve()
        return clock, started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        daemon.close()


def measure_overhead(experiments: int, directory: Path) -> dict[str, float]:
    clock, _ = _run_with_stations(_campaign("overhead", experiments, "random", 0.0, 1), 1, directory)
    wall = clock.wall
    return {"experiments": clock.results, "wall_s": wall, "run_engine_ms": 1000 * clock.busy / clock.results,
            "overhead_ms": 1000 * (wall - clock.busy) / clock.results}


def _intake_daemon(store_path: str, experiments: int, address: Any) -> None:
    from closedloop.daemon import Daemon
    from closedloop.store import Store

    daemon = Daemon(Store(store_path), [_campaign("intake", experiments, "random", 0.0, experiments)],
                    heartbeat_s=5.0)
    address.put(daemon.endpoint)
    daemon.serve()
    daemon.close()


def measure_intake(results: int, directory: Path) -> dict[str, float]:
    """Results/s stored and acknowledged: stations holding ``results`` assignments answer them all at once.

    The daemon runs in its own process (as in production); the stations here are plain DEALER
    sockets, so what is timed is the daemon's intake: decode, validate, store (batched commits),
    acknowledge, tell the planner.
    """
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    proc = ctx.Process(target=_intake_daemon, args=(str(directory / "intake.db"), results, queue), daemon=True)
    proc.start()
    endpoint = queue.get(timeout=120)
    context = zmq.Context()
    per_station = 1000
    socks = []
    for i in range((results + per_station - 1) // per_station):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, f"intake-{i}".encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint)
        sock.send(protocol.encode(protocol.Hello(station=f"intake-{i}", capacity=per_station)))
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    assigned: dict[Any, list[int]] = {sock: [] for sock in socks}
    acked = 0
    dispatch_started = time.perf_counter()

    def drain() -> None:
        nonlocal acked
        if not poller.poll(10_000):
            raise RuntimeError(f"intake bench stalled ({sum(map(len, assigned.values()))} assigned, {acked} acked)")
        for sock in socks:
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if b'"type":"ack"' in frame:  # counting acks is all the station side does while timed
                    acked += 1
                    continue
                message = protocol.decode(frame)
                if isinstance(message, protocol.Assign):
                    assigned[sock].append(message.trial_id)

    beat = 0.0
    try:
        while sum(map(len, assigned.values())) < results:
            drain()
            # once a second, as a station does: one after each wake-up had the daemon answer 18,000 heartbeats
            # while it dispatched 3,000 trials, and it is the dispatch that is timed
            if time.perf_counter() - beat > 1.0:
                beat = time.perf_counter()
                for sock in socks:
                    sock.send(protocol.encode(protocol.Heartbeat()))
        dispatch_s = time.perf_counter() - dispatch_started
        # the results are encoded before the clock starts: what is timed is the daemon's side
        frames = [(sock, protocol.encode(protocol.ResultMessage(
            trial_id=trial_id, run_uid=f"intake-{trial_id}", values={"y": float(trial_id % 97)})))
            for sock, trial_ids in assigned.items() for trial_id in trial_ids]
        started = time.perf_counter()
        for sock, frame in frames:
            sock.send(frame)
        while acked < results:
            drain()
        elapsed = time.perf_counter() - started
    finally:
        for sock in socks:
            sock.close(linger=0)
        context.term()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return {"results": acked, "seconds": elapsed, "results_per_s": acked / elapsed,
            "dispatch_per_s": results / dispatch_s}


def measure_utilization(experiments: int, stations: int, seconds: float, directory: Path) -> dict[str, float]:
    # concurrency counts trials queued on a station ahead of time (one each) as well as running ones
    campaign = _campaign("utilization", experiments, "botorch", seconds, 2 * stations)
    clock, _ = _run_with_stations(campaign, stations, directory)
    wall = clock.wall
    generators = _generators(directory, campaign)
    return {"experiments": clock.results, "wall_s": wall, "busy_s": clock.busy,
            "utilization": clock.busy / (stations * wall), "filler": generators.get("filler", 0),
            "model": sum(n for g, n in generators.items() if g not in ("filler", "sobol"))}


def main(*, experiments: int = 100, stations: int = 4, seconds: float = 1.0, intake: int = 5000, overhead: int = 200,
         utilization: bool = True, console: Any = None) -> dict[str, dict[str, float]]:
    say = console.print if console is not None else print
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="closedloop-bench-") as tmp:
        directory = Path(tmp)
        o = figures["overhead"] = measure_overhead(overhead, directory)
        say(f"loop overhead: {o['overhead_ms']:.2f} ms per experiment over {o['experiments']:.0f} experiments "
            f"(RunEngine time {o['run_engine_ms']:.2f} ms each, excluded; target < 5 ms)")
        i = figures["intake"] = measure_intake(intake, directory)
        say(f"result intake: {i['results_per_s']:.0f} results/s stored and acknowledged ({i['results']:.0f} results "
            f"in {i['seconds']:.2f} s; target > 2000/s); dispatch {i['dispatch_per_s']:.0f} trials/s")
        if utilization:
            u = figures["utilization"] = measure_utilization(experiments, stations, seconds, directory)
            say(f"station utilization: {100 * u['utilization']:.1f} % ({stations} stations, {seconds:g} s experiments, "
                f"{u['experiments']:.0f} experiments, BoTorch planner, wall {u['wall_s']:.1f} s; target > 95 %); "
                f"{u['model']:.0f} model proposals, {u['filler']:.0f} space-filling while the model was fitting")
    return figures


if __name__ == "__main__":
    main(utilization="--quick" not in sys.argv)
