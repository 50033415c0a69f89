"""The encoding: every decoded point satisfies bounds, types and constraints exactly."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from closedloop.errors import CampaignError, PlannerError
from closedloop.planner.space import Space
from tests.planner.conftest import campaign

MIXED = """
t: {type: continuous, bounds: [20, 80]}
rate: {type: continuous, bounds: [0.001, 10], scale: log}
n: {type: integer, bounds: [1, 6]}
solvent: {type: categorical, values: [water, ethanol, 3]}
conc: {type: discrete, values: [0.1, 0.25, 0.5, 1.0]}
pressure: {type: fixed, value: 1.5}
"""

MIXTURE = """
a: {type: continuous, bounds: [0, 1]}
b: {type: continuous, bounds: [0, 1]}
c: {type: continuous, bounds: [0.1, 0.7], scale: log}
n: {type: integer, bounds: [0, 10]}
d: {type: discrete, values: [0.5, 1.5, 2.5, 4.0]}
s: {type: categorical, values: [x, y]}
"""
MIXTURE_CONSTRAINTS = 'constraints: ["a + b + c == 1", "2 * n + d <= 9.5", "n - a >= 1"]'

INTEGER_EQUALITY = """
i: {type: integer, bounds: [0, 9]}
j: {type: integer, bounds: [0, 9]}
x: {type: continuous, bounds: [0, 3]}
w: {type: continuous, bounds: [0, 1]}
v: {type: discrete, values: [0.1, 0.2, 0.7]}
"""
INTEGER_EQUALITY_CONSTRAINTS = 'constraints: ["i + j <= 7", "i + j >= 7", "x + w == 1.2", "x + 0.5 * i + v <= 2.3"]'


def vectors(space: Space) -> st.SearchStrategy[torch.Tensor]:
    # anything an optimizer might return, including values just outside the box
    hi = space.bounds()[1].tolist()
    return st.tuples(*[st.floats(-0.2, h + 0.2, allow_nan=False) for h in hi]).map(
        lambda v: torch.tensor(v, dtype=torch.double))


MIXED_SPACE = Space(campaign(MIXED))
MIXTURE_SPACE = Space(campaign(MIXTURE, extra=MIXTURE_CONSTRAINTS))
INTEGER_SPACE = Space(campaign(INTEGER_EQUALITY, extra=INTEGER_EQUALITY_CONSTRAINTS))


@settings(max_examples=150, deadline=None)
@given(vectors(MIXED_SPACE))
def test_decoded_points_have_declared_types_and_bounds(x: torch.Tensor) -> None:
    p = MIXED_SPACE.decode(x)
    assert MIXED_SPACE.feasible(p, tolerance=0.0)
    assert type(p["n"]) is int and type(p["t"]) is float and type(p["conc"]) is float
    assert p["pressure"] == 1.5
    # decoding the encoding gives the same point back
    assert MIXED_SPACE.decode(MIXED_SPACE.encode(p)) == pytest.approx(p)


@settings(max_examples=100, deadline=None)
@given(vectors(MIXTURE_SPACE))
def test_constrained_points_satisfy_every_constraint(x: torch.Tensor) -> None:
    p = MIXTURE_SPACE.decode(x)
    assert MIXTURE_SPACE.feasible(p, tolerance=1e-9)
    assert abs(p["a"] + p["b"] + p["c"] - 1) <= 1e-6
    assert 2 * p["n"] + p["d"] <= 9.5 + 1e-9 and p["n"] - p["a"] >= 1 - 1e-9


@settings(max_examples=100, deadline=None)
@given(vectors(INTEGER_SPACE))
def test_integer_and_discrete_values_under_constraints(x: torch.Tensor) -> None:
    p = INTEGER_SPACE.decode(x)
    assert p["i"] + p["j"] == 7
    assert abs(p["x"] + p["w"] - 1.2) <= 1e-6
    assert p["x"] + 0.5 * p["i"] + p["v"] <= 2.3 + 1e-9
    assert INTEGER_SPACE.feasible(p, tolerance=1e-9)


INEQUALITIES = """
x1: {type: continuous, bounds: [-5, 10]}
x2: {type: continuous, bounds: [0, 15]}
n: {type: integer, bounds: [0, 4]}
c: {type: categorical, values: [p, q, r]}
"""
INEQUALITY_SPACE = Space(campaign(INEQUALITIES, extra='constraints: ["x1 + x2 <= 12", "x1 + 2 * n >= 0"]'))


@settings(max_examples=150, deadline=None)
@given(vectors(INEQUALITY_SPACE))
def test_inequalities_hold_exactly_not_within_a_tolerance(x: torch.Tensor) -> None:
    p = INEQUALITY_SPACE.decode(x)
    assert INEQUALITY_SPACE.feasible(p, tolerance=0.0)
    assert p["x1"] + p["x2"] <= 12 and p["x1"] + 2 * p["n"] >= 0


def test_a_point_across_an_inequality_by_the_solvers_tolerance_is_moved_inside() -> None:
    # a planner's batch member: the nearest-point solver (HiGHS, feasible within 1e-7) gave x1 + x2 = 12.000000000001
    p = {"x1": 9.226572663473, "x2": 2.773427336528, "n": 0, "c": "r"}
    q = INEQUALITY_SPACE.decode(INEQUALITY_SPACE.encode(p))
    assert q["x1"] + q["x2"] <= 12
    assert q == pytest.approx(p, abs=1e-9)


def test_decoding_moves_a_feasible_point_nowhere() -> None:
    p = {"a": 0.2, "b": 0.5, "c": 0.3, "n": 3, "d": 1.5, "s": "y"}
    assert MIXTURE_SPACE.decode(MIXTURE_SPACE.encode(p)) == pytest.approx(p)


def test_design_points_are_feasible_and_spread() -> None:
    x = MIXTURE_SPACE.sample(32, seed=3)
    points = [MIXTURE_SPACE.decode(row) for row in x]
    assert all(MIXTURE_SPACE.feasible(p) for p in points)
    assert len({MIXTURE_SPACE.key(p) for p in points}) > 20
    assert {p["s"] for p in points} == {"x", "y"}
    # reproducible and resumable
    assert torch.equal(MIXED_SPACE.sample(5, seed=1, start=3), MIXED_SPACE.sample(8, seed=1)[3:])


def test_the_design_gives_every_allowed_value_an_equal_share() -> None:
    """Sixteen design points: each of eight integers twice, each of four numbers and four choices four times.

    Rounding a uniform draw gave the smallest and the largest number half the share of the others (struts in
    {6, 8, 10, 12}: 12 in one point of six), which no scientist reading the first experiments would expect.
    """
    from collections import Counter

    space = Space(campaign("""
n: {type: integer, bounds: [0, 7]}
d: {type: discrete, values: [6, 8, 10, 12]}
s: {type: categorical, values: [a, b, c, e]}
x: {type: continuous, bounds: [0, 1]}
"""))
    for seed in range(3):
        points = [space.decode(row) for row in space.sample(16, seed=seed)]
        assert Counter(p["n"] for p in points) == dict.fromkeys(range(8), 2)
        assert Counter(p["d"] for p in points) == dict.fromkeys([6.0, 8.0, 10.0, 12.0], 4)
        assert Counter(p["s"] for p in points) == dict.fromkeys("abce", 4)


def test_every_k_design_points_hold_each_of_a_categorys_k_choices_once() -> None:
    """Twelve ligands: the first twelve design points try each once, and so do the next twelve, however the
    design is asked for (the daemon asks one point at a time). Sobol's own points had tried eight of twelve in
    nine. Where the count of choices is a power of two the choices are Sobol's own, as before."""
    from collections import Counter

    from torch.quasirandom import SobolEngine

    ligands = ", ".join(f"L{i:02d}" for i in range(12))
    space = Space(campaign(f"""
ligand: {{type: categorical, values: [{ligands}]}}
base: {{type: categorical, values: [a, b, c, e]}}
solvent: {{type: categorical, values: [p, q, r]}}
t: {{type: discrete, values: [90, 105, 120]}}
"""))
    for seed in range(4):
        x = space.sample(36, seed=seed)
        points = [space.decode(row) for row in x]
        for name, k in (("ligand", 12), ("solvent", 3), ("base", 4)):
            for block in range(0, 36, k):
                assert len({p[name] for p in points[block:block + k]}) == k, (seed, name, block)
        assert Counter(p["ligand"] for p in points[:9]).most_common(1)[0][1] == 1
        assert torch.equal(torch.cat([space.sample(1, seed=seed, start=i) for i in range(36)]), x)
        assert torch.equal(torch.cat([space.sample(5, seed=seed, start=0), space.sample(31, seed=seed, start=5)]), x)
        sobol = space.from_uniform(SobolEngine(dimension=space.dim, scramble=True, seed=seed).draw(36, dtype=torch.double))
        base = space.names.index("base")
        assert torch.equal(space.snap(sobol)[:, base], x[:, base])


def test_the_centre_is_the_middle_of_every_number_and_keeps_the_given_categories() -> None:
    like = MIXED_SPACE.sample(1, seed=4)[0]
    centre = MIXED_SPACE.decode(MIXED_SPACE.centre(like))
    assert centre["t"] == 50.0
    assert math.isclose(centre["rate"], 0.1)  # the middle of a log scale: the geometric mean
    assert centre["n"] == 4  # 1..6: the larger of the two middle values, as Ax's centre takes
    assert centre["conc"] == 0.5
    assert centre["solvent"] == MIXED_SPACE.decode(like)["solvent"]
    assert centre["pressure"] == 1.5
    assert MIXED_SPACE.feasible(centre)


def test_constraints_that_pin_a_value_give_a_design_of_that_value() -> None:
    """Two inequalities leaving one value (a polytope with no inside; hypothesis found it in CI): BoTorch's
    hit-and-run sampler refused its start point by 3e-18, and no experiment could be proposed."""
    pinned = 'constraints: ["0.01 * a <= 0.01", "0.02 * a >= 0.02"]'
    space = Space(campaign("a: {type: integer, bounds: [0, 3]}\nb: {type: continuous, bounds: [0, 1]}", extra=pinned))
    assert [space.decode(row)["a"] for row in space.sample(4, seed=0)] == [1, 1, 1, 1]
    with pytest.raises(CampaignError, match=r"leave a single point \(a=1\)"):
        campaign("a: {type: integer, bounds: [0, 3]}", extra=pinned)  # alone, there is nothing to vary
    line = Space(campaign("u: {type: continuous, bounds: [0, 1]}\nv: {type: continuous, bounds: [0, 1]}",
                          extra='constraints: ["u + v <= 1", "u + v >= 1"]'))
    points = [line.decode(row) for row in line.sample(8, seed=1)]
    assert all(line.feasible(p) for p in points)
    assert len({round(p["u"], 6) for p in points}) >= 4, "the design spreads along the line"


def test_an_equality_that_pins_columns_at_their_bounds_leaves_the_other_constrained_columns_free() -> None:
    """``a + b == 2`` with both at most 1 holds only at a = b = 1: the hit-and-run chain, moving along the
    equality in every direction but c's, never moved, and every design point was (1, 1, 0)."""
    for constraints in ('["a + b == 2", "c <= 0.5"]', '["a + b == 2", "c + d == 1"]'):
        space = Space(campaign("a: {type: continuous, bounds: [0, 1]}\nb: {type: continuous, bounds: [0, 1]}\n"
                               "c: {type: continuous, bounds: [0, 1]}\nd: {type: continuous, bounds: [0, 1]}",
                               extra=f"constraints: {constraints}"))
        points = [space.decode(row) for row in space.sample(8, seed=0)]
        assert all(space.feasible(p) and p["a"] == p["b"] == 1 for p in points), constraints
        assert len({round(p["c"], 6) for p in points}) == 8, constraints


def test_unsatisfiable_integer_constraint_is_refused_before_any_experiment() -> None:
    # the campaign loader may catch it already; if not, the planner must
    with pytest.raises((CampaignError, PlannerError), match="constraints"):
        Space(campaign("i: {type: integer, bounds: [0, 5]}\nj: {type: integer, bounds: [0, 5]}",
                       extra='constraints: ["i + j <= 7.5", "i + j >= 7.2"]'))


def test_log_scale_is_logarithmic() -> None:
    u = MIXED_SPACE.encode({"t": 50.0, "rate": 0.1, "n": 3, "solvent": 3, "conc": 0.5, "pressure": 1.5})
    assert u[1].item() == pytest.approx((math.log(0.1) - math.log(0.001)) / (math.log(10) - math.log(0.001)))
    assert u[3].item() == 2.0  # the third category


def test_a_points_key_ignores_float_noise_but_not_values_in_small_units() -> None:
    space = Space(campaign("a: {type: continuous, bounds: [0, 1]}\n"
                           "current: {type: continuous, bounds: [1e-9, 1e-8], scale: log}\n"
                           "c: {type: categorical, values: [x, y]}"))
    point = {"a": 0.3, "current": 1.2e-9, "c": "x"}
    assert space.key({**point, "a": 0.1 + 0.2}) == space.key(point)
    assert space.key(space.decode(space.encode(point))) == space.key(point)
    # nanoamperes: rounded to nine decimals, every current was one point (and every proposal a repeat)
    assert space.key({**point, "current": 1.3e-9}) != space.key(point)
    assert space.key({**point, "c": "y"}) != space.key(point)


def test_a_points_key_keeps_apart_values_decades_below_a_log_ranges_top() -> None:
    space = Space(campaign("k: {type: continuous, bounds: [1e-12, 1], scale: log}"))
    # keyed on a fraction of the raw range, every value below 1e-10 was one point
    low = [space.key({"k": v}) for v in (1e-12, 3e-12, 1e-11, 5e-11)]
    assert len(set(low)) == 4
    assert space.key({"k": 1e-11 * (1 + 1e-14)}) == space.key({"k": 1e-11})
    assert space.key(space.decode(space.encode({"k": 2e-12}))) == space.key({"k": 2e-12})


def test_a_finite_space_is_enumerated_with_its_constraints() -> None:
    finite = """
n: {type: integer, bounds: [0, 4]}
m: {type: integer, bounds: [0, 4]}
d: {type: discrete, values: [0.5, 1.5, 2.5]}
s: {type: categorical, values: [x, y]}
"""
    space = Space(campaign(finite, extra='constraints: ["n + m <= 4", "n + d <= 2.5", "n + d >= 2.5"]'))
    grid = space.grid
    assert grid is not None
    points = [space.decode(x) for x in grid]
    expected = {(n, m, d, s) for n in range(5) for m in range(5) for d in (0.5, 1.5, 2.5) for s in "xy"
                if n + m <= 4 and n + d == 2.5}
    assert {(p["n"], p["m"], p["d"], p["s"]) for p in points} == expected
    assert len(points) == len(expected)
    # a continuous column, or too many points, leaves the search to the optimizer
    assert Space(campaign(MIXED)).grid is None
    assert Space(campaign("\n".join(f"k{i}: {{type: integer, bounds: [0, 9]}}" for i in range(5)))).grid is None


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_every_backend_proposes_discrete_whole_numbers_as_ints(backend: str) -> None:
    """A count of tips [1, 2, 4] reached the instrument as 4.0; values with decimals stay floats."""
    from closedloop.planner import make_planner

    spec = campaign("tips: {type: discrete, values: [1, 2, 4]}\nratio: {type: discrete, values: [0.5, 1, 2]}\n"
                    "x: {type: continuous, bounds: [0, 1]}", backend=backend, seed=3)
    proposals = [p.parameters for p in make_planner(spec).suggest(3)]
    assert all(type(p["tips"]) is int and p["tips"] in (1, 2, 4) for p in proposals), proposals
    assert all(type(p["ratio"]) is float for p in proposals), proposals
    space = Space(spec)
    assert [type(space.decode(torch.full((space.dim,), u))["tips"]) for u in (0.0, 0.5, 1.0)] == [int, int, int]
