"""The Sobol and random baselines: what they propose in spaces too small for a sequence not to repeat."""

from __future__ import annotations

import pytest

from closedloop.planner import Result, make_planner
from tests.planner.conftest import campaign

FINITE = {
    "three choices": "c: {type: categorical, values: [A, B, C]}",
    "five integers": "n: {type: integer, bounds: [1, 5]}",
    "two by two": "n: {type: integer, bounds: [0, 1]}\nc: {type: categorical, values: [A, B]}",
    "three by two": "c: {type: categorical, values: [A, B, C]}\nd: {type: discrete, values: [1, 2]}",
}


@pytest.mark.parametrize("backend", ["sobol", "random"])
@pytest.mark.parametrize("space", FINITE)
def test_no_point_of_a_finite_space_is_proposed_again_while_one_is_left(backend: str, space: str) -> None:
    # random draws and a Sobol sequence rounded to a few values meet: random gave (0, A) twice in a space of
    # four points while (0, B) had never run, and a batch of five over five integers held three of them
    c = campaign(FINITE[space], experiments=12, backend=backend)
    size = c.space_size()
    assert size is not None
    planner = make_planner(c)
    seen = []
    for trial in range(size):
        (proposal,) = planner.suggest(1)
        seen.append(tuple(proposal.parameters.values()))
        planner.ingest([Result(proposal.parameters, {"y": float(trial)}, trial)])
    assert len(set(seen)) == size, seen
    assert len(planner.suggest(3)) == 3  # then points again, rather than a station waiting
    batch = make_planner(c).suggest(size + 2)
    assert len({tuple(p.parameters.values()) for p in batch[:size]}) == size
    assert len(batch) == size + 2
    pending = [p.parameters for p in make_planner(c).suggest(size - 1)]
    (last,) = make_planner(c).suggest(1, pending=pending)
    assert last.parameters not in pending


@pytest.mark.parametrize("backend", ["sobol", "random"])
def test_an_abandoned_experiment_does_not_make_the_next_proposal_repeat_one_run(backend: str) -> None:
    # a station killed during trial 4 left it abandoned, which the planner is never told: with results of
    # trials 1-3 and 5, the position counted 4 and the sequence gave trial 5's point again as trial 6
    c = campaign("x: {type: continuous, bounds: [0, 1]}\nz: {type: continuous, bounds: [-2, 3]}",
                 experiments=12, backend=backend)
    planner = make_planner(c)
    run = []
    for trial in (1, 2, 3):  # one at a time, as a daemon asks
        (proposal,) = planner.suggest(1)
        run.append(proposal.parameters)
        planner.ingest([Result(proposal.parameters, {"y": float(trial)}, trial)])
    (fourth,) = planner.suggest(1)
    (fifth,) = planner.suggest(1, pending=[fourth.parameters])
    run.append(fifth.parameters)
    planner.ingest([Result(fifth.parameters, {"y": 5.0}, 5)])  # and trial 4 abandoned
    (sixth,) = planner.suggest(1)
    assert sixth.parameters not in run
    (again,) = planner.suggest(1, pending=[sixth.parameters])
    assert again.parameters != sixth.parameters


@pytest.mark.parametrize("backend", ["sobol", "random"])
@pytest.mark.parametrize("space", ["x: {type: continuous, bounds: [0, 1]}", FINITE["three by two"]])
def test_places_held_by_empty_pending_entries_move_the_sequence_on(backend: str, space: str) -> None:
    """The daemon's filler counts the proposals it made as ``pending=[{}] * filled``: they hold places in the
    sequence and have no parameters to compare (a KeyError stopped every daemon whose station waited for the
    model, once the baselines compared pending experiments with the sequence's points)."""
    c = campaign(space, experiments=12, backend=backend)
    planner = make_planner(c)
    first = [planner.suggest(1, pending=[{}] * filled)[0].parameters for filled in range(3)]
    assert all(set(p) == set(c.parameters) for p in first)
    if backend == "sobol":  # the sequence's first three points, as one batch gives them
        assert first == [p.parameters for p in make_planner(c).suggest(3)]
