"""Per-experiment plans against ophyd simulation devices in a real RunEngine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ophyd import Signal

from closedloop.errors import DeviceError
from drivers.binding import Derived, InstrumentBinding, MaxStep, load_binding
from drivers.plans import experiment_plan, measure
from drivers.readout import outputs_from_events
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


def test_max_step_rule_refuses_a_jump_from_where_the_device_is(RE, docs):
    binding = Branin()
    binding.safety.append(MaxStep("x1", 3.0))
    RE(experiment_plan(binding, {"x1": 4.0, "x2": 1.0}, MD))  # from the start at 2.5: a step of 1.5
    with pytest.raises(DeviceError, match=r"x1: -1 is 5 away from the present 4, more than the allowed step 3"):
        RE(experiment_plan(binding, {"x1": -1.0, "x2": 1.0}, MD), docs)
    assert binding.positioners["x1"].set_calls == [4.0]
    assert docs.documents == []


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
