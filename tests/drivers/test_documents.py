"""Bluesky documents kept with a trial: collection, JSON lines and reading outputs back from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from event_model import pack_event_page

from drivers.documents import DocumentCollector, dumps_document
from drivers.plans import experiment_plan
from drivers.readout import outputs_from_events
from simulators.multiobjective import ZDT1

MD = {"campaign": "docs", "trial_id": 11, "planner": {"acquisition": "qLogNEHVI"}}


def test_a_run_round_trips_through_json_lines_and_gives_the_same_outputs(RE, docs, tmp_path):
    binding = ZDT1(noise=0.01, seed=1)
    binding.repeats = 2
    setpoints = {f"x{i}": 0.1 * i for i in range(1, 7)}
    RE(experiment_plan(binding, setpoints, MD), docs)
    assert [name for name, _ in docs.documents] == ["start", "descriptor", "event", "event", "stop"]
    path = docs.write_jsonl(tmp_path / "trial-11.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["name"] for line in lines)
    replay = DocumentCollector.from_jsonl(path.read_text())
    assert replay.start == json.loads(json.dumps(docs.start))
    assert replay.start["trial_id"] == 11 and replay.start["parameters"] == setpoints
    assert outputs_from_events(binding, replay.events()) == outputs_from_events(binding, docs.events())
    values, noise = outputs_from_events(binding, docs.events())
    assert set(values) == {"f1", "f2"} and set(noise) == {"f1", "f2"}


def test_event_pages_are_unpacked_and_other_streams_ignored():
    collector = DocumentCollector()
    collector("start", {"uid": "run"})
    collector("descriptor", {"uid": "d1", "run_start": "run", "name": "primary"})
    collector("descriptor", {"uid": "d2", "run_start": "run", "name": "baseline"})
    events = [{"uid": f"e{i}", "time": float(i), "seq_num": i, "descriptor": "d1", "data": {"y": float(i)},
               "timestamps": {"y": 0.0}, "filled": {}} for i in (1, 2)]
    collector("event_page", pack_event_page(*events))
    collector("event", {**events[0], "uid": "b", "descriptor": "d2", "data": {"y": 99.0}})
    assert [e["data"]["y"] for e in collector.events()] == [1.0, 2.0]
    assert len(collector.events(stream=None)) == 3


def test_numpy_values_and_non_finite_numbers_serialize_as_valid_json():
    line = dumps_document("event", {"data": {"img": np.arange(3), "v": np.float32(1.5), "bad": float("nan")}})
    assert json.loads(line) == {"name": "event", "doc": {"data": {"img": [0, 1, 2], "v": 1.5, "bad": "nan"}}}
    with pytest.raises(TypeError):
        dumps_document("event", {"data": {"obj": object()}})
