"""RunEngine control mid-experiment: pause and resume, suspenders, failing and hanging devices."""

from __future__ import annotations

import threading
import time

import pytest
from bluesky.suspenders import SuspendBoolHigh
from bluesky.utils import FailedStatus, RunEngineInterrupted
from ophyd import Signal

from closedloop.errors import DeviceError
from drivers.plans import experiment_plan
from drivers.readout import failure_reason, outputs_from_events
from simulators.surfaces import Branin, FailingBranin

MD = {"campaign": "control", "trial_id": 1}


def later(seconds: float, action, engine) -> threading.Thread:
    """Run ``action`` ``seconds`` after ``engine`` starts running.

    Timing from the engine's start, not from the thread's, keeps a loaded CI machine's slow run
    start from moving the action out of the phase of the measurement it is meant to land in.
    """

    def wait_then_act() -> None:
        deadline = time.monotonic() + 30
        while engine.state != "running" and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def test_pause_from_another_thread_then_resume_completes_the_run(RE, docs):
    binding = Branin(exposure=1.0, latency=0.05)
    states: list[str] = []
    RE.state_hook = lambda new, old: states.append(new)
    later(0.4, RE.request_pause, RE)  # lands during the exposure
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    assert RE.state == "paused"
    assert docs.stop is None and docs.events() == []  # nothing recorded from the interrupted measurement
    RE.resume()
    assert RE.state == "idle"
    assert "paused" in states
    assert docs.stop["exit_status"] == "success"
    events = docs.events()
    assert len(events) == 1  # the interrupted measurement was repeated once, not recorded twice
    assert outputs_from_events(binding, events)[0]["y"] == pytest.approx(binding.detectors[0].true_value([1.0, 2.0]))
    assert binding.positioners["x1"].position == 1.0


def test_pause_then_abort_ends_the_run_as_aborted(RE, docs):
    binding = Branin(exposure=1.0)
    later(0.3, RE.request_pause, RE)
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    RE.abort(reason="operator abort")
    assert RE.state == "idle"
    assert docs.stop["exit_status"] == "abort"


def test_interlock_suspender_holds_the_run_without_failing_it(RE, docs):
    interlock = Signal(name="door_open", value=0)
    binding = Branin(exposure=1.0)
    binding.suspenders.append(SuspendBoolHigh(interlock, sleep=0.1))
    binding.install_suspenders(RE)
    binding.install_suspenders(RE)  # idempotent: installing twice must not double-trip
    states: list[str] = []
    RE.state_hook = lambda new, old: states.append(new)
    later(0.3, lambda: interlock.put(1), RE)  # the door opens during the measurement...
    later(0.8, lambda: interlock.put(0), RE)  # ...and closes half a second later
    started = time.monotonic()
    RE(experiment_plan(binding, {"x1": 3.0, "x2": 3.0}, MD), docs)
    elapsed = time.monotonic() - started
    assert "suspending" in states
    assert elapsed >= 0.8 + 0.1  # held until the interlock cleared plus the suspender's sleep
    assert docs.stop["exit_status"] == "success"
    assert len(docs.events()) == 1
    binding.remove_suspenders(RE)
    assert RE.suspenders == ()


def test_a_device_fault_fails_the_run_and_leaves_the_engine_idle(RE, docs):
    binding = Branin(failure_rate=1.0, seed=0)
    with pytest.raises(FailedStatus) as raised:
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 1.0}, MD), docs)
    assert docs.stop["exit_status"] == "fail"
    assert failure_reason(raised.value) == "DeviceError: y: simulated device fault at {'x1': 1.0, 'x2': 1.0}"
    assert RE.state == "idle"


def test_failure_reason_keeps_an_error_that_already_names_the_parameter_and_limit():
    # a pre-flight refusal is a DeviceError raised from the device's LimitError: its cause alone names no parameter
    binding = Branin()
    with pytest.raises(DeviceError) as raised:
        binding.check_limits({"x1": 20.0, "x2": 1.0})
    assert failure_reason(raised.value).startswith("DeviceError: x1=20.0 refused by x1: ")


def test_failing_branin_fails_only_inside_its_unknown_region(RE, docs):
    binding = FailingBranin()
    RE(experiment_plan(binding, {"x1": 3.14159, "x2": 2.275}, MD), docs)
    assert outputs_from_events(binding, docs.events())[0]["y"] == pytest.approx(0.397887, abs=1e-5)
    docs.clear()
    with pytest.raises(FailedStatus) as raised:
        RE(experiment_plan(binding, {"x1": -3.14159, "x2": 12.275}, MD), docs)
    assert docs.stop["exit_status"] == "fail"
    assert "experiment failed at" in failure_reason(raised.value)


def test_a_hanging_measurement_never_returns_but_the_engine_can_be_interrupted(RE, docs):
    binding = Branin(hang_rate=1.0, seed=0)
    detector = binding.detectors[0]
    later(0.5, RE.request_pause, RE)
    started = time.monotonic()
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 1.0}, MD), docs)
    assert time.monotonic() - started >= 0.5
    assert len(detector.hung) == 1 and not detector.hung[0].done
    RE.abort(reason="timed out")
    assert RE.state == "idle"
    assert docs.stop["exit_status"] == "abort"


def test_rates_are_probabilities():
    with pytest.raises(DeviceError, match="probabilities"):
        Branin(failure_rate=1.5)
    with pytest.raises(DeviceError, match="noise=-1"):
        Branin(noise=-1)


def test_deferred_pause_lets_the_move_finish_and_measures_after_resume(RE, docs):
    # What a paused campaign needs: in-flight moves complete, nothing is measured until resumed.
    binding = Branin(latency=1.0)
    later(0.3, lambda: RE.request_pause(defer=True), RE)  # lands during the move
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"x1": 4.0, "x2": 6.0}, MD), docs)
    assert RE.state == "paused"
    assert binding.positioners["x1"].position == 4.0 and binding.positioners["x2"].position == 6.0
    assert binding.positioners["x1"].set_calls == [4.0]  # moved once, not re-issued
    assert docs.events() == []
    RE.resume()
    assert docs.stop["exit_status"] == "success" and len(docs.events()) == 1
    assert binding.positioners["x1"].set_calls == [4.0]
