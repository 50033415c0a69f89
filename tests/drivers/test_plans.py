"""Per-experiment plans against ophyd simulation devices in a real RunEngine."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from ophyd import Signal
from ophyd.sim import SynAxis

from closedloop.errors import DeviceError
from drivers.binding import AllowedValues, Derived, InstrumentBinding, MaxStep, load_binding
from drivers.plans import experiment_plan, measure
from drivers.readout import outputs_from_events
from simulators.devices import ChoiceSignal, LimitedAxis
from simulators.surfaces import Branin, MixedSurface, branin

MD = {"campaign": "demo", "trial_id": 7, "trial_index": 3, "planner": {"backend": "sobol", "acquisition": None}}


def test_positioners_reach_setpoints_and_outputs_equal_event_readings(RE, docs):
    binding = Branin(seed=0)
    setpoints = {"x1": 2.5, "x2": 7.25}
    uid = RE(experiment_plan(binding, setpoints, MD), docs)
    assert docs.run_uids == list(uid)
    for name, value in setpoints.items():
        assert binding.positioners[name].position == pytest.approx(value)
        assert binding.positioners[name].set_calls == [value]
    events = docs.events()
    assert len(events) == 1
    values, noise = outputs_from_events(binding, events)
    assert values == {"y": events[0]["data"]["y"]}
    assert values["y"] == pytest.approx(branin(np.array([2.5, 7.25])))
    assert binding.detectors[0].value.get() == values["y"]
    assert noise is None
    assert docs.stop["exit_status"] == "success"


def test_start_document_holds_campaign_trial_parameters_and_planner_metadata(RE, docs):
    binding = MixedSurface()
    setpoints = {"x1": 0.1, "x2": 0.9, "cycles": 4, "catalyst": "C"}
    RE(experiment_plan(binding, setpoints, MD), docs)
    start = docs.start
    assert start["campaign"] == "demo" and start["trial_id"] == 7 and start["trial_index"] == 3
    assert start["parameters"] == setpoints
    assert start["planner"] == MD["planner"]
    assert start["instrument"] == "mixed" and start["outputs"] == {"y": "y"}
    # The categorical value reached its signal and is recorded with the reading.
    assert binding.signals["catalyst"].get() == "C"
    assert docs.events()[0]["data"]["catalyst"] == "C"


def test_out_of_limits_raises_before_anything_moves(RE, docs):
    binding = Branin()
    before = {n: p.position for n, p in binding.positioners.items()}
    with pytest.raises(DeviceError, match=r"x1=11\.0 refused by x1: x1=11\.0 outside limits \[-5\.0, 10\.0\]"):
        RE(experiment_plan(binding, {"x2": 1.0, "x1": 11.0}, MD), docs)
    assert docs.documents == []  # not even a start document: nothing was attempted
    assert all(p.set_calls == [] for p in binding.positioners.values())
    assert {n: p.position for n, p in binding.positioners.items()} == before
    assert RE.state == "idle"


def test_unknown_categorical_value_is_refused_before_anything_moves(RE, docs):
    binding = MixedSurface()
    with pytest.raises(DeviceError, match="catalyst='D' refused"):
        RE(experiment_plan(binding, {"x1": 0.5, "x2": 0.5, "cycles": 2, "catalyst": "D"}, MD), docs)
    assert binding.signals["catalyst"].set_calls == []
    assert all(p.set_calls == [] for p in binding.positioners.values())


def test_non_integer_count_is_refused(RE):
    binding = MixedSurface()
    with pytest.raises(DeviceError, match="not an integer"):
        RE(experiment_plan(binding, {"x1": 0.5, "x2": 0.5, "cycles": 2.5, "catalyst": "A"}, MD))


class Log:
    """What the RunEngine did, in order: ("set", device, value), ("wait", None), ("trigger", device)."""

    def __init__(self, RE) -> None:  # noqa: N803
        self.entries: list[tuple] = []
        RE.msg_hook = self.hook

    def hook(self, msg) -> None:
        if msg.command == "set":
            self.entries.append(("set", msg.obj.name, float(msg.args[0])))
        elif msg.command in ("trigger", "wait"):
            self.entries.append((msg.command, getattr(msg.obj, "name", None)))

    def commands(self) -> list[str]:
        return [e[0] for e in self.entries]


def recorded(axis) -> list[float]:
    """Every value ``axis`` is set to, as its setpoint signal sees it (a subscription, no mock)."""
    values: list[float] = []
    axis.setpoint.subscribe(lambda value, **_: values.append(float(value)), run=False)
    return values


def within(moves: list[float], start: float, step: float) -> bool:
    path = [start, *moves]
    return all(abs(b - a) <= step + 1e-9 for a, b in zip(path, path[1:]))


def test_max_step_rule_ramps_to_a_far_setpoint_and_measures_only_at_the_end(RE, docs):
    binding = Branin()  # starts at (2.5, 7.5); LimitedAxis records every value set on it
    binding.safety.append(MaxStep("x1", 3.0))
    RE(experiment_plan(binding, {"x1": 4.0, "x2": 1.0}, MD))  # a step of 1.5: one move, as before
    assert binding.positioners["x1"].set_calls == [4.0]
    log = Log(RE)
    RE(experiment_plan(binding, {"x1": -4.0, "x2": 2.0}, MD), docs)  # 8 away: three equal moves of 8/3
    assert binding.positioners["x1"].set_calls[1:] == pytest.approx([4 - 8 / 3, 4 - 16 / 3, -4.0])
    assert within(binding.positioners["x1"].set_calls[1:], 4.0, 3.0)
    assert binding.positioners["x2"].set_calls == [1.0, 2.0]  # no rule: straight there, in the first stage
    assert binding.positioners["x1"].position == -4.0
    # each stage completed before the next; the one measurement after the last
    commands = log.commands()
    last_set = max(i for i, c in enumerate(commands) if c == "set")
    assert commands[:last_set + 2] == ["set", "set", "wait", "set", "wait", "set", "wait"]
    assert "trigger" in commands[last_set:] and "trigger" not in commands[:last_set]
    assert docs.stop["exit_status"] == "success"
    (event,) = docs.events()
    assert event["data"]["x1"] == -4.0 and event["data"]["y"] == pytest.approx(branin(np.array([-4.0, 2.0])))
    assert docs.start["parameters"] == {"x1": -4.0, "x2": 2.0}
    assert docs.start["ramp"] == {"x1": {"from": 4.0, "to": -4.0, "step": 3.0, "stages": 3}}


def test_several_ramped_positioners_move_together_in_the_same_stages(RE):
    binding = Branin()
    binding.safety += [MaxStep("x1", 3.0), MaxStep("x2", 2.0)]
    log = Log(RE)
    RE(experiment_plan(binding, {"x1": -5.0, "x2": 15.0}, MD))  # 7.5 each: x1 needs 3 stages, x2 needs 4
    x1, x2 = binding.positioners["x1"].set_calls, binding.positioners["x2"].set_calls
    assert len(x1) == len(x2) == 4
    assert x1 == pytest.approx([2.5 - 7.5 * k / 4 for k in range(1, 5)])
    assert x2 == pytest.approx([7.5 + 7.5 * k / 4 for k in range(1, 5)])
    assert within(x1, 2.5, 3.0) and within(x2, 7.5, 2.0)
    sets = [e[1] for e in log.entries if e[0] == "set"]
    assert sets == ["x1", "x2"] * 4  # both axes in every stage, each stage one bps.mv


def test_a_heater_below_its_limits_is_ramped_and_every_setpoint_stays_within_them(RE, docs):
    # the probe's heater: a SynAxis at 0, limits [20, 150] kept by the engine; every proposal was refused
    heater = SynAxis(name="heater")
    moves = recorded(heater)
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                                outputs={"y": "heater"}, limits={"temperature": (20.0, 150.0)},
                                safety=[MaxStep("temperature", 20.0)])
    for target in (90.0, 25.0, 150.0, 150.0):
        RE(experiment_plan(binding, {"temperature": target}, MD), docs)
        assert docs.stop["exit_status"] == "success" and heater.position == target
        assert [e["data"]["heater"] for e in docs.events()] == [target]
    assert moves[:5] == pytest.approx([20.0, 36.0, 54.0, 72.0, 90.0])  # 0 -> 90: enters the limits at 20
    assert within(moves, 0.0, 20.0)
    assert all(20.0 <= m <= 150.0 for m in moves)
    assert moves[-1] == 150.0 and len(moves) == 5 + 4 + 7 + 1
    # an out-of-limits target is still refused before anything moves
    before = len(moves)
    with pytest.raises(DeviceError, match=r"temperature=160.0 outside the instrument's limits \[20, 150\]"):
        RE(experiment_plan(binding, {"temperature": 160.0}, MD), docs)
    assert len(moves) == before and heater.position == 150.0


def test_a_device_more_than_a_step_outside_its_limits_is_unavailable_and_nothing_moves(RE, docs):
    from closedloop.errors import InstrumentUnavailable

    heater = SynAxis(name="heater")  # at 0: no move of at most 20 reaches [50, 150] without leaving them
    moves = recorded(heater)
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                                outputs={"y": "heater"}, limits={"temperature": (50.0, 150.0)},
                                safety=[MaxStep("temperature", 20.0)])
    with pytest.raises(InstrumentUnavailable, match=r"temperature: the device is at 0, outside its limits \[50, 150\]"):
        binding.check_limits({"temperature": 100.0})
    with pytest.raises(InstrumentUnavailable):
        RE(experiment_plan(binding, {"temperature": 100.0}, MD), docs)
    assert moves == [] and docs.documents == []


def test_a_ramp_paused_midway_resumes_from_the_stage_it_was_in(RE, docs):
    from bluesky.utils import RunEngineInterrupted

    binding = Branin(latency=0.3)  # each move takes 0.3 s: the pause lands in the middle of one
    binding.safety.append(MaxStep("x1", 1.0))
    seen: list[float] = []

    def pause_at_the_third_stage(msg) -> None:
        if msg.command == "set" and msg.obj.name == "x1":
            seen.append(float(msg.args[0]))
            if len(seen) == 3:  # as an operator would: from another thread
                threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    RE.msg_hook = pause_at_the_third_stage
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"x1": -3.5, "x2": 7.5}, MD), docs)
    assert RE.state == "paused" and len(seen) == 3
    RE.resume()
    calls = binding.positioners["x1"].set_calls
    assert calls[3] == calls[2]  # the interrupted stage again, not the ramp's start
    assert calls[-1] == -3.5 and binding.positioners["x1"].position == -3.5
    assert within(calls, 2.5, 1.0)  # a rewind to the run's start would have jumped back to 1.5
    assert len(docs.events()) == 1 and docs.stop["exit_status"] == "success"


def test_a_device_moved_during_a_pause_of_its_ramp_is_ramped_on_from_where_it_is(RE, docs):
    """The operator's pause lands at a checkpoint between stages; the heater cools meanwhile. The stages planned
    before the pause jumped from there (0 -> 80 in steps of 20); every move stays within the step of where it is."""
    from bluesky.utils import RunEngineInterrupted

    heater = LimitedAxis(name="heater", limits=(0.0, 150.0), delay=0.2)
    moves = recorded(heater)
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                                outputs={"y": "heater"}, safety=[MaxStep("temperature", 20.0)])

    def pause_after_the_third_stage(msg) -> None:
        if msg.command == "set" and len(moves) == 2:  # the third is being sent: pause at the checkpoint after it
            threading.Thread(target=RE.request_pause, kwargs={"defer": True}).start()

    RE.msg_hook = pause_after_the_third_stage
    with pytest.raises(RunEngineInterrupted):
        RE(experiment_plan(binding, {"temperature": 100.0}, MD), docs)
    assert moves == [20.0, 40.0, 60.0]
    RE.msg_hook = None
    heater.set(0.0).wait(timeout=5)  # cooled while the oven stood paused
    RE.resume()
    assert moves == [20.0, 40.0, 60.0, 0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    assert docs.stop["exit_status"] == "success" and len(docs.events()) == 1
    # listed without a RunEngine, the plan is the one planned
    heater.set(0.0).wait(timeout=5)
    sets = [m.args[0] for m in experiment_plan(binding, {"temperature": 60.0}, MD) if m.command == "set"]
    assert sets == [20.0, 40.0, 60.0]


def test_a_ramp_of_a_whole_number_setting_goes_in_whole_numbers(RE):
    binding = MixedSurface()  # cycles: an integer axis [1, 10] at 6 that refuses fractions
    binding.safety.append(MaxStep("cycles", 2.5))
    RE(experiment_plan(binding, {"x1": 0.5, "x2": 0.5, "cycles": 1, "catalyst": "A"}, MD))
    assert binding.positioners["cycles"].set_calls == [5.0, 3.0, 1.0]


def test_a_distance_of_a_whole_number_of_steps_is_ramped_whatever_its_rounding():
    """2.1 -> 9.2 in steps of 0.1 divides into increments of 0.1000000000000001: the device, inside its limits, was
    said to be outside them by more than a step, and the trial was re-queued for ever (407 of 20,000 ramps)."""
    from simulators.devices import LimitedAxis

    axis = LimitedAxis(name="pressure", limits=(0, 10), value=2.1)
    binding = InstrumentBinding(name="press", positioners={"pressure": axis}, detectors=[axis],
                                outputs={"y": "pressure"}, safety=[MaxStep("pressure", 0.1)])
    stages = binding.ramp({"pressure": 9.2})
    assert len(stages) == 71 and stages[-1] == {"pressure": 9.2}
    assert all(abs(b["pressure"] - a["pressure"]) <= 0.1 + 1e-12 for a, b in zip(stages, stages[1:]))


def test_a_ramp_that_would_pass_a_value_the_hardware_does_not_offer_is_refused_before_it_moves(RE):
    """AllowedValues was checked on the setpoint alone: a pressure allowed at 1 or 5 was sent 2, 3 and 4 on the way."""
    from drivers.binding import AllowedValues

    setting = Signal(name="pressure", value=1)
    sent: list[object] = []
    setting.subscribe(lambda value, **_: sent.append(value), run=False)
    binding = InstrumentBinding(name="press", positioners={"pressure": setting}, detectors=[setting],
                                outputs={"y": "pressure"},
                                safety=[AllowedValues("pressure", (1, 5)), MaxStep("pressure", 1)])
    with pytest.raises(DeviceError, match=r"passes 2, which is not one of \[1, 5\]; nothing has moved"):
        binding.ramp({"pressure": 5})
    with pytest.raises(Exception):
        RE(experiment_plan(binding, {"pressure": 5}, MD))
    assert sent == [] and setting.get() == 1
    binding.safety[0] = AllowedValues("pressure", (1, 2, 3, 4, 5))
    assert [stage["pressure"] for stage in binding.ramp({"pressure": 5})] == [2, 3, 4, 5]


def test_a_ramp_that_would_pass_a_value_its_device_refuses_is_refused_before_it_moves(RE):
    """A ChoiceSignal of numbers refused the ramp's second stage mid-run, after the first had been set."""
    from simulators.devices import ChoiceSignal

    valve = ChoiceSignal(name="valve", choices=(1, 5), value=1)
    axis = SynAxis(name="axis")
    binding = InstrumentBinding(name="valves", positioners={"x": axis}, signals={"valve": valve},
                                detectors=[valve], outputs={"y": "valve"}, safety=[MaxStep("valve", 1)])
    with pytest.raises(DeviceError, match=r"passes 2, which the device refuses \(valve=2 is not one of \[1, 5\]\)"):
        binding.ramp({"valve": 5})
    with pytest.raises(Exception):
        RE(experiment_plan(binding, {"x": 3.0, "valve": 5}, MD))
    assert valve.set_calls == [] and valve.get() == 1


def test_a_ramped_device_that_reads_nan_is_unavailable_and_does_not_jump(RE, docs):
    """NaN is a faulty readback, not an unknown one: a MaxStep device must not go to the setpoint in one move."""
    from closedloop.errors import InstrumentUnavailable

    class Heater(LimitedAxis):
        reading = float("nan")  # the thermocouple came off

        @property
        def position(self) -> float:
            return self.reading

    heater = Heater(name="heater", limits=(0.0, 150.0))
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                                outputs={"y": "heater"}, safety=[MaxStep("temperature", 20.0)])
    with pytest.raises(InstrumentUnavailable, match="temperature: the device reads nan"):
        binding.check_limits({"temperature": 140.0})
    with pytest.raises(InstrumentUnavailable):
        RE(experiment_plan(binding, {"temperature": 140.0}, MD), docs)
    assert heater.set_calls == [] and docs.documents == []
    heater.reading = math.inf
    with pytest.raises(InstrumentUnavailable, match="reads inf"):
        binding.ramp({"temperature": 140.0})


def test_a_ramped_device_whose_readback_fails_is_unavailable_and_does_not_jump(RE, docs):
    """A readback that raises is not a device that cannot say where it is (None): the heater went to 140 at once."""
    from closedloop.errors import InstrumentUnavailable

    class Heater(LimitedAxis):
        @property
        def position(self) -> float:
            raise TimeoutError("no answer from the controller")

    heater = Heater(name="heater", limits=(0.0, 150.0))
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[],
                                outputs={"y": "heater_setpoint"}, safety=[MaxStep("temperature", 20.0)])
    with pytest.raises(InstrumentUnavailable, match=r"cannot say where it is \(TimeoutError: no answer"):
        binding.check_limits({"temperature": 140.0})
    with pytest.raises(InstrumentUnavailable):
        RE(experiment_plan(binding, {"temperature": 140.0}, MD), docs)
    assert heater.set_calls == [] and docs.documents == []


def test_a_device_that_cannot_say_where_it_is_moves_in_one_go(RE):
    setting = Signal(name="setting", value=None)  # no position, and nothing to read yet
    binding = InstrumentBinding(name="one", positioners={"s": setting}, detectors=[setting],
                                outputs={"y": "setting"}, safety=[MaxStep("s", 1.0)])
    assert binding.ramp({"s": 50.0}) == [{"s": 50.0}]
    RE(experiment_plan(binding, {"s": 50.0}, MD))
    assert setting.get() == 50.0
    with pytest.raises(DeviceError, match="the step 0 is not a positive number"):
        MaxStep("s", 0)


def test_repeats_are_averaged_and_their_spread_reported_as_noise(RE, docs):
    binding = Branin(noise=0.5, seed=3)
    binding.repeats = 4
    RE(experiment_plan(binding, {"x1": 1.0, "x2": 1.0}, MD), docs)
    samples = [e["data"]["y"] for e in docs.events()]
    assert len(samples) == 4 and len(set(samples)) == 4
    values, noise = outputs_from_events(binding, docs.events())
    assert values["y"] == pytest.approx(np.mean(samples))
    assert noise["y"] == pytest.approx(np.std(samples, ddof=1) / 2)
    assert docs.start["repeats"] == 4


def test_settle_time_is_a_runengine_sleep_after_the_move_and_signals_are_set_first():
    binding = MixedSurface()
    binding.settle_time = 2.0
    messages = list(measure(binding, {"catalyst": "B", "x1": 0.5, "x2": 0.5, "cycles": 3}, MD))
    commands = [(m.command, getattr(m.obj, "name", None)) for m in messages]
    sets = [name for command, name in commands if command == "set"]
    assert sets == ["catalyst", "x1", "x2", "cycles"]
    first_sleep = next(i for i, m in enumerate(messages) if m.command == "sleep")
    last_set = max(i for i, m in enumerate(messages) if m.command == "set")
    first_trigger = next(i for i, m in enumerate(messages) if m.command == "trigger")
    assert last_set < first_sleep < first_trigger
    assert messages[first_sleep].args == (2.0,)


def test_derived_output_from_several_readings(RE, docs):
    binding = Branin()
    reference = Signal(name="reference", value=4.0)
    binding.detectors.append(reference)
    binding.outputs = {"y": "y", "ratio": Derived(keys=("y", "reference"), func=lambda y, r: y / r)}
    RE(experiment_plan(binding, {"x1": 0.0, "x2": 5.0}, MD), docs)
    values, _ = outputs_from_events(binding, docs.events(), ["y", "ratio"])
    assert values["ratio"] == pytest.approx(values["y"] / 4.0)
    assert docs.start["outputs"]["ratio"].endswith("(y, reference)")


def test_derived_output_by_import_path():
    derived = Derived(keys=("a",), func="math:sqrt")
    assert derived.compute({"a": 9.0}) == 3.0
    assert derived.label == "math:sqrt"
    with pytest.raises(DeviceError, match="needs b"):
        Derived(keys=("a", "b"), func=math.hypot).compute({"a": 1.0})


def test_custom_plan_runs_after_the_same_preflight(RE, docs):
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    from drivers.plans import move_to, read_outputs, run_metadata

    def dispense_then_measure(binding, setpoints, md):
        @bpp.run_decorator(md={**run_metadata(binding, setpoints, md), "procedure": "dispense-mix-measure"})
        def inner():
            yield from move_to(binding, {"x1": setpoints["x1"]})
            yield from bps.sleep(0.01)  # "mix"
            yield from move_to(binding, {"x2": setpoints["x2"]})
            yield from read_outputs(binding)

        return (yield from inner())

    binding = Branin()
    binding.plan = dispense_then_measure
    RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    assert docs.start["procedure"] == "dispense-mix-measure"
    assert outputs_from_events(binding, docs.events())[0]["y"] == pytest.approx(branin(np.array([1.0, 2.0])))
    with pytest.raises(DeviceError, match="outside limits"):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 99.0}, MD))
    assert binding.positioners["x1"].set_calls == [1.0]


def test_a_custom_plan_cannot_move_a_device_past_the_bindings_limits(RE, docs):
    """move_to and set_signals check what a custom plan sends; the pre-flight saw only the trial's setpoints."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    from drivers.plans import move_to, read_outputs, run_metadata, set_signals

    def overshoot_anneal(binding, setpoints, md):
        @bpp.run_decorator(md=run_metadata(binding, setpoints, md))
        def inner():
            yield from bps.checkpoint()
            yield from set_signals(binding, {"gas": setpoints["gas"]})
            yield from move_to(binding, {"temperature": setpoints["temperature"] + 30})  # past the limit
            yield from move_to(binding, {"temperature": setpoints["temperature"]})
            yield from read_outputs(binding)

        return (yield from inner())

    heater = LimitedAxis(name="heater")  # no limits of its own: the binding's are all there is
    gas = ChoiceSignal(name="gas", choices=("N2", "Ar", "O2"))
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, signals={"gas": gas},
                                detectors=[heater], outputs={"y": "heater"}, limits={"temperature": (20, 150)},
                                safety=[AllowedValues("gas", ("N2", "Ar"))], plan=overshoot_anneal)
    with pytest.raises(DeviceError, match=r"temperature=170.0 outside the instrument's limits \[20, 150\]"):
        RE(experiment_plan(binding, {"temperature": 140.0, "gas": "N2"}, MD), docs)
    assert heater.set_calls == []
    assert docs.stop["exit_status"] == "fail"

    def wrong_gas(binding, setpoints, md):
        @bpp.run_decorator(md=run_metadata(binding, setpoints, md))
        def inner():
            yield from set_signals(binding, {"gas": "O2"})  # on the device, but not loaded on this robot
            yield from read_outputs(binding)

        return (yield from inner())

    binding.plan = wrong_gas
    with pytest.raises(DeviceError, match="'O2' is not one of"):
        RE(experiment_plan(binding, {"temperature": 100.0, "gas": "N2"}, MD))
    assert gas.set_calls == ["N2"] and gas.get() == "N2"

    def numpy_values(binding, setpoints, md):  # a plan computing its values with numpy: in limits, they move
        @bpp.run_decorator(md=run_metadata(binding, setpoints, md))
        def inner():
            yield from move_to(binding, {"temperature": np.float32(setpoints["temperature"]) + np.float32(10)})
            yield from read_outputs(binding)

        return (yield from inner())

    binding.plan = numpy_values
    RE(experiment_plan(binding, {"temperature": 100.0, "gas": "N2"}, MD))
    assert heater.set_calls == [110.0]

    class BothOrNeither:  # a lab's own rule, written for a whole proposal: left to the pre-flight
        def check(self, setpoints, current):
            if (setpoints["gas"] == "Ar") != (setpoints["temperature"] > 100):
                raise DeviceError("argon above 100 degC only")

    binding.safety.append(BothOrNeither())
    RE(experiment_plan(binding, {"temperature": 120.0, "gas": "Ar"}, MD))
    with pytest.raises(DeviceError, match="argon above 100 degC only"):
        RE(experiment_plan(binding, {"temperature": 90.0, "gas": "Ar"}, MD))


def test_a_device_reading_keys_its_describe_does_not_list_is_named(RE, docs):
    """event-model's own words were "KeyError: 'det_valu'": neither the device nor what it got wrong."""

    class Misspelled(Signal):
        def read(self):
            return {"det_valu": super().read()[self.name]}

    binding = Branin()
    binding.detectors = [*binding.detectors, Misspelled(name="det_value", value=1.0)]
    with pytest.raises(DeviceError, match=r"^device 'det_value': read\(\) gives det_valu but describe\(\) lists "
                                          r"det_value; the two must name the same data keys$"):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    assert docs.stop["exit_status"] == "fail"


def test_missing_output_is_a_device_error(RE, docs):
    binding = Branin()
    RE(experiment_plan(binding, {"x1": 1.0, "x2": 1.0}, MD), docs)
    with pytest.raises(DeviceError, match="does not measure output 'z'"):
        outputs_from_events(binding, docs.events(), ["z"])
    binding.outputs = {"y": "nope"}
    with pytest.raises(DeviceError, match="data key 'nope' not in the run's readings"):
        outputs_from_events(binding, docs.events())
    with pytest.raises(DeviceError, match="no event documents"):
        outputs_from_events(binding, [])


def test_load_binding_by_import_path_with_options():
    binding = load_binding("simulators.surfaces:Ackley", {"dim": 3, "noise": 0.1})
    assert list(binding.positioners) == ["x1", "x2", "x3"]
    with pytest.raises(DeviceError, match="cannot import"):
        load_binding("simulators.surfaces:Nope")
    with pytest.raises(DeviceError, match="simulators.surfaces:Branin: .*unexpected keyword"):
        load_binding("simulators.surfaces:Branin", {"colour": "red"})


def unplugged_stage(**options):
    """A lab driver whose factory fails on its own (a serial port that is not there)."""
    raise RuntimeError("serial port /dev/ttyUSB7 not found")


def test_a_factorys_own_error_names_the_instrument_that_failed():
    # stored with every trial it failed, "RuntimeError: serial port /dev/ttyUSB7 not found" named no instrument
    with pytest.raises(DeviceError, match=r"^tests\.drivers\.test_plans:unplugged_stage: RuntimeError: serial port"):
        load_binding("tests.drivers.test_plans:unplugged_stage")


def test_a_binding_refuses_parameters_it_has_no_device_for():
    binding = Branin()
    with pytest.raises(DeviceError, match="no device for x3"):
        binding.check_limits({"x1": 0.0, "x3": 1.0})
    with pytest.raises(DeviceError, match="both positioners and signals"):
        InstrumentBinding(name="bad", positioners=binding.positioners, signals={"x1": Signal(name="s")},
                          detectors=[], outputs={})


def test_a_custom_plan_that_reads_before_opening_a_run_is_told_so(RE, docs):
    # bluesky's "IllegalMessageSequence: Cannot bundle readings without an open run" named neither the
    # instrument nor what to do; the developer had forgotten run_decorator
    from drivers.plans import move_to, read_outputs

    def forgets_the_run(binding, setpoints, md):
        yield from move_to(binding, setpoints)
        yield from read_outputs(binding)

    binding = Branin()
    binding.plan = forgets_the_run
    with pytest.raises(DeviceError, match=r"instrument 'branin': its plan reads before opening a run.*run_decorator"):
        RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    assert docs.run_uids == []
    binding.plan = lambda b, s, md: measure(b, s, md)  # one that opens its run is untouched
    RE(experiment_plan(binding, {"x1": 1.0, "x2": 2.0}, MD), docs)
    assert docs.stop["exit_status"] == "success"
