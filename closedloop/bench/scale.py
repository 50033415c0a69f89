"""``closedloop bench scale``: how the loop grows beyond one machine.

Two measurements, each through the whole loop (real daemon, real ZeroMQ sockets on loopback, a real
SQLite store, the random planner so that the planner is not what is measured):

- **dask**: ``experiments`` cheap computational experiments (:func:`cheap`: ``seconds`` of work each)
  on a Dask ``LocalCluster`` of ``workers`` worker processes with one thread each, through a
  :class:`closedloop.compute.ComputeStation`. Reports throughput (experiments/s) and the fraction
  of time the workers were busy: time spent inside experiments (measured on the workers) /
  (workers x wall time from the first dispatch to the last stored result). Dask alone
  (``client.map`` of the same experiments, no loop) is measured too, for comparison.
- **stations**: the daemon serving 1, 8 and 32 simulated stations, each a separate process with a
  DEALER socket that answers every assignment at once with a result (zero-duration experiments), so
  every second of wall time is the loop's overhead. Reports throughput, wall time per experiment
  (the daemon's cost of one experiment: dispatch, store, ack) and the round trip each station waits
  per experiment (stations x wall / experiments).

Run: ``closedloop bench scale`` (about a minute on two cores), or ``python -m closedloop.bench.scale``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from closedloop.bench.loop import EventClock
from closedloop.campaign import Campaign
from simulators.surfaces import branin, branin_campaign


def cheap(x1: float, x2: float, seconds: float = 0.02) -> dict[str, float]:
    """A cheap computational experiment: the Branin function after ``seconds`` of busy work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # CPU work, as a small simulation would do
        pass
    return {"y": branin([x1, x2])}


def _campaign(name: str, experiments: int, concurrency: int, instrument: dict[str, Any]) -> Campaign:
    return Campaign.from_yaml_text(branin_campaign(name, experiments, planner={"backend": "random", "seed": 1},
                                                   execution={"concurrency": concurrency}, instrument=instrument))


def _serve_when_registered(daemon: Any, stations: int, limit_s: float = 180) -> None:
    """Hold dispatch until ``stations`` have registered, so start-up is not counted; then run to the end."""
    run = next(iter(daemon.runs.values()))
    run.paused = True
    deadline = time.monotonic() + limit_s
    while len(daemon.stations) < stations:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(daemon.stations)} of {stations} stations registered in {limit_s:g} s")
        daemon.step(50)
    run.paused = False
    daemon.serve(lambda: time.monotonic() > deadline + limit_s)


def measure_dask(experiments: int = 1000, workers: int = 2, seconds: float = 0.02, in_flight: int = 2,
                 directory: Path | None = None) -> dict[str, float]:
    """The loop running ``experiments`` cheap experiments on a LocalCluster of ``workers`` processes."""
    from closedloop.compute import ComputeStation
    from closedloop.daemon import Daemon
    from closedloop.store import Store

    with tempfile.TemporaryDirectory(prefix="closedloop-scale-") as tmp:
        where = directory or Path(tmp)
        # several experiments per worker in flight (the campaign's concurrency): one running, the others
        # queued at the worker, so a worker never idles while a result travels back through the loop
        concurrency = in_flight * workers
        campaign = _campaign("scale-dask", experiments, concurrency,
                             {"function": "closedloop.bench.scale:cheap", "options": {"seconds": seconds}})
        clock = EventClock()
        store = Store(where / "dask.db")
        daemon = Daemon(store, [campaign], on_event=clock, heartbeat_s=1.0)
        station = ComputeStation(daemon.endpoint, name="scale-compute", capacity=concurrency, local_workers=workers,
                                 local_threads=1, processes=True, outbox=where / "dask.outbox", heartbeat_s=1.0)
        stop = threading.Event()
        thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
        thread.start()
        try:
            _serve_when_registered(daemon, 1)
            # the daemon answers the station meanwhile: silent for the 10 s this takes, it had the station say "no
            # word from the daemon ... reconnecting", and guess at keys and releases, in the middle of the figures
            baseline: dict[str, float] = {}
            measuring = threading.Thread(target=lambda: baseline.update(_dask_alone(station, experiments, seconds)),
                                         daemon=True)
            measuring.start()
            while measuring.is_alive():
                daemon.step(50)
            if not baseline:
                raise RuntimeError("the experiments straight on Dask did not finish (its log says why)")
        finally:
            stop.set()
            thread.join(timeout=60)
            daemon.close()
            store.close()
        busy = sum(end - start for start, end in station.spans)
        return {"experiments": clock.results, "workers": workers, "seconds_each": seconds, "wall_s": clock.wall,
                "in_flight_per_worker": in_flight, "throughput_per_s": clock.results / clock.wall, "busy_fraction": busy / (workers * clock.wall),
                "dask_alone_wall_s": baseline["wall_s"], "dask_alone_per_s": baseline["per_s"],
                "dask_alone_busy_fraction": baseline["busy"] / (workers * baseline["wall_s"])}


def _dask_alone(station: Any, experiments: int, seconds: float) -> dict[str, float]:
    """The same experiments straight on the station's cluster with ``client.map``: Dask's own ceiling."""
    from closedloop.compute import run_experiment

    client = station.client(None)
    targets = ["function:closedloop.bench.scale:cheap"] * experiments
    setpoints = [{"x1": 1.0 + i * 1e-6, "x2": 2.0} for i in range(experiments)]
    started = time.perf_counter()
    futures = client.map(run_experiment, targets, setpoints, [{"seconds": seconds}] * experiments,
                         [["y"]] * experiments, pure=False)
    outcomes = client.gather(futures)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "per_s": experiments / wall,
            "busy": sum(o["finished"] - o["started"] for o in outcomes)}


# -- simulated stations ----------------------------------------------------------------------------


def _station_main(endpoint: str, name: str) -> None:
    """A simulated station (its own process): answers every assignment at once with a result."""
    import zmq

    from closedloop import protocol

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    hello = protocol.encode(protocol.Hello(station=name, capacity=1))
    sock.send(hello)
    last_sent = time.monotonic()
    answered = 0
    while True:
        if sock.poll(200):
            message = protocol.decode(sock.recv())
            if isinstance(message, protocol.Assign):
                answered += 1
                sock.send(protocol.encode(protocol.Started(trial_id=message.trial_id)))
                x1, x2 = message.setpoints["x1"], message.setpoints["x2"]
                sock.send(protocol.encode(protocol.ResultMessage(
                    trial_id=message.trial_id, run_uid=f"{name}-{answered}", values={"y": x1 * x1 + x2},
                    duration_s=0.0)))
                last_sent = time.monotonic()
            elif isinstance(message, protocol.Refused):
                sock.send(hello)
        if time.monotonic() - last_sent > 0.5:
            sock.send(protocol.encode(protocol.Heartbeat()))
            last_sent = time.monotonic()


def measure_stations(stations: int, experiments: int, directory: Path | None = None) -> dict[str, float]:
    """The daemon serving ``stations`` simulated stations (separate processes) zero-duration experiments."""
    from closedloop.daemon import Daemon
    from closedloop.store import Store

    with tempfile.TemporaryDirectory(prefix="closedloop-scale-") as tmp:
        where = directory or Path(tmp)
        campaign = _campaign(f"scale-{stations}", experiments, stations,
                             {"simulator": "simulators.surfaces:Branin"})
        clock = EventClock()
        store = Store(where / f"stations-{stations}.db")
        daemon = Daemon(store, [campaign], on_event=clock, heartbeat_s=1.0)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "closedloop.bench.scale", "_station", daemon.endpoint,
                                   f"sim-{i:02d}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(stations)]
        try:
            _serve_when_registered(daemon, stations)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            daemon.close()
            store.close()
        wall = clock.wall
        return {"stations": stations, "experiments": clock.results, "wall_s": wall,
                "throughput_per_s": clock.results / wall, "wall_per_experiment_ms": 1000 * wall / clock.results,
                "station_round_trip_ms": 1000 * stations * wall / clock.results}


def main(*, experiments: int = 1000, workers: int = 2, seconds: float = 0.02, station_counts: tuple[int, ...] = (1, 8, 32),
         station_experiments: int = 600, console: Any = None, output: Path | None = None) -> dict[str, Any]:
    say = console.print if console is not None else print
    figures: dict[str, Any] = {}
    d = figures["dask"] = measure_dask(experiments, workers, seconds)
    say(f"dask: {d['experiments']} experiments of {1000 * seconds:g} ms on a LocalCluster of {workers} workers in "
        f"{d['wall_s']:.1f} s: {d['throughput_per_s']:.1f} experiments/s, workers busy {100 * d['busy_fraction']:.1f} % "
        f"(Dask alone: {d['dask_alone_per_s']:.1f}/s, busy {100 * d['dask_alone_busy_fraction']:.1f} %)")
    figures["stations"] = []
    for n in station_counts:
        s = measure_stations(n, station_experiments)
        figures["stations"].append(s)
        say(f"daemon with {n:>2} simulated stations: {s['experiments']} experiments in {s['wall_s']:.2f} s, "
            f"{s['throughput_per_s']:.0f}/s; {s['wall_per_experiment_ms']:.2f} ms of daemon time per experiment, "
            f"{s['station_round_trip_ms']:.1f} ms round trip per experiment at each station")
    if output is not None:
        output.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_station":
        _station_main(sys.argv[2], sys.argv[3])
    else:
        main()
