"""Each simulator's known optimum is where its docstring says, and the realism options do what they say."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from bluesky import RunEngine
from scipy.optimize import minimize
from scipy.stats import qmc, spearmanr

from drivers.documents import DocumentCollector
from drivers.plans import experiment_plan
from drivers.readout import outputs_from_events
from simulators import materials, multifidelity, multiobjective, surfaces
from simulators.devices import ResponseSurface


def detector(binding) -> ResponseSurface:
    return binding.detectors[0]


def sobol(bounds: list[tuple[float, float]], n: int = 1024, seed: int = 0) -> np.ndarray:
    low, high = np.array(bounds).T
    return qmc.scale(qmc.Sobol(len(bounds), seed=seed).random(n), low, high)


def local_min(func, x0, bounds) -> float:
    return float(minimize(func, x0, bounds=bounds, method="L-BFGS-B").fun)


@pytest.mark.parametrize(
    ("factory", "argmins", "minimum"),
    [
        (surfaces.Branin, surfaces.BRANIN_ARGMINS, surfaces.BRANIN_MINIMUM),
        (surfaces.Hartmann6, [surfaces.HARTMANN6_ARGMIN], surfaces.HARTMANN6_MINIMUM),
        (lambda: surfaces.Ackley(), [(0.0,) * 5], 0.0),
        (lambda: surfaces.Ackley(dim=2), [(0.0,) * 2], 0.0),
        (lambda: surfaces.Rosenbrock(), [(1.0,) * 4], 0.0),
        (lambda: surfaces.Rosenbrock(dim=3), [(1.0,) * 3], 0.0),
        (surfaces.FailingBranin, surfaces.FAILING_BRANIN_ARGMINS, surfaces.BRANIN_MINIMUM),
    ],
)
def test_continuous_surface_minimum_is_where_the_docstring_says(factory, argmins, minimum):
    binding = factory()
    bounds = [tuple(axis.limits) for axis in binding.positioners.values()]
    truth = detector(binding).true_value
    for point in argmins:
        assert truth(point) == pytest.approx(minimum, abs=1e-4)
        # No lower value nearby (a local optimizer started there stays) ...
        assert local_min(truth, np.array(point), bounds) >= minimum - 1e-4
    # ... nor anywhere in a space-filling sample.
    assert min(truth(x) for x in sobol(bounds, 512)) >= minimum - 1e-6


def test_failing_branin_region_holds_the_third_branin_minimum_and_not_the_others():
    assert surfaces.in_failure_region({"x1": -np.pi, "x2": 12.275})
    assert not any(surfaces.in_failure_region({"x1": a, "x2": b}) for a, b in surfaces.FAILING_BRANIN_ARGMINS)


def test_mixed_surface_optimum_over_every_categorical_and_integer_choice():
    truth = detector(surfaces.MixedSurface()).true_value
    assert truth(surfaces.MIXED_ARGMIN) == surfaces.MIXED_MINIMUM
    best = min(
        local_min(lambda x, c=c, k=k: truth({"x1": x[0], "x2": x[1], "cycles": k, "catalyst": c}), [0.5, 0.5],
                  [(0, 1), (0, 1)])
        for c, k in itertools.product("ABC", range(1, 11))
    )
    assert best == pytest.approx(surfaces.MIXED_MINIMUM, abs=1e-8)
    assert truth({**surfaces.MIXED_ARGMIN, "catalyst": "A"}) > 0.5


def test_zdt1_front_and_dominance():
    truth = detector(multiobjective.ZDT1()).true_value
    for f1 in np.linspace(0, 1, 11):
        out = truth([f1, 0, 0, 0, 0, 0])
        assert out["f1"] == pytest.approx(f1) and out["f2"] == pytest.approx(1 - np.sqrt(f1))
    for x in sobol([(0.0, 1.0)] * 6, 256):
        out = truth(x)
        assert out["f2"] >= 1 - np.sqrt(out["f1"]) - 1e-12  # nothing beats the front
    assert np.allclose(multiobjective.zdt1_front(5)[:, 1], 1 - np.sqrt(np.linspace(0, 1, 5)))


def test_dtlz2_front_is_the_unit_sphere():
    truth = detector(multiobjective.DTLZ2()).true_value
    for a, b in [(0.0, 0.0), (0.3, 0.7), (1.0, 0.5)]:
        out = truth([a, b, 0.5, 0.5, 0.5, 0.5])
        assert sum(v**2 for v in out.values()) == pytest.approx(1.0)
    norms = [np.sqrt(sum(v**2 for v in truth(x).values())) for x in sobol([(0.0, 1.0)] * 6, 256)]
    assert min(norms) >= 1 - 1e-12
    assert np.allclose(np.linalg.norm(multiobjective.dtlz2_front(20), axis=1), 1.0)


def test_branin_pair_high_fidelity_is_branin_and_low_is_correlated_but_biased():
    binding = multifidelity.BraninPair()
    truth = detector(binding).true_value
    xs = sobol([(-5.0, 10.0), (0.0, 15.0)], 256)
    high = np.array([truth({"x1": a, "x2": b, "fidelity": "high"})["y"] for a, b in xs])
    low = np.array([truth({"x1": a, "x2": b, "fidelity": "low"})["y"] for a, b in xs])
    assert np.allclose(high, [surfaces.branin(x) for x in xs])
    assert spearmanr(high, low).statistic > 0.9
    assert np.mean(np.abs(low - high)) > 1.0
    for point in surfaces.BRANIN_ARGMINS:  # the cheap version's minima are elsewhere
        assert truth({"x1": point[0], "x2": point[1], "fidelity": "low"})["y"] > surfaces.BRANIN_MINIMUM + 0.5
    assert truth({"x1": 0.0, "x2": 0.0, "fidelity": "low"})["cost"] == 0.1
    assert list(binding.signals) == ["fidelity"] and binding.signals["fidelity"].get() == "high"


def test_branin_pair_low_fidelity_is_faster():
    binding = multifidelity.BraninPair(exposure=0.2)
    RE = RunEngine({}, context_managers=[])
    times = {}
    for fidelity in ("high", "low"):
        started = time.monotonic()
        RE(experiment_plan(binding, {"x1": 0.0, "x2": 0.0, "fidelity": fidelity}, {}))
        times[fidelity] = time.monotonic() - started
    assert times["low"] < times["high"] - 0.1


def test_perovskite_anneal_optimum_and_output_ranges():
    truth = detector(materials.PerovskiteAnneal()).true_value
    best = truth(materials.QUALITY_ARGMAX)
    assert best["quality"] == pytest.approx(materials.QUALITY_MAXIMUM)
    found = -min(
        minimize(lambda x, s=s, r=r: -truth({"temperature": x[0], "time": x[1], "cycles": 10, "solvent": s,
                                              "ratio": r, "pressure": 1.0})["quality"],
                 [165.0, 100.0], bounds=[(80, 250), (1, 600)], method="L-BFGS-B").fun
        for s, r in itertools.product(materials.SOLVENTS, (0.25, 0.5, 1.0, 2.0))
    )
    assert found == pytest.approx(materials.QUALITY_MAXIMUM, abs=1e-6)
    for cycles in range(1, 10):  # fewer cycles never beat 10
        assert truth({**materials.QUALITY_ARGMAX, "cycles": cycles})["quality"] < best["quality"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = {"temperature": rng.uniform(80, 250), "time": rng.uniform(1, 600), "cycles": int(rng.integers(1, 11)),
             "solvent": rng.choice(list(materials.SOLVENTS)), "ratio": rng.choice([0.25, 0.5, 1.0, 2.0]),
             "pressure": 1.0}
        out = truth(p)
        assert 0 <= out["quality"] <= 1 and 0 <= out["yield"] <= 1 and out["cost"] > 0


def test_perovskite_instrument_sets_categorical_discrete_and_fixed_on_signals():
    binding = materials.PerovskiteAnneal(noise=0.0)
    assert set(binding.signals) == {"solvent", "ratio", "pressure"}
    assert set(binding.positioners) == {"temperature", "time", "cycles"}
    RE = RunEngine({}, context_managers=[])
    docs = DocumentCollector()
    RE(experiment_plan(binding, materials.QUALITY_ARGMAX, {"trial_id": 1}), docs)
    values, _ = outputs_from_events(binding, docs.events(), ["quality", "cost", "yield"])
    assert values["quality"] == pytest.approx(materials.QUALITY_MAXIMUM)
    assert binding.signals["solvent"].get() == "DMSO" and binding.signals["ratio"].get() == 1.0


# -- realism options --------------------------------------------------------------------------


def measure_many(binding, points, repeats: int = 1) -> list[float]:
    RE = RunEngine({}, context_managers=[])
    docs = DocumentCollector()
    out = []
    for point in points:
        for _ in range(repeats):
            docs.clear()
            RE(experiment_plan(binding, point, {}), docs)
            out.append(outputs_from_events(binding, docs.events())[0]["y"])
    return out


def test_noise_is_seeded_and_of_the_stated_size():
    point = {"x1": 0.0, "x2": 5.0}
    first = measure_many(surfaces.Branin(noise=0.5, seed=42), [point], repeats=40)
    again = measure_many(surfaces.Branin(noise=0.5, seed=42), [point], repeats=40)
    assert first == again
    assert np.std(first, ddof=1) == pytest.approx(0.5, rel=0.35)
    assert np.mean(first) == pytest.approx(surfaces.branin(np.array([0.0, 5.0])), abs=0.3)


def test_heteroscedastic_noise_grows_across_the_space():
    binding = surfaces.Ackley(dim=2, noise=1.0, heteroscedastic=True, seed=0)
    truth = detector(binding).true_value
    low, high = {"x1": -30.0, "x2": -30.0}, {"x1": 30.0, "x2": 30.0}
    near_low = np.array(measure_many(binding, [low], 30)) - truth([-30.0, -30.0])
    near_high = np.array(measure_many(binding, [high], 30)) - truth([30.0, 30.0])
    assert np.std(near_high) > 5 * np.std(near_low)


def test_drift_moves_readings_per_measurement():
    readings = measure_many(surfaces.Branin(drift=0.1), [{"x1": 1.0, "x2": 1.0}], repeats=5)
    assert np.allclose(np.diff(readings), 0.1)


def test_motion_latency_and_exposure_take_time():
    binding = surfaces.Branin(latency=0.15, exposure=0.1)
    started = time.monotonic()
    measure_many(binding, [{"x1": 1.0, "x2": 1.0}])
    assert time.monotonic() - started >= 0.25


def test_failure_rate_is_seeded():
    from bluesky.utils import FailedStatus

    def outcomes(seed: int) -> list[bool]:
        binding = surfaces.Branin(failure_rate=0.5, seed=seed)
        RE = RunEngine({}, context_managers=[])
        result = []
        for _ in range(12):
            try:
                RE(experiment_plan(binding, {"x1": 1.0, "x2": 1.0}, {}))
                result.append(True)
            except FailedStatus:
                result.append(False)
        return result

    first = outcomes(3)
    assert first == outcomes(3)
    assert 0 < sum(first) < 12


def test_durations_may_be_given_with_units_as_in_campaign_files():
    binding = surfaces.Branin(latency="50 ms", exposure="0.02 s")
    assert binding.positioners["x1"].delay == pytest.approx(0.05)
    assert detector(binding).exposure_time == pytest.approx(0.02)
    from closedloop.errors import DeviceError

    with pytest.raises(DeviceError, match="latency='fast'"):
        surfaces.Branin(latency="fast")


@pytest.mark.parametrize("path", sorted(p.name for p in __import__("pathlib").Path(__file__).parents[2].joinpath(
    "campaigns").glob("*.yaml")))
def test_every_example_campaign_builds_its_instrument_and_accepts_its_parameters(path):
    from closedloop.campaign import Campaign, CategoricalParameter, DiscreteParameter, FixedParameter
    from drivers.binding import load_binding

    root = __import__("pathlib").Path(__file__).parents[2] / "campaigns"
    campaign = Campaign.from_yaml(root / path)
    # every example runs on simulated devices; a function source (a computation on Dask) has no binding
    instruments = [i for i in campaign.instruments.values() if not i.computational]
    assert instruments and all(i.target.startswith("simulators.") for i in instruments)
    point = {}
    for name, p in campaign.parameters.items():
        if isinstance(p, FixedParameter):
            point[name] = p.value
        elif isinstance(p, (CategoricalParameter, DiscreteParameter)):
            point[name] = p.values[0]
        else:
            point[name] = p.bounds[0] if p.type == "integer" else (p.bounds[0] + p.bounds[1]) / 2
    for instrument in instruments:
        binding = load_binding(instrument.target, instrument.options)
        binding.check_limits(point)
        assert set(campaign.outputs) <= set(binding.outputs)
