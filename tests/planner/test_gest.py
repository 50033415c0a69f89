"""The gest-api adapter: a closedloop planner driven through ``suggest`` / ``ingest`` / ``finalize``."""

from __future__ import annotations

import math

import pytest
from gest_api import Generator
from gest_api.vocs import VOCS

from closedloop.planner.gest import PlannerGenerator, campaign_from_vocs


def vocs() -> VOCS:
    return VOCS(
        variables={"x1": [-5.0, 10.0], "x2": [0.0, 15.0], "solvent": {"water", "ethanol"}, "conc": {0.1, 0.5, 1.0}},
        objectives={"f": "MINIMIZE"},
        constraints={"c": ["LESS_THAN", 5.0]},
        constants={"pressure": 2.0},
        observables={"note"},
    )


def branin(point: dict) -> float:
    x1, x2 = point["x1"], point["x2"]
    return (x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def test_vocs_becomes_the_equivalent_campaign():
    c = campaign_from_vocs(vocs(), backend="ax", seed=4, budget=12)
    assert c.parameters["x1"].type == "continuous" and c.parameters["x1"].bounds == (-5.0, 10.0)
    assert c.parameters["solvent"].type == "categorical" and set(c.parameters["solvent"].values) == {"water", "ethanol"}
    assert c.parameters["conc"].type == "discrete" and c.parameters["conc"].values == [0.1, 0.5, 1.0]
    assert c.parameters["pressure"].type == "fixed" and c.parameters["pressure"].value == 2.0
    assert c.objectives["f"].goal == "minimize"
    assert [b.text for b in c.output_bounds] == ["c <= 5.0"]
    assert (c.planner.backend, c.planner.seed, c.budget.experiments) == ("ax", 4, 12)


def test_a_generator_loop_with_asynchronous_evaluation():
    generator = PlannerGenerator(vocs(), backend="ax", seed=1, budget=10)
    assert isinstance(generator, Generator) and generator.returns_id
    first = generator.suggest(2)
    assert [p["_id"] for p in first] == [0, 1]
    for point in first:
        assert set(point) == {"x1", "x2", "solvent", "conc", "pressure", "_id"}
        assert -5 <= point["x1"] <= 10 and point["solvent"] in {"water", "ethanol"} and point["pressure"] == 2.0
    # One point comes back while the other is still being evaluated: it is pending for the planner.
    done = {**first[0], "f": branin(first[0]), "c": 1.0, "note": "ok"}
    generator.ingest([done])
    [third] = generator.suggest(1)
    assert third["_id"] == 2
    assert (third["x1"], third["x2"]) not in {(p["x1"], p["x2"]) for p in first}
    running = [t for t in generator.planner.client._experiment.trials.values() if t.status.is_running]
    assert len(running) == 2  # the outstanding point and the new one
    generator.ingest([{**first[1], "f": float("nan"), "c": 0.0}, {**third, "f": branin(third), "c": 9.0}])
    assert len(generator.planner.results) == 3 and generator.planner.results[1].failed
    best = generator.planner.best()
    assert best is not None and best.parameters["x1"] == first[0]["x1"]  # the only one meeting c <= 5
    generator.finalize()


def test_unknown_ids_are_refused_and_foreign_points_are_learned():
    generator = PlannerGenerator(vocs(), backend="ax", seed=2)
    with pytest.raises(ValueError, match="_id 7"):
        generator.ingest([{"x1": 0.0, "x2": 1.0, "solvent": "water", "conc": 0.5, "pressure": 2.0, "f": 3.0, "c": 0.0,
                           "_id": 7}])
    generator.ingest([{"x1": 0.0, "x2": 1.0, "solvent": "water", "conc": 0.5, "pressure": 2.0, "f": 3.0, "c": 0.0}])
    assert generator.planner.best().values["f"] == 3.0


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"variables": {"x": [0.0, 1.0], "t": "CONTEXTUAL"}, "objectives": {"f": "MINIMIZE"}}, "variables.t"),
        ({"variables": {"x": [0.0, 1.0]}, "objectives": {"f": "EXPLORE"}}, "objectives.f"),
        ({"variables": {"x": [0.0, 1.0]}}, "objectives"),
    ],
)
def test_refuses_what_a_planner_cannot_take(spec: dict, field: str):
    with pytest.raises(ValueError, match=field):
        PlannerGenerator(VOCS(**spec), backend="ax")


def test_a_batch_with_a_bad_point_is_refused_whole_and_can_be_sent_again():
    generator = PlannerGenerator(VOCS(variables={"x": [0.0, 1.0]}, objectives={"f": "MINIMIZE"}), backend="sobol",
                                 seed=0)
    a, b = generator.suggest(2)
    for bad in (dict(b, f=2.0, _id=999), dict(b, x=7.0, f=2.0), {"_id": b["_id"], "f": 2.0}):
        with pytest.raises(ValueError):
            generator.ingest([dict(a, f=1.0), bad])
        assert generator.planner.log.results == []
    with pytest.raises(ValueError, match="already ingested"):
        generator.ingest([dict(a, f=1.0), dict(a, f=1.0)])
    generator.ingest([dict(a, f=1.0), dict(b, f=2.0)])
    assert len(generator.planner.log.results) == 2 and generator.planner.best().values == {"f": 1.0}


def test_the_ax_backend_refuses_a_bad_point_whole_as_a_value_error():
    # the ax backend took a value outside the limits, and a point without a variable raised KeyError
    generator = PlannerGenerator(VOCS(variables={"x": [0.0, 1.0]}, objectives={"f": "MINIMIZE"}), backend="ax", seed=0)
    a, b = generator.suggest(2)
    for bad, message in ((dict(b, x=7.0, f=2.0), r"x=7.0 is outside \[0.0, 1.0\]"),
                         ({"_id": b["_id"], "f": 2.0}, "parameter 'x' is missing")):
        with pytest.raises(ValueError, match=message):
            generator.ingest([dict(a, f=1.0), bad])
        assert generator.planner.results == []
    generator.ingest([dict(a, f=1.0), dict(b, f=2.0)])
    assert generator.planner.best().values == {"f": 1.0}


def test_wrong_input_to_the_verbs_is_a_value_error_that_names_it():
    generator = PlannerGenerator(VOCS(variables={"x": [0.0, 1.0]}, objectives={"f": "MINIMIZE"}), backend="sobol",
                                 seed=0)
    # int(2.5) had given two points; the standard asks for exactly num_points or a ValueError
    for n in (2.5, "2"):
        with pytest.raises(ValueError, match=f"num_points must be a whole number, got {n!r}"):
            generator.suggest(n)
    [a] = generator.suggest(1)
    # a list had raised TypeError, a word float()'s "could not convert string to float"
    for value in ([1.0], "abc", {"v": 1.0}):
        with pytest.raises(ValueError, match=r"point 0: f=.* is not a number"):
            generator.ingest([dict(a, f=value)])
    # one point on its own had raised AttributeError: 'str' object has no attribute 'get'
    with pytest.raises(ValueError, match="ingest takes a list of points"):
        generator.ingest(dict(a, f=1.0))
    assert generator.planner.log.results == []
    generator.ingest([dict(a, f=1.0)])
    assert generator.planner.best().values == {"f": 1.0}


def test_a_vocs_the_campaign_language_cannot_express_is_a_value_error():
    with pytest.raises(ValueError, match="x-1"):
        PlannerGenerator(VOCS(variables={"x-1": [0.0, 1.0]}, objectives={"f": "MINIMIZE"}), backend="sobol")


def test_whole_number_values_come_back_whole_and_an_id_is_the_generators_own() -> None:
    """Discrete values {1, 2, 4} came back as 2.0 and 4.0; a variable named _id had its value overwritten by the
    point's number; an unhashable _id raised TypeError."""
    generator = PlannerGenerator(VOCS(variables={"n": {1, 2, 4}}, objectives={"f": "MINIMIZE"}), backend="sobol",
                                 seed=0)
    points = generator.suggest(2)
    assert all(type(p["n"]) is int and p["n"] in (1, 2, 4) for p in points), points
    with pytest.raises(ValueError, match=r"_id \[0\] was not suggested by this generator"):
        generator.ingest([{"n": 2, "f": 1.0, "_id": [0]}])
    with pytest.raises(ValueError, match="'_id' names each point this generator suggests"):
        PlannerGenerator(VOCS(variables={"_id": [0.0, 1.0], "x": [0.0, 1.0]}, objectives={"f": "MINIMIZE"}),
                         backend="sobol", seed=0)
