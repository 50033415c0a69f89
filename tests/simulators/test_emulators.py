"""Dataset emulators reproduce their training data within the stated error and answer anywhere."""

from __future__ import annotations

import time

import numpy as np
import pytest
from bluesky import RunEngine

from drivers.documents import DocumentCollector
from drivers.plans import experiment_plan
from drivers.readout import outputs_from_events
from simulators import emulators

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory):
    # pytest's own cache survives between runs, so each model is fitted once per checkout.
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("closedloop-emulators") if cache is not None else tmp_path_factory.mktemp("emulators")


def training_rmse(spec, emulator) -> dict[str, float]:
    data = spec.frame()
    predicted = emulator.predict(data.to_dict("records"))
    return {o: float(np.sqrt(np.mean((predicted[o] - data[o].to_numpy()) ** 2))) for o in spec.outputs}


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_suzuki_reproduces_its_training_data(cache_dir, case):
    spec = emulators.suzuki_spec(case)
    rmse = training_rmse(spec, emulators.Emulator.load(spec, cache_dir))
    assert rmse["yld"] < 8.0 and rmse["ton"] < 8.0  # data standard deviations: 12-37 % and 5-32


def test_agnp_reproduces_its_training_data(cache_dir):
    rmse = training_rmse(emulators.AGNP, emulators.Emulator.load(emulators.AGNP, cache_dir))
    assert rmse["loss"] < 0.05  # data standard deviation 0.195


@pytest.mark.slow  # about 5 s to fit 600 points, then cached
def test_crossed_barrel_reproduces_its_training_data(cache_dir):
    spec = emulators.CROSSED_BARREL
    rmse = training_rmse(spec, emulators.Emulator.load(spec, cache_dir))
    assert rmse["toughness"] < 3.0  # J; data standard deviation 10.8 J


def test_the_fitted_model_is_cached_and_reused(cache_dir):
    spec = emulators.suzuki_spec(1)
    first = emulators.Emulator.load(spec, cache_dir)
    cached = list(cache_dir.glob("suzuki-reizman-1-*.pkl"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    started = time.monotonic()
    again = emulators.Emulator.load(spec, cache_dir)
    assert time.monotonic() - started < 0.5
    assert cached[0].stat().st_mtime_ns == stamp  # read, not refitted
    point = {"catalyst": "P1-L4", "t_res": 189.0, "temperature": 110.0, "catalyst_loading": 2.51}
    assert again(point) == first(point)


def test_a_corrupt_cache_file_is_refitted(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (30, 2))
    (tmp_path / "tiny.csv").write_text("a,b,y\n" + "".join(f"{a},{b},{a + b**2}\n" for a, b in x))
    spec = emulators.DatasetSpec(name="tiny", path=tmp_path / "tiny.csv", numeric={"a": (0, 1), "b": (0, 1)},
                                 categorical={}, outputs={"y": (-np.inf, np.inf)})
    first = emulators.Emulator.load(spec, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("tiny-*.pkl")
    path.write_bytes(b"not a pickle")
    again = emulators.Emulator.load(spec, tmp_path / "cache")
    assert again({"a": 0.5, "b": 0.5}) == pytest.approx(first({"a": 0.5, "b": 0.5}))
    assert again({"a": 0.5, "b": 0.5})["y"] == pytest.approx(0.75, abs=0.05)
    with path.open("rb") as handle:
        assert handle.read(1) == b"\x80"  # rewritten as a pickle


def test_suzuki_instrument_uses_the_dataset_names_and_answers_anywhere(cache_dir):
    binding = emulators.SuzukiReizman(case=1, cache_dir=cache_dir)
    assert list(binding.signals) == ["catalyst"]
    assert list(binding.positioners) == ["t_res", "temperature", "catalyst_loading"]
    assert set(binding.outputs) == {"yld", "ton"}
    assert binding.signals["catalyst"].choices == emulators.SUZUKI_CATALYSTS
    rng = np.random.default_rng(0)
    emulator = binding.extras["emulator"]
    for _ in range(50):
        point = {"catalyst": str(rng.choice(emulators.SUZUKI_CATALYSTS)), "t_res": rng.uniform(60, 600),
                 "temperature": rng.uniform(30, 110), "catalyst_loading": rng.uniform(0.48, 2.52)}
        out = emulator(point)
        assert 0.0 <= out["yld"] <= 100.0 and out["ton"] >= 0.0
    best = {"catalyst": "P1-L4", "t_res": 189.0, "temperature": 110.0, "catalyst_loading": 2.51}
    RE = RunEngine({}, context_managers=[])
    docs = DocumentCollector()
    RE(experiment_plan(binding, best, {"trial_id": 1}), docs)
    values, _ = outputs_from_events(binding, docs.events())
    assert values == pytest.approx(emulator(best))
    assert values["yld"] > 80.0  # the best row of the data measured 98.7


def test_agnp_instrument_keeps_the_data_column_names(cache_dir):
    binding = emulators.AgNP(cache_dir=cache_dir)
    assert list(binding.positioners) == ["QAgNO3(%)", "Qpva(%)", "Qtsc(%)", "Qseed(%)", "Qtot(uL/min)"]
    assert binding.positioners["Qtot(uL/min)"].name == "Qtot_uL_min"  # data key safe for every document store
    assert binding.outputs == {"loss": "loss"}
    best = {"QAgNO3(%)": 32.5, "Qpva(%)": 16.0, "Qtsc(%)": 6.5, "Qseed(%)": 4.5, "Qtot(uL/min)": 850.0}
    RE = RunEngine({}, context_managers=[])
    docs = DocumentCollector()
    RE(experiment_plan(binding, best, {"trial_id": 1}), docs)
    assert outputs_from_events(binding, docs.events())[0]["loss"] < 0.25  # best in the data: 0.131
    assert docs.start["parameters"]["Qtot(uL_min)"] == 850.0
    assert docs.start["names"] == {"Qtot(uL_min)": "Qtot(uL/min)"}
