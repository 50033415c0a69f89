"""Property tests: any valid campaign survives a YAML round trip, and the quick planners' proposals
(sobol, random) never leave the declared space: bounds, types, choices and linear constraints.

Proposals of the BoTorch planner are checked in ``tests/planner/``.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from closedloop.campaign import (
    Campaign,
    CampaignFileError,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
)
from closedloop.planner import make_planner
from closedloop.planner.base import Result

# Python keywords and YAML's special words are legal names and values: the round trip must keep them.
NAMES = ["a", "b", "temperature", "yield", "lambda", "x_1", "on", "null"]
OUTPUTS = ["y", "quality", "cost", "f1"]
TEXT_VALUES = ["DMF", "yes", "no", "null", "1.5", "0x10", "A B", "ü", "-", "true"]

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
# short, nonzero coefficients
round2 = st.integers(min_value=1, max_value=300).flatmap(lambda i: st.sampled_from([i / 100, -i / 100]))


@st.composite
def parameters(draw: st.DrawFn, name: str) -> Any:
    kind = draw(st.sampled_from(["continuous", "continuous", "integer", "categorical", "discrete", "fixed"]))
    unit = draw(st.none() | st.sampled_from(["degC", "s", "mL/min"]))
    if kind == "continuous":
        log = draw(st.booleans())
        low = draw(st.floats(min_value=1e-3, max_value=1e3)) if log else draw(finite)
        width = draw(st.floats(min_value=1e-2, max_value=1e4))
        return ContinuousParameter(bounds=(low, low + width), scale="log" if log else "linear", unit=unit)
    if kind == "integer":
        low = draw(st.integers(-50, 50))
        return IntegerParameter(bounds=(low, low + draw(st.integers(1, 60))), unit=unit)
    if kind == "categorical":
        values = draw(st.lists(st.sampled_from(TEXT_VALUES) | st.integers(-5, 5), min_size=2, max_size=5,
                               unique_by=lambda v: (type(v) is str, v)))
        return CategoricalParameter(values=values)
    if kind == "discrete":
        values = draw(st.lists(finite, min_size=2, max_size=6, unique=True))
        return DiscreteParameter(values=values, unit=unit)
    return FixedParameter(value=draw(finite | st.sampled_from(TEXT_VALUES) | st.integers(-9, 9)), unit=unit)


def midpoint(p: Any) -> float:
    """A point of the parameter's own space (an allowed value for integers and discrete ones)."""
    if isinstance(p, DiscreteParameter):
        return p.values[0]
    if isinstance(p, IntegerParameter):
        return (p.bounds[0] + p.bounds[1]) // 2
    return (p.bounds[0] + p.bounds[1]) / 2


@st.composite
def campaigns(draw: st.DrawFn) -> Campaign:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    params = {n: draw(parameters(n)) for n in names}
    if all(isinstance(p, FixedParameter) for p in params.values()):
        params[names[0]] = ContinuousParameter(bounds=(0, 1))
    continuous = [n for n, p in params.items() if isinstance(p, ContinuousParameter)]
    numeric = [n for n, p in params.items() if isinstance(p, (ContinuousParameter, IntegerParameter, DiscreteParameter))]
    constraints: list[str] = []
    # constraints built to hold at a known point of the space, so they are always feasible
    for _ in range(draw(st.integers(0, 2))):
        if not numeric:
            break
        involved = draw(st.lists(st.sampled_from(numeric), min_size=1, max_size=3, unique=True))
        coefficients = {n: draw(round2) for n in involved}
        at_point = sum(c * midpoint(params[n]) for n, c in coefficients.items())
        lhs = " + ".join(f"{c!r} * {n}" for n, c in coefficients.items())
        slack = draw(st.floats(min_value=0, max_value=10))
        op = draw(st.sampled_from(["<=", ">="]))
        constraints.append(f"{lhs} {op} {at_point + slack if op == '<=' else at_point - slack!r}")
    if len(continuous) >= 2 and draw(st.booleans()):
        # a mixture: fractions with a common total
        mix = continuous[:3]
        total = sum(midpoint(params[n]) for n in mix)
        constraints.append(f"{' + '.join(mix)} == {total!r}")
    objective_names = draw(st.lists(st.sampled_from(OUTPUTS), min_size=1, max_size=3, unique=True))
    objectives = {n: {"goal": draw(st.sampled_from(["minimize", "maximize"])),
                      # a threshold is the reference point of several objectives; a lone one is refused
                      **({"threshold": draw(finite)} if len(objective_names) > 1 and draw(st.booleans()) else {})}
                  for n in objective_names}
    # each on its own output: two bounds of one output that no value meets together are refused
    outcome = [f"{output} {draw(st.sampled_from(['>=', '<=']))} {draw(finite)!r}"
               for output in draw(st.lists(st.sampled_from(OUTPUTS + ["purity"]), max_size=2, unique=True))]
    experiments = draw(st.integers(1, 200))
    budget: dict[str, Any] = {"experiments": experiments}
    if draw(st.booleans()):
        budget["hours"] = draw(st.floats(min_value=0.01, max_value=100))
    if draw(st.booleans()):
        # pointing with the goal: a rule against it is refused (met by the first, poor, results)
        toward = ">=" if objectives[objective_names[0]]["goal"] == "maximize" else "<="
        budget["stop_when"] = f"{objective_names[0]} {toward} {draw(finite)!r}"
    execution = {"concurrency": draw(st.integers(1, 8)), "retries": draw(st.integers(0, 3)),
                 "approve": draw(st.booleans())}
    if draw(st.booleans()):
        execution["timeout"] = draw(st.floats(min_value=0.01, max_value=1e5) | st.sampled_from(["90 s", "10 min", "2 h"]))
    planner = {"backend": draw(st.sampled_from(["botorch", "ax", "sobol", "random"])),
               "seed": draw(st.none() | st.integers(0, 2**31)),
               "initial_experiments": draw(st.none() | st.integers(1, experiments))}
    fields = dict(
        name=draw(st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,20}", fullmatch=True)),
        description=draw(st.sampled_from(["", "a test: with colons", "multi\nline", "yes"])),
        parameters=params, constraints=constraints, objectives=objectives, outcome_constraints=outcome,
        budget=budget, execution=execution, planner=planner,
        instrument={"simulator": "simulators.surfaces:Branin", "options": {"noise": draw(finite), "latency": "0.5 s"}},
    )
    try:
        return Campaign(**fields)
    except CampaignFileError as exc:
        # constraints with no slack can pin every parameter ("0.01 * a <= 0.0" with a in [0, 1]): such a file
        # is refused, rightly, so it is not a valid campaign to draw
        if "leave a single point" in str(exc):
            reject()
        raise


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(campaigns())
def test_valid_campaigns_round_trip_through_yaml(campaign: Campaign) -> None:
    text = campaign.to_yaml()
    again = Campaign.from_yaml_text(text, check_instrument=False)
    assert again == campaign
    assert again.to_yaml() == text and again.spec_hash == campaign.spec_hash
    assert yaml.safe_load(text)["name"] == campaign.name


def check_proposal(campaign: Campaign, values: dict[str, Any]) -> None:
    assert list(values) == list(campaign.parameters)
    for name, p in campaign.parameters.items():
        v = values[name]
        if isinstance(p, ContinuousParameter):
            assert isinstance(v, float) and math.isfinite(v) and p.bounds[0] <= v <= p.bounds[1], (name, v, p)
        elif isinstance(p, IntegerParameter):
            assert type(v) is int and p.bounds[0] <= v <= p.bounds[1], (name, v, p)
        elif isinstance(p, (CategoricalParameter, DiscreteParameter)):
            assert v in p.values and type(v) is type(p.values[p.values.index(v)]), (name, v, p)
        else:
            assert v == p.value and type(v) is type(p.value), (name, v, p)
    for constraint in campaign.linear_constraints:
        assert constraint.satisfied(values), (constraint.text, values)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(campaigns(), st.sampled_from(["sobol", "random"]), st.integers(1, 4))
def test_quick_planners_propose_only_points_of_the_declared_space(campaign: Campaign, backend: str, n: int) -> None:
    campaign = campaign.model_copy(update={"planner": campaign.planner.model_copy(update={"backend": backend})})
    event(f"{len(campaign.linear_constraints)} constraints" + (" with an equality" if any(
        c.op == "==" for c in campaign.linear_constraints) else ""))
    event(" ".join(sorted({p.type for p in campaign.parameters.values()})))
    planner = make_planner(campaign)
    first = planner.suggest(n)
    assert len(first) == n
    for proposal in first:
        check_proposal(campaign, proposal.parameters)
    planner.ingest([Result(p.parameters, {o: 0.0 for o in campaign.outputs}) for p in first])
    for proposal in planner.suggest(2, pending=[first[0].parameters]):
        check_proposal(campaign, proposal.parameters)


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["continuous", "log", "x1 + y <= 1", "10 min", "simulators.surfaces:Branin", "minimize"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def paths_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_in(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_in(v, prefix + (i,))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(campaigns(), st.data())
def test_any_corruption_of_a_valid_file_is_reported_never_crashes(campaign: Campaign, data: st.DataObject) -> None:
    tree = yaml.safe_load(campaign.to_yaml())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths_in(tree)[1:]))
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(junk)
        if not isinstance(tree, dict) or not tree:
            break
    text = yaml.safe_dump(tree, sort_keys=False)
    try:
        Campaign.from_yaml_text(text, "c.yaml", check_instrument=False)
    except CampaignFileError as exc:
        assert exc.problems and all(str(p).startswith("c.yaml") and p.message for p in exc.problems)
