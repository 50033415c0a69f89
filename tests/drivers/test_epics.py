"""A short campaign through the EPICS binding against a real caproto IOC on loopback, in a subprocess."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ophyd import EpicsSignal
from ophyd.utils.errors import LimitError

from closedloop.campaign import Campaign
from closedloop.daemon import run_embedded
from closedloop.store import Store
from drivers.binding import InstrumentBinding, load_binding
from drivers.epics_motor import use_caproto
from simulators.surfaces import branin

pytest.importorskip("caproto")

ROOT = Path(__file__).resolve().parents[2]
IOC_LIMITS = {"x1": (-5.0, 5.0), "x2": (0.0, 15.0)}  # x1 narrower than the campaign's [-5, 10]


# beside the suite's other processes on two cores, an IOC's Channel Access connections timed out (10 s, twice)
pytestmark = pytest.mark.alone


def free_ca_port() -> int:
    """A port free for both TCP and UDP (Channel Access searches over UDP, serves over TCP), below the
    kernel's ephemeral range: a port picked from that range and released could be given to some other test's
    outgoing connection before the IOC that is to serve it has started."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        try:
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port for Channel Access")


def loopback_channel_access(monkeypatch) -> dict[str, str]:
    """Channel Access on loopback only, on free ports, for this process's client and the IOCs it starts."""
    server_port, repeater_port = free_ca_port(), free_ca_port()
    env = {
        "EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(server_port), "EPICS_CAS_SERVER_PORT": str(server_port),
        "EPICS_CA_REPEATER_PORT": str(repeater_port), "EPICS_CAS_BEACON_PORT": str(repeater_port),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # a fresh Channel Access context for each test: with the one made for an earlier test's IOC, ophyd once
    # failed to connect to this test's IOC (10 s, twice) while caproto's plain client read it at once
    from caproto.threading import pyepics_compat

    pyepics_compat._make_context.cache_clear()
    return env


def start_ioc(prefix: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The simulated stage IOC serving ``prefix``, in a subprocess writing to ``log_path``. Its motors move at
    20 units/s: at 100 a ramp's stage took about one tick of the motor record, and on a loaded machine the
    RunEngine once waited for good on the ramp's first stage (a move status that never finished)."""
    limits = [f"--limit={name}={low}:{high}" for name, (low, high) in IOC_LIMITS.items()]
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "simulators.epics_ioc", "--prefix", prefix, *limits, "--velocity", "20"],
            cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        )


def stop_ioc(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def read_pv(pv: str, timeout: float = 10.0):
    """The PV's value read by caproto's plain client, waiting long enough for an IOC on a loaded machine
    (CI once missed the search reply for a readback within caproto's default 2 s)."""
    from caproto.sync.client import read

    return read(pv, timeout=timeout)


@pytest.fixture
def ioc(monkeypatch, tmp_path):
    """The simulated stage IOC in a subprocess, reachable only on loopback; yields its PV prefix."""
    env = loopback_channel_access(monkeypatch)
    prefix = f"cl{uuid.uuid4().hex[:6]}:"
    process = start_ioc(prefix, env, tmp_path / "ioc.log")
    deadline = time.monotonic() + 30
    while True:
        try:
            read_pv(f"{prefix}det:value", timeout=0.5)
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"IOC did not start: {(tmp_path / 'ioc.log').read_text()[-2000:]}")
    try:
        yield prefix
    finally:
        stop_ioc(process)


CAMPAIGN = """
name: epics-stage
parameters:
  x1: {{type: continuous, bounds: [-5, 10]}}
  x2: {{type: continuous, bounds: [0, 15]}}
objectives:
  y: {{goal: minimize}}
budget: {{experiments: 5}}
planner: {{backend: sobol, seed: 3}}
instrument:
  driver: drivers.epics_motor:Stage
  options: {{prefix: "{prefix}"}}
"""


@pytest.mark.slow
def test_campaign_moves_the_ioc_to_each_setpoint_and_never_sends_an_out_of_limits_one(ioc, tmp_path):
    campaign = Campaign.from_yaml_text(CAMPAIGN.format(prefix=ioc))
    # The binding for the device-level check below is made before the campaign and kept through it.
    # Made after the campaign, just as the campaign's devices were let go, it once never received the
    # motor's first readback in CI ("Pending operations: _pos_changed subscription"); caproto shares one
    # subscription per PV within a process, and a live one hands each new device its latest value.
    binding = load_binding("drivers.epics_motor:Stage", {"prefix": ioc})
    store = Store(tmp_path / "store.db")
    try:
        run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"))
        trials = store.trials(run.id)
        observations = store.observations(run.id)
    finally:
        store.close()

    assert len(trials) == 5
    inside = [t for t in trials if IOC_LIMITS["x1"][0] <= t.parameters["x1"] <= IOC_LIMITS["x1"][1]]
    outside = [t for t in trials if t not in inside]
    assert inside and outside, "seed 3 proposes points on both sides of the IOC's x1 limit"
    for trial in outside:
        assert trial.status == "failed"
        assert "refused by x1" in trial.error and "x1=" in trial.error
    for trial in inside:
        assert trial.status == "completed"
        expected = branin(np.array([trial.parameters["x1"], trial.parameters["x2"]]))
        assert observations[trial.id].values["y"] == pytest.approx(expected, rel=1e-3, abs=1e-3)

    # Every value ever written to the motors' .VAL, in order: exactly the accepted setpoints.
    puts = {axis: list(read_pv(f"{ioc}{axis}:puts").data) for axis in IOC_LIMITS}
    for axis in IOC_LIMITS:
        assert puts[axis] == pytest.approx([t.parameters[axis] for t in inside], abs=1e-9)
        assert all(IOC_LIMITS[axis][0] <= v <= IOC_LIMITS[axis][1] for v in puts[axis])
        readback = float(read_pv(f"{ioc}{axis}.RBV").data[0])
        assert readback == pytest.approx(inside[-1].parameters[axis], abs=1e-6)

    # The second line of defence: the ophyd device itself refuses, even when the pre-flight is skipped.
    assert binding.positioners["x1"].limits == IOC_LIMITS["x1"]
    with pytest.raises(LimitError):
        binding.positioners["x1"].set(7.5)
    assert list(read_pv(f"{ioc}x1:puts").data) == pytest.approx(puts["x1"])


def test_a_stage_whose_ioc_does_not_answer_is_refused_after_a_second_try(monkeypatch, caplog) -> None:
    """No IOC serves the prefix: the binding tries twice, with new devices, then names the device it waited for."""
    from closedloop.errors import DeviceError

    loopback_channel_access(monkeypatch)  # no IOC started: every search goes unanswered
    with caplog.at_level("WARNING", logger="closedloop.drivers.epics"):
        with pytest.raises(DeviceError, match=r"'nobody:': x1 did not connect in 0.5 s \(2 attempts\)"):
            load_binding("drivers.epics_motor:Stage", {"prefix": "nobody:", "timeout": 0.5})
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 1 and "x1 did not connect" in retries[0]


@pytest.mark.slow
def test_a_campaign_waits_for_an_ioc_that_is_down_and_loses_no_experiment(monkeypatch, tmp_path) -> None:
    """The IOC starts only after the station has failed to reach it: the trial waits (not failed, not an attempt,
    not a failure for the planner), the station is tried again after its rest, and every experiment runs once."""
    env = loopback_channel_access(monkeypatch)
    prefix = f"cl{uuid.uuid4().hex[:6]}:"
    campaign = Campaign.from_yaml_text(CAMPAIGN.format(prefix=prefix).replace(
        "budget: {experiments: 5}", "budget: {experiments: 3}").replace("[-5, 10]", "[-5, 5]").replace(
        f'options: {{prefix: "{prefix}"}}', f'options: {{prefix: "{prefix}", timeout: 0.5}}'))
    events: list[tuple[str, dict]] = []
    iocs: list[subprocess.Popen] = []

    def on_event(kind: str, details: dict) -> None:
        events.append((kind, details))
        if kind == "instrument_unavailable" and not iocs:
            iocs.append(start_ioc(prefix, env, tmp_path / "ioc.log"))

    store = Store(tmp_path / "store.db")
    deadline = time.monotonic() + 120
    try:
        run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"), on_event=on_event,
                           should_stop=lambda: time.monotonic() > deadline)
        trials = store.trials(run.id)
    finally:
        store.close()
        for process in iocs:
            stop_ioc(process)
    log = (tmp_path / "ioc.log").read_text()[-2000:] if iocs else ""
    assert time.monotonic() <= deadline, f"the campaign did not finish in 120 s; IOC log: {log}"

    unavailable = [d for k, d in events if k == "instrument_unavailable"]
    assert iocs and unavailable, "the station never reported the IOC unreachable"
    assert unavailable[0]["instrument"] == "drivers.epics_motor:Stage" and unavailable[0]["retry_in_s"] == 2.0
    assert unavailable[0]["options"] == {"prefix": prefix, "timeout": 0.5}
    assert "x1 did not connect" in unavailable[0]["error"]
    # each further failure in a row rests the station twice as long
    assert [d["retry_in_s"] for d in unavailable] == [2.0 * 2**i for i in range(len(unavailable))]
    assert [t.status for t in trials] == ["completed"] * 3
    assert [t.attempts for t in trials] == [1, 1, 1]
    assert not any(k == "trial_failed" for k, _ in events)
    requeued = [d for k, d in events if k == "trial_requeued"]
    assert [d["trial"] for d in requeued] == [1] * len(unavailable)


def signal_binding(pv: str) -> InstrumentBinding:
    """A binding whose one setting is an EPICS PV, connected while the binding is built."""
    use_caproto()
    setting = EpicsSignal(pv, name="setting")
    setting.wait_for_connection(timeout=0.3)
    return InstrumentBinding(name="one-pv", signals={"x": setting})


def test_a_factory_whose_pv_does_not_connect_makes_the_instrument_unavailable(monkeypatch) -> None:
    """ophyd's connection timeout inside any binding factory means the hardware is out of reach, not a failed
    experiment: load_binding says InstrumentUnavailable, naming the factory."""
    from closedloop.errors import InstrumentUnavailable

    loopback_channel_access(monkeypatch)  # no IOC started
    with pytest.raises(InstrumentUnavailable, match=r"^tests\.drivers\.test_epics:signal_binding: .*nobody:pv"):
        load_binding("tests.drivers.test_epics:signal_binding", {"pv": "nobody:pv"})


@pytest.mark.slow
def test_a_stage_with_max_step_ramps_each_axis_in_puts_of_at_most_the_step(ioc, RE, docs):
    """Stage(max_step=...) on the IOC: every put to .VAL is at most the step from the last, the last is the setpoint,
    the one measurement comes after it, and an out-of-limits setpoint never reaches the IOC."""
    from drivers.plans import experiment_plan

    binding = load_binding("drivers.epics_motor:Stage", {"prefix": ioc, "max_step": 2.0})
    start = {axis: float(read_pv(f"{ioc}{axis}.RBV").data[0]) for axis in IOC_LIMITS}
    target = {"x1": -4.0, "x2": start["x2"] + 5.0}
    RE(experiment_plan(binding, target, {"trial_id": 1}), docs)
    assert docs.stop["exit_status"] == "success"
    stages = max(int(np.ceil(abs(target[a] - start[a]) / 2.0)) for a in IOC_LIMITS)
    assert stages > 1 and docs.start["ramp"]["x1"]["stages"] == stages
    for axis in IOC_LIMITS:
        puts = list(read_pv(f"{ioc}{axis}:puts").data)
        assert len(puts) == stages and puts[-1] == pytest.approx(target[axis])
        path = [start[axis], *puts]
        assert all(abs(b - a) <= 2.0 + 1e-9 for a, b in zip(path, path[1:]))
        assert all(IOC_LIMITS[axis][0] <= v <= IOC_LIMITS[axis][1] for v in puts)
    (event,) = docs.events()
    assert event["data"]["det_value"] == pytest.approx(branin(np.array([target["x1"], target["x2"]])), rel=1e-3)
    with pytest.raises(Exception, match="refused by x1"):
        RE(experiment_plan(binding, {"x1": 7.5, "x2": target["x2"]}, {"trial_id": 2}))
    assert len(read_pv(f"{ioc}x1:puts").data) == stages


def test_the_docs_epics_example_builds_its_stage_as_written(ioc, RE, docs):
    """docs/instruments.md's EPICS example, copied as it stands, builds a binding that measures at the IOC; it called
    use_caproto() without importing it, and a driver written from it failed with NameError."""
    from drivers.plans import experiment_plan

    text = (ROOT / "docs" / "instruments.md").read_text()
    section = text[text.index("## An EPICS instrument"):]
    example = section[section.index("```python") + len("```python"):]
    example = example[:example.index("```")]
    namespace: dict = {}
    exec(compile(example, "docs/instruments.md", "exec"), namespace)  # noqa: S102 - the docs' own example
    binding = namespace["Stage"](prefix=ioc)
    RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, {}), docs)
    assert docs.events()[0]["data"]["det_value"] == pytest.approx(branin(np.array([1.0, 2.0])), rel=1e-4)
