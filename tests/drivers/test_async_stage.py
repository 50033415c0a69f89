"""An ophyd-async instrument in the same RunEngine and plans as ophyd ones."""

from __future__ import annotations

import bluesky.plan_stubs as bps
import numpy as np
import pytest

from closedloop.errors import DeviceError
from drivers.binding import load_binding
from drivers.plans import experiment_plan
from drivers.readout import outputs_from_events
from simulators.surfaces import branin

pytest.importorskip("ophyd_async")
pytest.importorskip("h5py")  # ophyd_async.sim imports it


def readback(motor) -> float:
    from bluesky.run_engine import call_in_bluesky_event_loop

    return call_in_bluesky_event_loop(motor.user_readback.get_value())


def test_ophyd_async_binding_runs_and_checks_limits_twice(RE, docs):
    binding = load_binding("drivers.async_stage:AsyncStage")  # after RE: devices connect on its loop
    RE(experiment_plan(binding, {"x1": 1.5, "x2": 4.0}, {"trial_id": 1}), docs)
    assert readback(binding.positioners["x1"]) == 1.5 and readback(binding.positioners["x2"]) == 4.0
    values, _ = outputs_from_events(binding, docs.events())
    assert values["y"] == pytest.approx(branin(np.array([1.5, 4.0])))
    assert docs.events()[0]["data"]["x1"] == 1.5

    # Engine pre-flight (the worker's thread): the binding's limits and the device's async check_value.
    with pytest.raises(DeviceError, match=r"x1=12\.0 outside the instrument's limits \[-5, 10\]"):
        binding.check_limits({"x1": 12.0, "x2": 1.0})
    binding.limits = {}
    with pytest.raises(DeviceError, match="refused by x1: x1=12.0 outside soft limits"):
        binding.check_limits({"x1": 12.0, "x2": 1.0})
    # The device itself, with every engine check bypassed.
    with pytest.raises(Exception, match="outside soft limits"):
        RE(bps.mv(binding.positioners["x2"], -1.0))
    assert readback(binding.positioners["x2"]) == 4.0


def test_a_limit_check_the_device_never_answers_makes_it_unavailable_not_a_hung_station(RE, monkeypatch):
    """The worker's pre-flight waited for an ophyd-async check_value without a limit: a controller that never
    answered held the station for good (no later trial ran, and no cancel reached an idle RunEngine)."""
    import asyncio
    import threading

    from ophyd_async.core import init_devices

    import drivers.binding
    from closedloop.errors import InstrumentUnavailable
    from drivers.async_stage import LimitedSimMotor
    from drivers.binding import InstrumentBinding

    class Unanswering(LimitedSimMotor):
        async def check_value(self, value: float) -> None:
            await asyncio.Event().wait()

    with init_devices(set_name=False):
        x = Unanswering(name="x", limits=(-5.0, 5.0), instant=True)
    binding = InstrumentBinding(name="stuck", positioners={"x": x}, detectors=[x], outputs={"y": "x"})
    monkeypatch.setattr(drivers.binding, "CHECK_TIMEOUT_S", 0.5, raising=False)
    raised: list[BaseException] = []

    def preflight() -> None:  # on a thread of its own, as the worker's RunEngine thread calls it
        try:
            binding.check_limits({"x": 1.0})
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=preflight, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the pre-flight still waits"
    (error,) = raised
    assert isinstance(error, InstrumentUnavailable)
    assert str(error) == "x did not answer its limit check within 0.5 s; nothing has moved"


def test_a_max_step_ramps_an_ophyd_async_axis_read_through_the_run_engine(RE, docs):
    """An ophyd-async axis has no synchronous position: its MaxStep saw None and moved it 0 -> 7 in one go. Read
    through the RunEngine, it is ramped in moves of at most the step, and the start document says so."""
    from drivers.binding import MaxStep

    binding = load_binding("drivers.async_stage:AsyncStage")
    binding.safety = [MaxStep("x1", 2.0)]
    sent: list[tuple[str, float]] = []
    RE.msg_hook = lambda msg: sent.append((msg.obj.name, msg.args[0])) if msg.command == "set" else None
    RE(experiment_plan(binding, {"x1": 7.0, "x2": 4.0}, {"trial_id": 1}), docs)
    x1 = [value for name, value in sent if name == "x1"]
    assert x1 == pytest.approx([1.75, 3.5, 5.25, 7.0])
    assert [value for name, value in sent if name == "x2"] == [4.0]  # ungoverned: straight there, in the first stage
    assert readback(binding.positioners["x1"]) == 7.0
    assert docs.start["ramp"] == {"x1": {"from": 0.0, "to": 7.0, "step": 2.0, "stages": 4}}
    # only listed, not run: nothing reads the axis, and the plan lists one move
    listed = [m for m in experiment_plan(binding, {"x1": 1.0, "x2": 4.0}, {"trial_id": 2}) if m.command == "set"]
    assert [m.args[0] for m in listed if m.obj.name == "x1"] == [1.0]
