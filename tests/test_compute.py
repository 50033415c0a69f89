"""Computational experiments on Dask: real LocalClusters, real sockets, real SQLite stores, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from closedloop import protocol
from closedloop.campaign import Campaign
from closedloop.compute import ComputeError, ComputeStation, command_argv, parse_outputs, run_experiment
from closedloop.daemon import Daemon, run_embedded
from closedloop.store import Store
from tests.daemon.procs import (CLI, check_one_run_then_handed_back, env, free_port, kill9, receive,
                                sigterm_mid_run, start_compute_station, start_daemon, wait_for)

# -- experiments the tests run (imported by Dask workers as tests.test_compute:NAME) ---------------


def quadratic(x1: float, x2: float, offset: float = 0.0) -> dict[str, float]:
    return {"y": (x1 - 0.3) ** 2 + (x2 - 0.6) ** 2 + offset, "unused": 1.0}


def dies_once(x1: float, x2: float, marker: str) -> dict[str, float]:
    """Kills its own worker process the first time it runs, then behaves."""
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(17)
    return quadratic(x1, x2)


def logs_then_crashes(x1: float, x2: float, log: str) -> dict[str, float]:
    """Writes its point to ``log`` each time it runs, then kills its worker process where x1 > 0.5."""
    with open(log, "a") as f:
        f.write(f"{x1!r} {x2!r}\n")
    if x1 > 0.5:
        os._exit(17)
    return quadratic(x1, x2)


def waits_for(x1: float, x2: float, release: str) -> dict[str, float]:
    """Answers once the test creates the file ``release`` (at the latest after 30 s)."""
    deadline = time.time() + 30
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)
    return quadratic(x1, x2)


def hangs_once(x1: float, x2: float, marker: str) -> dict[str, float]:
    """Never answers in time the first time it runs (until the test releases it), then behaves."""
    if not os.path.exists(marker):
        Path(marker).write_text("hung")
        return waits_for(x1, x2, marker + ".release")
    return quadratic(x1, x2)


def hangs_the_first(x1: float, x2: float, marker: str, times: int, release: str = "") -> dict[str, float]:
    """Sleeps far past any timeout on its first ``times`` calls (counted in files, so in any worker process), or
    until the test creates the file ``release``: a thread worker's thread outlives the test otherwise."""
    for call in range(times):
        try:
            os.close(os.open(f"{marker}-{call}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if release:
            return waits_for(x1, x2, release)
        time.sleep(10**6)
    return quadratic(x1, x2)


def returns_nan(x1: float, x2: float) -> dict[str, float]:
    return {"y": float("nan")}


def returns_huge(x1: float, x2: float) -> dict[str, int]:
    """An exact count past float's range, as Python's integers hold it."""
    return {"y": 10**400}


def takes(x1: float, x2: float, seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return quadratic(x1, x2)


def two_objectives(x1: float, x2: float, seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return {"y": (x1 - 0.3) ** 2 + (x2 - 0.6) ** 2, "z": (x1 - 0.7) ** 2 + x2 ** 2}


def returns_numpy(x1: float, x2: float) -> dict[str, object]:
    """A simulation's outputs as numpy computes them: numpy.float32 and numpy.int64, not Python numbers."""
    import numpy as np

    return {"y": np.float32(x1) + np.float32(x2), "n": np.int64(3)}


def raises(x1: float, x2: float) -> dict[str, float]:
    raise ValueError("mesh did not converge")


def exits(x1: float, x2: float) -> dict[str, float]:
    sys.exit(3)


def raises_once(x1: float, x2: float, marker: str) -> dict[str, float]:
    """Fails the first time it runs, then behaves."""
    if not os.path.exists(marker):
        Path(marker).write_text("raised")
        raise ValueError("mesh did not converge")
    return quadratic(x1, x2)


SCRIPT = "import json, sys; x1, x2 = float(sys.argv[1]), float(sys.argv[2]); print('log line'); " \
         "print(json.dumps({'y': x1 + 10 * x2}))"


def campaign(name: str, instrument: str, experiments: int = 6, concurrency: int = 2, timeout: str | None = None,
             retries: int = 0) -> Campaign:
    execution = f"execution: {{concurrency: {concurrency}, retries: {retries}" + (f", timeout: {timeout}}}" if timeout
                                                                                    else "}")
    return Campaign.from_yaml_text(f"""
name: {name}
parameters:
  x1: {{type: continuous, bounds: [0, 1]}}
  x2: {{type: continuous, bounds: [0, 1]}}
objectives:
  y: {{goal: minimize}}
budget: {{experiments: {experiments}}}
{execution}
planner: {{backend: sobol, seed: 3}}
instrument: {instrument}
""")


def serve(daemon: Daemon, station: ComputeStation, limit_s: float = 90) -> None:
    """Run the daemon here and the station in a thread until the campaign ends (or the limit).

    A station that dies ends the wait at once, and its exception is raised here, not lost in its thread.
    """
    stop = threading.Event()
    station_failed: list[BaseException] = []

    def run_station() -> None:
        try:
            station.run(stop)
        except BaseException as exc:
            station_failed.append(exc)

    thread = threading.Thread(target=run_station, daemon=True)
    thread.start()
    deadline = time.monotonic() + limit_s
    try:
        daemon.serve(lambda: time.monotonic() > deadline or not thread.is_alive())
    finally:
        stop.set()
        thread.join(timeout=30)
        daemon.close()
    if station_failed:
        raise station_failed[0]
    assert time.monotonic() <= deadline, "the campaign did not finish in time"


# -- the pieces --------------------------------------------------------------------------------------


def test_command_arguments_are_split_before_filling_so_values_never_reach_a_shell() -> None:
    argv = command_argv("sim --x {x1} --label {label}", {"x1": 0.25, "label": "a b; rm -rf /"})
    assert argv == ["sim", "--x", "0.25", "--label", "a b; rm -rf /"]
    with pytest.raises(ComputeError, match="no parameter or option 'x2'"):
        command_argv("sim {x2}", {"x1": 1})


def test_outputs_are_the_last_json_object_line_of_stdout() -> None:
    assert parse_outputs('starting\n{"y": 1}\nprogress 50%\n{"y": 2.5, "z": 3}\n') == {"y": 2.5, "z": 3}
    with pytest.raises(ComputeError, match="no JSON object"):
        parse_outputs("done\n[1, 2]\n")


def test_a_function_experiment_returns_the_campaign_outputs_only() -> None:
    out = run_experiment("function:tests.test_compute:quadratic", {"x1": 0.3, "x2": 0.6}, {"offset": 2.0,
                         "scheduler": "ignored"}, ["y"])
    assert out["values"] == {"y": pytest.approx(2.0)}
    assert out["finished"] >= out["started"]
    with pytest.raises(ComputeError, match="output 'z' missing"):
        run_experiment("function:tests.test_compute:quadratic", {"x1": 0, "x2": 0}, {}, ["z"])
    with pytest.raises(ComputeError, match="not a finite number"):
        run_experiment("function:tests.test_compute:returns_nan", {"x1": 0, "x2": 0}, {}, ["y"])
    with pytest.raises(ComputeError, match="cannot import"):
        run_experiment("function:no_such_module_here:f", {}, {}, ["y"])


def test_a_command_experiment_runs_a_real_program_and_reports_its_failures(tmp_path: Path) -> None:
    script = tmp_path / "sim.py"
    script.write_text(SCRIPT.replace("; ", "\n"))
    target = f"command:{sys.executable} {script} {{x1}} {{x2}}"
    assert run_experiment(target, {"x1": 1.0, "x2": 0.5}, {}, ["y"])["values"] == {"y": 6.0}
    failing = f"command:{sys.executable} -c 'import sys; sys.exit(\"bad input {{x1}}\")'"
    with pytest.raises(ComputeError, match="exited with status 1: bad input 0.5"):
        run_experiment(failing, {"x1": 0.5}, {}, ["y"])
    slow = f"command:{sys.executable} -c 'import time; time.sleep(30)'"
    with pytest.raises(ComputeError, match="killed"):
        run_experiment(slow, {}, {}, ["y"], timeout_s=0.5)


def test_a_functions_numpy_numbers_are_outputs_and_its_failures_name_it() -> None:
    out = run_experiment("function:tests.test_compute:returns_numpy", {"x1": 0.25, "x2": 0.5}, {}, ["y", "n"])
    assert out["values"] == {"y": 0.75, "n": 3.0} and all(type(v) is float for v in out["values"].values())
    with pytest.raises(ComputeError, match="function tests.test_compute:raises raised ValueError: mesh did not conv"):
        run_experiment("function:tests.test_compute:raises", {"x1": 0, "x2": 0}, {}, ["y"])
    with pytest.raises(ComputeError, match=r"output y=nan of function tests.test_compute:returns_nan is not a finite"):
        run_experiment("function:tests.test_compute:returns_nan", {"x1": 0, "x2": 0}, {}, ["y"])
    # it had raised OverflowError (int too large to convert to float), and Dask logged its traceback
    with pytest.raises(ComputeError, match=r"output y=1000\d+ of function tests.test_compute:returns_huge is not a fin"):
        run_experiment("function:tests.test_compute:returns_huge", {"x1": 0, "x2": 0}, {}, ["y"])
    with pytest.raises(ComputeError, match="output 'z' missing from the outputs of function tests.test_compute:quad"):
        run_experiment("function:tests.test_compute:quadratic", {"x1": 0, "x2": 0}, {}, ["z"])
    with pytest.raises(ComputeError, match="command 'echo' printed no JSON object"):
        run_experiment("command:echo not json {x1}", {"x1": 0.5}, {}, ["y"])
    # it ended the Dask worker's process: reported as a lost worker, after a restart, with its traceback
    with pytest.raises(ComputeError, match=r"function tests.test_compute:exits called sys.exit\(3\)"):
        run_experiment("function:tests.test_compute:exits", {"x1": 0, "x2": 0}, {}, ["y"])


def test_a_failed_experiment_is_one_line_not_a_dask_traceback(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Dask's worker processes logged every exception of a task with its traceback ("Compute Failed"), several lines
    on the terminal of `closedloop run` for each failed experiment."""
    c = campaign("fails", '{function: "tests.test_compute:raises"}', experiments=2, concurrency=1)
    store = Store(tmp_path / "s.db")
    run = run_embedded(c, store, outbox=str(tmp_path / "o.db"))
    trials = store.trials(run.id)
    assert [t.status for t in trials] == ["failed"] * 2
    assert trials[0].error == "function tests.test_compute:raises raised ValueError: mesh did not converge"
    printed = capfd.readouterr().err  # the worker processes write to this process's stderr
    assert "Compute Failed" not in printed and "Traceback" not in printed, printed[-2000:]
    store.close()


def test_a_command_killed_at_its_timeout_takes_the_programs_it_started_with_it(tmp_path: Path) -> None:
    # a wrapper script (as on a cluster: run.sh -> the solver): the shell waits for its child, it does not exec it
    solver = tmp_path / "solver.pid"
    script = tmp_path / "run.sh"
    script.write_text(f"{sys.executable} -c 'import os, time; open(\"{solver}\", \"w\").write(str(os.getpid())); "
                      f"time.sleep(60)'\necho '{{\"y\": 1}}'\n")
    started = time.monotonic()
    with pytest.raises(ComputeError, match="still running after 2 s; killed"):
        run_experiment(f"command:sh {script}", {}, {}, ["y"], timeout_s=2)
    assert time.monotonic() - started < 10
    assert_ends(int(solver.read_text()), "the solver the command started runs on after the command was killed at "
                                         "its timeout")


def assert_ends(pid: int, why: str, within_s: float = 5) -> None:
    """Fails with ``why`` (killing the process) unless process ``pid`` ends (or is a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return  # killed, waiting for its new parent to reap it
        except FileNotFoundError:
            return
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, 9)
        raise AssertionError(why)


def test_a_command_that_leaves_a_program_running_answers_when_it_exits_and_the_program_is_killed(
        tmp_path: Path) -> None:
    """A command that started a helper in the background and exited waited for the helper, which held its output
    pipe: 'still running after 5 s; killed' though it had printed its outputs, and the helper ran on."""
    helper = tmp_path / "helper.pid"
    script = tmp_path / "run.sh"
    script.write_text(f"{sys.executable} -c 'import os, time; open(\"{helper}\", \"w\").write(str(os.getpid())); "
                      f"time.sleep(60)' &\nwhile [ ! -s {helper} ]; do sleep 0.05; done\necho '{{\"y\": 1}}'\n")
    started = time.monotonic()
    assert run_experiment(f"command:sh {script}", {}, {}, ["y"], timeout_s=5)["values"] == {"y": 1.0}
    assert time.monotonic() - started < 4
    assert_ends(int(helper.read_text()), "the program the command left running runs on after its experiment")


def test_a_command_crashed_by_a_signal_or_printing_latin1_is_reported_as_such() -> None:
    crash = f"command:{sys.executable} -c 'import os, signal, sys; sys.stderr.write(\"core dumped\"); " \
            "os.kill(os.getpid(), signal.SIGSEGV)'"
    with pytest.raises(ComputeError, match=r"was killed by SIGSEGV: core dumped$"):  # not 'exited with status -11'
        run_experiment(crash, {}, {}, ["y"])
    # a log line with a Latin-1 degree sign failed the experiment with a bare UnicodeDecodeError
    latin1 = f"command:{sys.executable} -c 'import sys; sys.stdout.buffer.write(b\"T=300\\xb0C\\n{{{{\\\"y\\\": 2}}}}\\n\")'"
    assert run_experiment(latin1, {}, {}, ["y"])["values"] == {"y": 2.0}


def test_a_command_running_when_its_dask_worker_closes_is_killed_with_everything_it_started(
        tmp_path: Path) -> None:
    """Ctrl-C stops a compute station at once, closing its Dask cluster: the command it was computing, and the
    solver its wrapper script started, ran on to their end beside the daemon's retry of the trial elsewhere."""
    solver = tmp_path / "solver.pid"
    script = tmp_path / "run.sh"
    script.write_text(f"{sys.executable} -c 'import os, time; open(\"{solver}\", \"w\").write(str(os.getpid())); "
                      f"time.sleep(60)'\necho '{{\"y\": 1}}'\n")
    station = ComputeStation("tcp://127.0.0.1:1", name="closing", capacity=1, processes=False, local_workers=1,
                             outbox=tmp_path / "o.db")
    try:
        future = station.client().submit(run_experiment, f"command:sh {script}", {}, {}, ["y"], 60, pure=False)
        wait_for(lambda: solver.exists() and solver.read_text(), 30, "the solver to start")
        future.cancel()
    finally:
        station.close()
        station.outbox.close()
    assert_ends(int(solver.read_text()), "the solver runs on after its station's Dask cluster closed")


def test_a_campaign_file_accepts_function_and_command_instruments() -> None:
    c = campaign("f", '{function: "tests.test_compute:quadratic", options: {offset: 1}}')
    assert c.instrument.computational and c.instrument.target == "function:tests.test_compute:quadratic"
    assert Campaign.from_yaml_text(c.to_yaml()) == c
    c = campaign("c", '{command: "python sim.py --x {x1} --y {x2} --basis {basis}", options: {basis: sto-3g}}')
    assert c.instrument.target.startswith("command:python sim.py")
    with pytest.raises(Exception, match=r"unknown placeholder \{x3\}"):
        campaign("bad", '{command: "python sim.py {x3}"}')
    with pytest.raises(Exception, match="exactly one of"):
        campaign("two", '{function: "a.b:c", simulator: "a.b:d"}')


# -- whole campaigns ---------------------------------------------------------------------------------


def test_closedloop_run_uses_a_compute_station_for_a_function_campaign(tmp_path: Path) -> None:
    c = campaign("fn", '{function: "tests.test_compute:quadratic", options: {offset: 1.0}}', experiments=6,
                 concurrency=3)
    store = Store(tmp_path / "s.db")
    run = run_embedded(c, store, outbox=str(tmp_path / "o.db"))
    trials = store.trials(run.id)
    assert [t.status for t in trials] == ["completed"] * 6
    assert {t.station for t in trials} == {"embedded-compute"}
    for trial in trials:
        expected = quadratic(trial.parameters["x1"], trial.parameters["x2"], 1.0)["y"]
        assert store.observations(run.id)[trial.id].values == {"y": pytest.approx(expected)}
    store.close()


def test_a_command_campaign_runs_experiments_in_parallel_on_dask(tmp_path: Path) -> None:
    script = tmp_path / "sim.py"
    script.write_text("import json, sys, time\ntime.sleep(0.4)\n"
                      "print(json.dumps({'y': float(sys.argv[1]) + 10 * float(sys.argv[2])}))\n")
    c = campaign("cmd", json.dumps({"command": f"{sys.executable} {script} {{x1}} {{x2}}"}), experiments=6,
                 concurrency=3)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=3, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, heartbeat_s=0.5)
    started = time.monotonic()
    serve(daemon, station)
    run_id = store.campaign_row("cmd").id
    trials = store.trials(run_id)
    assert [t.status for t in trials] == ["completed"] * 6
    for trial in trials:
        y = store.observations(run_id)[trial.id].values["y"]
        assert y == pytest.approx(trial.parameters["x1"] + 10 * trial.parameters["x2"])
    # three at a time: the experiments overlapped on the cluster's three threads
    starts = sorted(s for s, _ in station.spans)
    ends = sorted(e for _, e in station.spans)
    assert sum(1 for s in starts if s < ends[0]) >= 2
    assert time.monotonic() - started < 60
    store.close()


def test_a_compute_station_given_the_wrong_daemon_key_says_the_key_may_be_wrong(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A compute station whose --server-key is not the daemon's never completes the CURVE handshake, of which ZeroMQ
    says nothing: it logged nothing at all while it never registered."""
    import logging
    import shutil

    from closedloop.keys import ClientKeys, ServerKeys, new_keypair

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("daemon", "cluster", "stranger"):
        new_keypair(keys, name)
    allowed.mkdir()
    shutil.copy(keys / "cluster.key", allowed / "cluster.key")
    c = campaign("keyed", json.dumps({"function": "tests.test_compute:quadratic"}), experiments=2)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.2, keys=ServerKeys(keys / "daemon.key_secret", allowed))
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, heartbeat_s=0.2, keys=ClientKeys(keys / "cluster.key_secret",
                                                                               keys / "stranger.key"))
    stop = threading.Event()
    threads = [threading.Thread(target=daemon.serve, args=(stop.is_set,), daemon=True),
               threading.Thread(target=station.run, args=(stop,), daemon=True)]
    with caplog.at_level(logging.WARNING, "closedloop.compute"):
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("not registered" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    daemon.close()
    assert not any(t.status == "completed" for t in store.trials(store.campaign_row("keyed").id))  # it never ran one
    store.close()
    said = [r.getMessage() for r in caplog.records if "not registered" in r.getMessage()]
    assert said and "the --server-key may not be the daemon's public key" in said[0], caplog.text


def test_a_hung_experiment_times_out_and_is_retried_by_the_campaign_policy(tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    c = campaign("hang", json.dumps({"function": "tests.test_compute:hangs_once", "options": {"marker": str(marker)}}),
                 experiments=2, concurrency=1, timeout="2 s", retries=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    # two threads: the hung first attempt keeps one busy until released (a thread cannot be interrupted), and
    # keeps the station's slot till then, released here at 4 s rather than after waits_for's 30 s
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, local_threads=2, heartbeat_s=0.5)
    release = threading.Timer(4.0, lambda: Path(str(marker) + ".release").write_text("go"))
    release.start()
    try:
        serve(daemon, station)
    finally:
        release.cancel()
        Path(str(marker) + ".release").write_text("go")
    trials = store.trials(store.campaign_row("hang").id)
    assert [t.status for t in trials] == ["completed", "completed"]
    assert trials[0].attempts == 2 and "timed out" in (trials[0].error or "timed out")
    store.close()


def test_a_retry_waits_for_the_timed_out_function_to_give_back_its_thread_instead_of_timing_out_unrun(
        tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    c = campaign("slot", json.dumps({"function": "tests.test_compute:hangs_once", "options": {"marker": str(marker)}}),
                 experiments=1, concurrency=1, timeout="2 s", retries=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    # one Dask thread, as many as the station's capacity: the hung first attempt holds it until released at 6 s
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, local_threads=1, heartbeat_s=0.5)
    release = threading.Timer(6.0, lambda: Path(str(marker) + ".release").write_text("go"))
    release.start()
    try:
        serve(daemon, station)
    finally:
        release.cancel()
        Path(str(marker) + ".release").write_text("go")
    (trial,) = store.trials(store.campaign_row("slot").id)
    # before, the retry was handed to Dask at once, waited behind the hung call with its own 2 s running, and failed
    # 'timed out' without having run
    assert trial.status == "completed" and trial.attempts == 2, trial.error
    store.close()


@pytest.mark.slow
def test_a_worker_lost_mid_experiment_fails_the_trial_and_the_retry_policy_decides(tmp_path: Path) -> None:
    for retries, expected in ((1, "completed"), (0, "failed")):
        marker = tmp_path / f"died-{retries}"
        c = campaign(f"lost{retries}", json.dumps({"function": "tests.test_compute:dies_once",
                                                    "options": {"marker": str(marker)}}),
                     experiments=1, concurrency=1, retries=retries)
        store = Store(tmp_path / f"s{retries}.db")
        daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
        station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / f"o{retries}.db",
                                 processes=True, local_workers=1, heartbeat_s=0.5)
        serve(daemon, station, limit_s=120)
        (trial,) = store.trials(store.campaign_row(f"lost{retries}").id)
        assert trial.status == expected, trial.error
        if expected == "failed":
            assert "worker" in (trial.error or "") and "lost" in (trial.error or "")
        else:
            assert trial.attempts == 2
        store.close()


def test_a_finished_experiment_is_not_computed_again_when_its_worker_process_dies_later(tmp_path: Path) -> None:
    """The station kept the last finished future referenced (its loop's variable) until the next one finished:
    when the worker process holding that future's result died (the next experiment crashed it, a node was lost),
    Dask computed the finished experiment again, unasked (measured: 3 of 16 points run twice, one three times)."""
    log = tmp_path / "calls.txt"
    c = campaign("again", json.dumps({"function": "tests.test_compute:logs_then_crashes",
                                      "options": {"log": str(log)}}), experiments=8, concurrency=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db",
                             processes=True, local_workers=2, heartbeat_s=0.5)
    serve(daemon, station, limit_s=150)
    trials = store.trials(store.campaign_row("again").id)
    crashed = [t for t in trials if t.parameters["x1"] > 0.5]
    assert len(trials) == 8 and crashed and len(crashed) < 8  # both kinds ran, so a finished one could be lost
    time.sleep(3)  # a recomputation started by the last crash has begun by now
    calls = log.read_text().splitlines()
    assert len(calls) == len(set(calls)) == 8, calls
    store.close()


@pytest.mark.slow  # two timeouts, the grace and two worker restarts: 25 to 40 s each
@pytest.mark.parametrize("capacity", [1, 2])
def test_hung_functions_have_their_worker_processes_restarted_so_the_campaign_completes(
        tmp_path: Path, capacity: int) -> None:
    """Two calls of a function that never return, at a station of capacity 1 (one worker process, restarted twice
    within 15 s) or 2 (both slots hung at once): each is cancelled at its 8 s timeout (a fresh worker process took
    3 s to import this module, and a retry 5 s, on a loaded machine), and once it has not returned within the grace
    its worker process is restarted, freeing the slot for the retries. Before, the station kept the slots until the functions returned
    (never) and the campaign stalled; and a worker restarted again while the cluster's check of its previous restart
    was due (15 s after) was closed for good, leaving no worker."""
    marker = tmp_path / "hung"
    c = campaign("stall", json.dumps({"function": "tests.test_compute:hangs_the_first",
                                      "options": {"marker": str(marker), "times": 2}}),
                 experiments=4, concurrency=capacity, timeout="8 s", retries=2)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=capacity, outbox=tmp_path / "o.db",
                             processes=True, heartbeat_s=0.5)
    serve(daemon, station, limit_s=120)
    trials = store.trials(store.campaign_row("stall").id)
    assert [t.status for t in trials] == ["completed"] * 4, [t.error for t in trials]
    assert sum(t.attempts for t in trials) == 6  # two hung calls, each followed by a retry
    # the cancelled runs' ends are no failures of anyone's: nothing was reported for them
    assert station.failed == 0 and station.completed == 4
    store.close()


@pytest.mark.slow  # a process cluster's start and a worker restart: about 15 s
def test_an_experiment_sharing_the_restarted_process_of_a_hung_function_is_reported_failed_saying_why(
        tmp_path: Path, free_port: int) -> None:
    """With two threads in one worker process (--workers 1, --capacity 2), the restart that ends a hung function takes
    the experiment running beside it: that one is answered with a failure naming the cause, for the retry policy,
    and the hung one's trial (already recorded timed out by the daemon) gets no answer."""
    endpoint = f"tcp://127.0.0.1:{free_port}"
    context = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    daemon.setsockopt(zmq.LINGER, 0)
    daemon.bind(endpoint)
    # this stand-in for the daemon answers no heartbeat: a station reconnects (and its answers wait for a welcome) after
    # ten heartbeats without word, 10 s at 1 s, which a fresh worker process importing this module outlasted in CI
    station = ComputeStation(endpoint, name="cluster", capacity=2, outbox=tmp_path / "o.db", processes=True,
                             local_workers=1, local_threads=2, heartbeat_s=10.0, context=context)
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    released = tmp_path / "release"

    def assign(trial: int, function: str, options: dict[str, object]) -> protocol.Assign:
        return protocol.Assign(campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 0.3, "x2": 0.6},
                               outputs=["y"], instrument=protocol.InstrumentSpec(
                                   target=f"function:tests.test_compute:{function}", options=options))

    try:
        identity, _ = receive(daemon, protocol.Hello, limit_s=60)
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=10.0))])
        daemon.send_multipart([identity, protocol.encode(
            assign(1, "hangs_the_first", {"marker": str(tmp_path / "hung"), "times": 1}))])
        daemon.send_multipart([identity, protocol.encode(assign(2, "waits_for", {"release": str(released)}))])
        receive(daemon, protocol.Started)
        receive(daemon, protocol.Started)
        wait_for(lambda: (tmp_path / "hung-0").exists(), 30, "the hung function to start")
        daemon.send_multipart([identity, protocol.encode(protocol.Cancel(trial_id=1, reason="timed out"))])
        _, failure = receive(daemon, protocol.Failure, limit_s=30)
        assert failure.trial_id == 2
        assert "restarted to end the hung function of timed-out trial 1" in failure.error, failure.error
        daemon.send_multipart([identity, protocol.encode(protocol.Ack(trial_id=2))])  # a stop then waits for no ack
        # the slots are free again: a new experiment runs on the fresh process
        daemon.send_multipart([identity, protocol.encode(assign(3, "quadratic", {}))])
        # the fresh process imports this module first: past 30 s beside four other test processes on two cores
        _, result = receive(daemon, protocol.ResultMessage, limit_s=90)
        assert result.trial_id == 3 and station.failed == 1
        daemon.send_multipart([identity, protocol.encode(protocol.Ack(trial_id=3))])
    finally:
        released.touch()
        stop.set()
        thread.join(timeout=30)
        daemon.close()
        context.destroy(linger=0)


def test_on_thread_workers_a_hung_function_keeps_its_slot_and_the_station_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A thread cannot be stopped and the station restarts no worker process it does not have: it warns, once."""
    import logging

    marker, freed = tmp_path / "hung", tmp_path / "release"
    c = campaign("held", json.dumps({"function": "tests.test_compute:hangs_the_first",
                                     "options": {"marker": str(marker), "times": 2, "release": str(freed)}}),
                 experiments=3, concurrency=2, timeout="1 s", retries=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0)
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=2, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, local_threads=2, heartbeat_s=0.5)
    # both slots held by the two hung calls (past the grace a process worker would have been restarted) until 5 s
    release = threading.Timer(5.0, freed.touch)
    release.start()
    try:
        with caplog.at_level(logging.WARNING, "closedloop.compute"):
            serve(daemon, station)
    finally:
        release.cancel()
        freed.touch()
    assert [t.status for t in store.trials(store.campaign_row("held").id)] == ["completed"] * 3
    store.close()
    said = [r.getMessage() for r in caplog.records if "cannot be stopped" in r.getMessage()]
    assert len(said) == 1 and "thread" in said[0] and "keeps its slot" in said[0], caplog.text


def test_a_result_is_kept_in_the_outbox_until_acknowledged_and_offered_again_after_reconnect(
    tmp_path: Path, free_port: int
) -> None:
    """A daemon stand-in on a real ROUTER socket: it takes the result, dies before the ack, comes back."""
    endpoint = f"tcp://127.0.0.1:{free_port}"
    context = zmq.Context()

    def router() -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        for _ in range(100):  # the closed socket's port is released asynchronously
            try:
                sock.bind(endpoint)
                return sock
            except zmq.ZMQError:
                time.sleep(0.05)
        raise AssertionError(f"cannot bind {endpoint} again")

    daemon = router()
    outbox = tmp_path / "o.db"
    station = ComputeStation(endpoint, name="cluster", capacity=1, outbox=outbox, processes=False, local_workers=1,
                             heartbeat_s=0.3, context=context)
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    try:
        identity, hello = receive(daemon, protocol.Hello, refuse_heartbeats=True)
        assert hello.capacity == 1 and hello.outstanding == []
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=0.3))])
        assign = protocol.Assign(campaign="c", trial_id=41, trial_index=1, setpoints={"x1": 0.3, "x2": 0.6},
                                 outputs=["y"], instrument=protocol.InstrumentSpec(
                                     target="function:tests.test_compute:quadratic", options={"offset": 5.0}))
        daemon.send_multipart([identity, protocol.encode(assign)])
        _, result = receive(daemon, protocol.ResultMessage, refuse_heartbeats=True)
        assert result.trial_id == 41 and result.values == {"y": pytest.approx(5.0)}
        daemon.close()  # the daemon dies before acknowledging

        daemon = router()  # ... and restarts: the station registers again, still holding trial 41
        identity, hello = receive(daemon, protocol.Hello, refuse_heartbeats=True)
        assert hello.outstanding == [41]
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=0.3))])
        _, again = receive(daemon, protocol.ResultMessage, refuse_heartbeats=True)
        assert (again.trial_id, again.run_uid, again.values) == (41, result.run_uid, result.values)
        # an assign of the same trial is answered from the outbox, never run twice
        daemon.send_multipart([identity, protocol.encode(assign)])
        _, third = receive(daemon, protocol.ResultMessage, refuse_heartbeats=True)
        assert third.run_uid == result.run_uid and station.completed == 1
        daemon.send_multipart([identity, protocol.encode(protocol.Ack(trial_id=41))])
        deadline = time.monotonic() + 10
        while station.outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert station.outbox.pending() == []
    finally:
        stop.set()
        thread.join(timeout=30)
        daemon.close()
        context.destroy(linger=0)


def test_a_cancelled_runs_late_end_does_not_answer_the_trials_next_assignment(tmp_path: Path, free_port: int) -> None:
    """A daemon stand-in cancels a running trial and assigns it to the station again at once.

    Dask reports a future's end through callbacks run one at a time in one thread; while that thread is
    busy (held here for 0.5 s, as a loaded machine may), the cancelled run's end reaches the station after
    the new run has started. Taken for the trial's current run, it blocked the station on the new run
    and, that run still going 5 s later, answered the new assignment with a timeout failure.
    """
    endpoint = f"tcp://127.0.0.1:{free_port}"
    context = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    daemon.setsockopt(zmq.LINGER, 0)
    daemon.bind(endpoint)
    # the stand-in for the daemon answers no heartbeat, and stays silent 7 s below: ten heartbeats' tolerance, 100 s
    station = ComputeStation(endpoint, name="cluster", capacity=2, outbox=tmp_path / "o.db", processes=False,
                             local_workers=2, heartbeat_s=10.0, context=context)
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    first, second = tmp_path / "first.release", tmp_path / "second.release"

    def assign(release: Path) -> protocol.Assign:
        return protocol.Assign(campaign="c", trial_id=7, trial_index=1, setpoints={"x1": 0.3, "x2": 0.6},
                               outputs=["y"], instrument=protocol.InstrumentSpec(
                                   target="function:tests.test_compute:waits_for", options={"release": str(release)}))

    try:
        identity, _ = receive(daemon, protocol.Hello)
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=10.0))])
        daemon.send_multipart([identity, protocol.encode(assign(first))])
        receive(daemon, protocol.Started)
        holding = threading.Event()

        def hold(_: object) -> None:
            holding.set()
            time.sleep(0.5)

        done = station.client().submit(time.sleep, 0, pure=False)
        done.result()
        done.add_done_callback(hold)
        assert holding.wait(10)
        daemon.send_multipart([identity, protocol.encode(protocol.Cancel(trial_id=7, reason="timed out"))])
        again = assign(second)
        daemon.send_multipart([identity, protocol.encode(again)])
        _, started = receive(daemon, protocol.Started)
        assert started.assignment == again.msg_id
        first.touch()  # the cancelled run's function ends (a thread cannot be stopped), freeing its worker
        answers = []
        deadline = time.monotonic() + 7  # past the 0.5 s hold and the 5 s the station waited on the new run
        while time.monotonic() < deadline:
            if daemon.poll(100):
                message = protocol.decode(daemon.recv_multipart()[1])
                if isinstance(message, (protocol.ResultMessage, protocol.Failure)):
                    answers.append(message)
        assert answers == []  # the new run is still going: nothing may answer for it yet
        second.touch()
        _, result = receive(daemon, protocol.ResultMessage)
        assert (result.trial_id, result.assignment) == (7, again.msg_id)
        assert result.values == {"y": pytest.approx(0.0)} and station.failed == 0
        daemon.send_multipart([identity, protocol.encode(protocol.Ack(trial_id=7))])  # a stop then waits for no ack
    finally:
        first.touch()
        second.touch()
        stop.set()
        thread.join(timeout=30)
        daemon.close()
        context.destroy(linger=0)


@pytest.mark.slow
def test_a_compute_station_stopped_mid_experiment_finishes_it_delivers_it_and_hands_back_its_queue(
    tmp_path: Path
) -> None:
    """SIGTERM (systemctl stop, a redeploy) ended the station at once: the daemon declared it lost and ran the
    experiment it was computing again on the other station (computed twice), and the trial waiting behind it
    was lost with the station."""
    c = campaign("stop", json.dumps({"function": "tests.test_compute:takes", "options": {"seconds": 3.0}}),
                 experiments=4, concurrency=4, retries=20)
    (tmp_path / "c.yaml").write_text(c.to_yaml())
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    daemon = start_daemon(tmp_path, endpoint, control)
    stopped, other = (start_compute_station(tmp_path, endpoint, name, "--verbose") for name in ("stopped", "other"))
    log = tmp_path / "daemon.log"
    try:
        # computing one experiment, with the daemon's prefetch waiting behind it
        wait_for(lambda: log.exists() and 'state="started" station="stopped"' in log.read_text()
                 and log.read_text().count('station="stopped" attempt=1') >= 2, 90,
                 "the station to compute an experiment with another assigned behind it")
        sigterm_mid_run(stopped, tmp_path / "stopped.out", leave_within_s=20)
        assert daemon.wait(timeout=180) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, stopped, other):
            kill9(proc)
    # the trial waiting behind the experiment went back to the queue when the station said it was stopping
    check_one_run_then_handed_back(tmp_path, "stop", 4)


@pytest.mark.slow
def test_a_stopped_daemon_takes_back_the_trial_waiting_on_a_compute_station_unstarted(tmp_path: Path) -> None:
    """SIGTERM to the daemon while a compute station computed one experiment with the next waiting behind it: the
    station started that one once a slot was free, after the stop, and the daemon left it 'dispatched' when --drain
    ran out. Now the waiting one is handed back and stored queued, not as an attempt; the one computing finishes."""
    c = campaign("ahead", json.dumps({"function": "tests.test_compute:takes", "options": {"seconds": 3.0}}),
                 experiments=4, concurrency=4, retries=0)
    (tmp_path / "c.yaml").write_text(c.to_yaml())
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    # "started" is logged when the station hands the experiment to its Dask worker, which may still be importing
    # this module: on a loaded machine that and the 3 s took longer than the helper's 5 s --drain
    daemon = start_daemon(tmp_path, endpoint, control, drain_s=60)
    station = start_compute_station(tmp_path, endpoint, "station")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'state="started" station="station"' in log.read_text()
                 and log.read_text().count('station="station" attempt=1') >= 2, 90,
                 "the station to compute an experiment with another assigned behind it")
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait(timeout=90) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, station):
            kill9(proc)
    store = Store(tmp_path / "s.db")
    try:
        trials = store.trials(store.campaign_row("ahead").id)
        assert [(t.index, t.status, t.attempts) for t in trials] == [(1, "completed", 1), (2, "proposed", 0)], (
            log.read_text()[-3000:])
    finally:
        store.close()
    assert 'trial=2 trial_id=2 state="requeued" reason="handed back unstarted: the daemon is stopping"' in (
        log.read_text())


def test_a_compute_station_with_curve_keys_serves_a_daemon_that_requires_them(tmp_path: Path) -> None:
    from closedloop.keys import ClientKeys, ServerKeys, new_keypair

    _, daemon_secret = new_keypair(tmp_path / "daemon", "daemon")
    allowed = tmp_path / "allowed"
    station_public, station_secret = new_keypair(tmp_path / "station", "cluster")
    allowed.mkdir()
    (allowed / "cluster.key").write_bytes(station_public.read_bytes())
    c = campaign("curve", '{function: "tests.test_compute:quadratic"}', experiments=2, concurrency=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.5, reconcile_s=1.0, keys=ServerKeys(daemon_secret, allowed))
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, heartbeat_s=0.5,
                             keys=ClientKeys(station_secret, tmp_path / "daemon" / "daemon.key"))
    serve(daemon, station, limit_s=60)
    assert [t.status for t in store.trials(store.campaign_row("curve").id)] == ["completed", "completed"]
    store.close()


def test_stations_in_one_process_start_their_local_clusters_at_once(tmp_path: Path) -> None:
    """Stations in one process (two labs in CI's shared-store test): none loses its cluster to another's start."""
    stations = [ComputeStation("tcp://127.0.0.1:1", name=f"s{i}", processes=False, local_workers=1, local_threads=1,
                               outbox=tmp_path / f"o{i}.db") for i in range(4)]
    capacities: dict[str, int | BaseException] = {}

    def start(station: ComputeStation) -> None:
        try:
            capacities[station.name] = station.capacity  # asks the station's own LocalCluster, starting it
        except BaseException as exc:
            capacities[station.name] = exc

    threads = [threading.Thread(target=start, args=(s,)) for s in stations]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for s in stations:
            s.close()
    assert capacities == {f"s{i}": 1 for i in range(4)}


def test_a_stations_local_workers_run_no_statistical_profiler(tmp_path: Path) -> None:
    """Dask's profiler calls sys._current_frames() every 10 ms in each worker; in a thread-worker cluster, on
    CPython 3.11, a garbage collection inside that call deadlocked the test process (seen in CI). Off, for both
    kinds of local cluster."""
    for processes in (False, True):
        station = ComputeStation("tcp://127.0.0.1:1", name=f"profile-{processes}", capacity=1, processes=processes,
                                 local_workers=1, outbox=tmp_path / f"o{processes}.db")
        try:
            callbacks = station.client().run(lambda dask_worker: sorted(dask_worker.periodic_callbacks))
        finally:
            station.close()
            station.outbox.close()
        (names,) = callbacks.values()
        assert "heartbeat" in names and "profile" not in names and "profile-cycle" not in names


def test_a_compute_station_that_repeats_its_hello_while_the_daemon_starts_registers_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from closedloop.worker import Outbox
    from tests.daemon.procs import serving

    c = campaign("early", '{function: "tests.test_compute:quadratic"}', experiments=1, concurrency=1)
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [c], heartbeat_s=0.2)  # bound, and not yet reading: a daemon starting
    # an answer the daemon never acknowledged, offered again at each registration
    kept = Outbox(tmp_path / "o.db")
    kept.put(999, protocol.encode(protocol.ResultMessage(trial_id=999, run_uid="r999", values={"y": 1.0})))
    kept.close()
    caplog.set_level(logging.INFO)
    station = ComputeStation(daemon.endpoint, name="cluster", capacity=1, outbox=tmp_path / "o.db", processes=False,
                             local_workers=1, heartbeat_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: station._clients, 30, "the station's Dask cluster")
        time.sleep(0.9)  # the station repeats its unanswered hello every 0.2 s meanwhile: 4 or more hellos wait
        with serving(daemon):
            wait_for(lambda: store.counts(store.campaign_row("early").id).get("completed") == 1, 20, "the experiment")
            time.sleep(0.3)  # the answers to the repeated hellos arrive by now
    finally:
        stop.set()
        thread.join(timeout=30)
    store.close()
    registered = [r for r in caplog.records if r.name == "closedloop.compute" and "registered" in r.getMessage()]
    offered = [r for r in caplog.records if r.name == "closedloop.daemon" and "id 999" in r.getMessage()]
    # each welcome was taken for a new registration (and none was logged): the outbox sent once per queued hello
    assert len(offered) == 1, [r.getMessage() for r in offered]
    assert len(registered) == 1 and station.completed == 1, [r.getMessage() for r in registered]


@pytest.mark.slow  # a Dask cluster's start: 6 s
def test_an_assign_for_an_instrument_the_station_does_not_serve_runs_nothing(tmp_path: Path, free_port: int) -> None:
    """A compute station started for one function ran any command an assign named: 'command:touch FILE' made
    the file, on a station whose hello said it serves function:tests.test_compute:quadratic alone."""
    endpoint = f"tcp://127.0.0.1:{free_port}"
    context = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    daemon.setsockopt(zmq.LINGER, 0)
    daemon.bind(endpoint)
    served = "function:tests.test_compute:quadratic"
    station = ComputeStation(endpoint, name="cluster", outbox=tmp_path / "o.db", processes=False, local_workers=1,
                             heartbeat_s=1.0, instruments=[served], context=context)
    stop = threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    made = tmp_path / "made"
    try:
        identity, _ = receive(daemon, protocol.Hello)
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=1.0))])
        for trial, target in ((1, f"command:touch {made}"), (2, served)):
            daemon.send_multipart([identity, protocol.encode(protocol.Assign(
                campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 0.3, "x2": 0.6}, outputs=["y"],
                instrument=protocol.InstrumentSpec(target=target)))])
        _, failure = receive(daemon, protocol.Failure)
        assert failure.trial_id == 1 and f"runs only {served}" in failure.error
        _, result = receive(daemon, protocol.ResultMessage)  # and it goes on serving what it serves
        assert result.trial_id == 2 and result.values == {"y": pytest.approx(0.0)}
        time.sleep(0.5)
        assert not made.exists()
    finally:
        stop.set()
        thread.join(timeout=30)
        daemon.close()
        context.destroy(linger=0)


# what an abort, or a process pool left behind, prints on the way out: none of it may follow a stop
UNCLEAN_EXIT = ("Assertion failed", "leaked semaphore", "terminate called", "Fatal Python error", "Traceback")


class _Run:
    """`closedloop run` of an Ax two-objective function campaign in ``cwd``, its output read as it comes."""

    def __init__(self, cwd: Path, seconds: float) -> None:
        (cwd / "c.yaml").write_text(f"""
name: stopped
parameters:
  x1: {{type: continuous, bounds: [0, 1]}}
  x2: {{type: continuous, bounds: [0, 1]}}
objectives:
  y: {{goal: minimize}}
  z: {{goal: minimize}}
budget: {{experiments: 60}}
planner: {{backend: ax, initial_experiments: 2, seed: 0}}
instrument: {{function: "tests.test_compute:two_objectives", options: {{seconds: {seconds}}}}}
""")
        self.process = subprocess.Popen([*CLI, "run", "c.yaml", "--store", "s.db"], cwd=cwd, env=env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True),
                        threading.Thread(target=lambda: self.stderr.append(self.process.stderr.read()), daemon=True)]
        for reader in self.readers:
            reader.start()

    def experiments(self) -> int:
        return sum(line.startswith("[") and " experiment " in line for line in list(self.lines))

    def ended(self, timeout: float) -> tuple[int, str]:
        """The exit code and standard error, the process killed if it has not exited within ``timeout``."""
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        for reader in self.readers:
            reader.join(timeout=10)
        return returncode, "".join(self.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_closedloop_run_of_a_function_campaign_stopped_by_sigterm_exits_cleanly(tmp_path: Path, signals: int) -> None:
    """A second SIGTERM to `closedloop run` of an Ax two-objective function campaign, a second after the first, killed
    it with SIGABRT ("terminate called without an active exception", exit 134): the
    KeyboardInterrupt it raises landed in the join of the planner thread, whose model fit (torch, without the GIL)
    ran on while the interpreter shut down; landed in the station's join, Dask's atexit hook raced the station
    closing its cluster (a traceback). One SIGTERM ends after the experiment in progress, exit 0; a second
    ends sooner, exit 130, as for Ctrl-C; neither leaves anything running that prints on the way out."""
    import signal

    from tests.daemon.procs import trials_in

    run = _Run(tmp_path, seconds=1.0)
    try:
        wait_for(lambda: run.experiments() >= 5, 180, "five experiments")  # past the initial ones: Ax fits a model per result
        # stopped between two experiments (the planner computing the next), it wound down in about a second, and a
        # second SIGTERM a second later came after the command's work was over, which ignores it (exit 0)
        wait_for(lambda: trials_in(tmp_path / "s.db", "dispatched") > 0, 60, "an experiment in progress")
        run.process.send_signal(signal.SIGTERM)
        if signals == 2:
            # only once the first is taken: two SIGTERMs pending together are one to the process (POSIX signals do
            # not queue)
            wait_for(lambda: any("no new experiment" in line for line in list(run.lines)), 60, "the first SIGTERM")
            # as the run winds down: its threads (the planner fitting the next point, the station closing Dask)
            time.sleep(0.5)
            run.process.send_signal(signal.SIGTERM)
    finally:
        returncode, err = run.ended(timeout=60)
    assert returncode == (0 if signals == 1 else 130), err[-3000:] + "".join(run.lines)[-2000:]
    assert not [sign for sign in UNCLEAN_EXIT if sign in err], err[-3000:]
    if signals == 1:
        assert "stopped by SIGTERM before the campaign's end" in " ".join("".join(run.lines).split())


@pytest.mark.slow
def test_closedloop_run_stopped_again_while_it_prints_its_summary_exits_130(tmp_path: Path) -> None:
    """A second SIGTERM that came while `closedloop run` printed its end summary (of an Ax two-objective campaign the
    summary rebuilds the planner from every result, twice: seconds) killed it (exit -15, the default handler back
    once the run had ended). It ends the summary as a second signal ends the run: exit 130, cleanly."""
    import signal

    run = _Run(tmp_path, seconds=0.2)
    try:
        wait_for(lambda: run.experiments() >= 6, 180, "six experiments")
        run.process.send_signal(signal.SIGTERM)
        # the summary's first line comes after the best experiment, before the Pareto front, each a planner rebuilt
        wait_for(lambda: any(" failed in " in line for line in list(run.lines)), 60, "the summary")
        run.process.send_signal(signal.SIGTERM)
    finally:
        returncode, err = run.ended(timeout=60)
    assert returncode == 130, err[-3000:]
    assert not [sign for sign in UNCLEAN_EXIT if sign in err], err[-3000:]
    done = int(next(line for line in run.lines if " failed in " in line).split(": ")[1].split()[0])
    store = Store(tmp_path / "s.db")
    try:  # every result the summary counted is stored
        assert [t.status for t in store.trials(store.campaign_row("stopped").id)].count("completed") == done >= 6
    finally:
        store.close()


def test_a_scheduler_of_its_own_that_reruns_a_lost_workers_experiment_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a scheduler the station does not own, Dask's default (allowed-failures 3) ran a function that crashed its
    worker 4 times before the station heard of it, with `retries: 0`; only the local cluster sets it to 0."""
    import dask
    from distributed import LocalCluster

    for reruns, said in ((3, True), (0, False)):
        with dask.config.set({"distributed.scheduler.allowed-failures": reruns}), \
                LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
            station = ComputeStation("tcp://127.0.0.1:1", name="cluster", outbox=tmp_path / f"o{reruns}.db",
                                     scheduler=cluster.scheduler_address)
            caplog.clear()
            with caplog.at_level("WARNING", logger="closedloop.compute"):
                client = station.client(cluster.scheduler_address)
            client.close()
            warned = [r.getMessage() for r in caplog.records if "allowed-failures" in r.getMessage()]
            assert bool(warned) is said, warned
            if said:
                assert "up to 3 times" in warned[0] and "ALLOWED_FAILURES=0" in warned[0]
