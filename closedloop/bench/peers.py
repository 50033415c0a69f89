"""The planners compared by the benchmark: ours, Ax, BayBE, Xopt, Optuna TPE and Sobol.

Each :class:`Peer` turns a problem's campaign into its library's own description and runs with that
library's defaults, as a lab would install it. A :class:`Session` is one run: ``suggest(n)`` returns
parameter dicts, ``observe`` gives back what was measured (with noise), ``reported_best`` is the
experiment the tool would report as best. Libraries outside the ``bench`` extra are imported only
here, inside the peer that uses them, so a missing one is reported rather than failing the run.
"""

from __future__ import annotations

import importlib.util
import random
from typing import Any

import numpy as np

from closedloop.bench.problems import Problem
from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
)


class Session:
    """One run of one planner on one problem.

    ``suggest`` may be called again before earlier proposals are observed (several stations): those are in
    flight, and a session passes them to its tool as pending where the tool takes them.
    """

    def suggest(self, n: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def observe(self, points: list[dict[str, Any]], values: list[dict[str, float]]) -> None:
        raise NotImplementedError

    def reported_best(self) -> dict[str, Any] | None:
        """Parameters of the experiment this tool reports as best (single objective)."""
        return None


class Peer:
    """A planner under test. ``modules`` must be importable for it to run."""

    name: str = ""
    label: str = ""
    modules: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """Why the peer cannot run here, or None."""
        absent = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if absent:
            return f"not installed: {', '.join(absent)} (pip install -c constraints.txt -e '.[bench]')"
        return None

    def refuses(self, problem: Problem) -> str | None:
        """Why the peer cannot take this problem (a feature it lacks), or None."""
        return None

    def start(self, problem: Problem, seed: int) -> Session:
        raise NotImplementedError


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def best_observed(problem: Problem, points: list[dict[str, Any]], values: list[dict[str, float]]) -> dict[str, Any] | None:
    """The best noisy reading among the experiments whose readings meet the outcome constraints."""
    name = problem.objective
    feasible = [(p, v) for p, v in zip(points, values) if all(b.satisfied(v[b.output]) for b in problem.campaign.output_bounds)]
    if not feasible:
        return None
    sign = -1.0 if problem.minimize else 1.0
    return max(feasible, key=lambda pv: sign * pv[1][name])[0]


# -- closedloop's own backends ---------------------------------------------------------------


class PlannerSession(Session):
    def __init__(self, campaign: Campaign):
        from closedloop.planner import make_planner

        self.planner = make_planner(campaign)
        self.in_flight: list[dict[str, Any]] = []

    def suggest(self, n: int) -> list[dict[str, Any]]:
        points = [p.parameters for p in self.planner.suggest(n, pending=list(self.in_flight))]
        self.in_flight += points
        return points

    def observe(self, points: list[dict[str, Any]], values: list[dict[str, float]]) -> None:
        from closedloop.planner import Result

        for point in points:
            _take(self.in_flight, point)
        self.planner.ingest([Result(dict(p), dict(v)) for p, v in zip(points, values)])

    def reported_best(self) -> dict[str, Any] | None:
        best = self.planner.best()
        return None if best is None else best.parameters


class ClosedLoopPeer(Peer):
    """One of our ``make_planner`` backends."""

    def __init__(self, name: str, backend: str, label: str, modules: tuple[str, ...] = ()):
        self.name, self.backend, self.label, self.modules = name, backend, label, modules

    def _campaign(self, problem: Problem, seed: int) -> Campaign:
        c = problem.campaign
        return c.model_copy(update={"planner": c.planner.model_copy(update={"backend": self.backend, "seed": seed})})

    def refuses(self, problem: Problem) -> str | None:
        from closedloop.errors import PlannerError

        try:
            self.start(problem, 0)
        except PlannerError as exc:
            return str(exc)
        except Exception:  # not a refusal: the run itself records the error
            return None
        return None

    def start(self, problem: Problem, seed: int) -> Session:
        seed_everything(seed)
        return PlannerSession(self._campaign(problem, seed))


# -- Optuna TPE ------------------------------------------------------------------------------


def _constraint_violations(problem: Problem, values: dict[str, float]) -> list[float]:
    """Optuna's convention: each entry <= 0 when satisfied."""
    return [(values[b.output] - b.value) if b.op == "<=" else (b.value - values[b.output])
            for b in problem.campaign.output_bounds]


class OptunaSession(Session):
    def __init__(self, problem: Problem, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.problem = optuna, problem
        constraints = (lambda t: t.user_attrs["constraints"]) if problem.campaign.output_bounds else None
        sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=constraints)
        directions = ["minimize" if o.goal == "minimize" else "maximize" for o in problem.campaign.objectives.values()]
        self.study = optuna.create_study(sampler=sampler, directions=directions)
        self.distributions = {name: _optuna_distribution(optuna, p) for name, p in problem.campaign.tunable_parameters.items()}
        self.asked: list[Any] = []
        self.points: list[dict[str, Any]] = []
        self.values: list[dict[str, float]] = []

    def suggest(self, n: int) -> list[dict[str, Any]]:
        trials = [self.study.ask(self.distributions) for _ in range(n)]
        self.asked += trials
        return [_with_fixed(self.problem.campaign, dict(t.params)) for t in trials]

    def observe(self, points: list[dict[str, Any]], values: list[dict[str, float]]) -> None:
        objectives = list(self.problem.campaign.objectives)
        for point, value in zip(points, values):
            outcome = [value[o] for o in objectives]
            attrs = {"constraints": _constraint_violations(self.problem, value)} if self.problem.campaign.output_bounds else {}
            trial = next((t for t in self.asked if _same(t.params, point)), None)
            if trial is not None:
                self.asked.remove(trial)
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                self.study.tell(trial, outcome if len(outcome) > 1 else outcome[0])
            else:  # an experiment Optuna did not ask for (the speed test's history)
                params = {k: point[k] for k in self.distributions}
                self.study.add_trial(self.optuna.trial.create_trial(
                    params=params, distributions=self.distributions, values=outcome, user_attrs=attrs))
            self.points.append(point)
            self.values.append(value)

    def reported_best(self) -> dict[str, Any] | None:
        return best_observed(self.problem, self.points, self.values)


def _optuna_distribution(optuna: Any, p: Any) -> Any:
    if isinstance(p, ContinuousParameter):
        return optuna.distributions.FloatDistribution(p.bounds[0], p.bounds[1], log=p.scale == "log")
    if isinstance(p, IntegerParameter):
        return optuna.distributions.IntDistribution(int(p.bounds[0]), int(p.bounds[1]))
    return optuna.distributions.CategoricalDistribution(list(p.values))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b.get(k) for k in a)


def _take(in_flight: list[dict[str, Any]], point: dict[str, Any]) -> None:
    """Removes ``point`` from the proposals in flight (the speed test's history was never proposed)."""
    match = next((i for i, p in enumerate(in_flight) if _same(p, point)), None)
    if match is not None:
        del in_flight[match]


def _with_fixed(campaign: Campaign, point: dict[str, Any]) -> dict[str, Any]:
    for name, p in campaign.parameters.items():
        if isinstance(p, FixedParameter):
            point[name] = p.value
    return point


class OptunaPeer(Peer):
    name, label, modules = "optuna", "Optuna TPE", ("optuna",)

    def start(self, problem: Problem, seed: int) -> Session:
        seed_everything(seed)
        return OptunaSession(problem, seed)


# -- BayBE -----------------------------------------------------------------------------------


class BaybeSession(Session):
    def __init__(self, problem: Problem, seed: int):
        import pandas as pd
        from baybe import Campaign as BaybeCampaign
        from baybe.objectives import ParetoObjective, SingleTargetObjective
        from baybe.parameters import CategoricalParameter as BCategorical
        from baybe.parameters import NumericalContinuousParameter, NumericalDiscreteParameter
        from baybe.searchspace import SearchSpace
        from baybe.targets import NumericalTarget
        from baybe.utils.random import set_random_seed

        set_random_seed(seed)
        self.pd, self.problem = pd, problem
        parameters = []
        for name, p in problem.campaign.tunable_parameters.items():
            if isinstance(p, ContinuousParameter):
                parameters.append(NumericalContinuousParameter(name, bounds=(p.bounds[0], p.bounds[1])))
            elif isinstance(p, IntegerParameter):
                parameters.append(NumericalDiscreteParameter(name, values=tuple(float(v) for v in
                                                                               range(int(p.bounds[0]), int(p.bounds[1]) + 1))))
            elif isinstance(p, DiscreteParameter):
                parameters.append(NumericalDiscreteParameter(name, values=tuple(float(v) for v in p.values)))
            else:
                parameters.append(BCategorical(name, values=tuple(str(v) for v in p.values)))
        targets = [NumericalTarget(name, minimize=o.goal == "minimize") for name, o in problem.campaign.objectives.items()]
        objective = ParetoObjective(targets) if len(targets) > 1 else SingleTargetObjective(targets[0])
        self.campaign = BaybeCampaign(SearchSpace.from_product(parameters), objective)
        self.points: list[dict[str, Any]] = []
        self.values: list[dict[str, float]] = []
        self.in_flight: list[dict[str, Any]] = []

    def _row(self, point: dict[str, Any]) -> dict[str, Any]:
        return {k: (str(point[k]) if isinstance(p, CategoricalParameter) else float(point[k]))
                for k, p in self.problem.campaign.tunable_parameters.items()}

    def suggest(self, n: int) -> list[dict[str, Any]]:
        pending = self.pd.DataFrame([self._row(p) for p in self.in_flight]) if self.in_flight else None
        frame = self.campaign.recommend(batch_size=n, pending_experiments=pending)
        points = [_typed(self.problem.campaign, row) for row in frame.to_dict("records")]
        self.in_flight += points
        return points

    def observe(self, points: list[dict[str, Any]], values: list[dict[str, float]]) -> None:
        rows = []
        for point, value in zip(points, values):
            _take(self.in_flight, point)
            rows.append({**self._row(point), **{o: value[o] for o in self.problem.campaign.objectives}})
        self.campaign.add_measurements(self.pd.DataFrame(rows))
        self.points += points
        self.values += values

    def reported_best(self) -> dict[str, Any] | None:
        return best_observed(self.problem, self.points, self.values)


class BaybePeer(Peer):
    name, label, modules = "baybe", "BayBE", ("baybe",)

    def refuses(self, problem: Problem) -> str | None:
        if problem.campaign.output_bounds:
            return "outcome_constraints: BayBE has no constraints on measured outputs"
        return None

    def start(self, problem: Problem, seed: int) -> Session:
        seed_everything(seed)
        return BaybeSession(problem, seed)


# -- Xopt ------------------------------------------------------------------------------------


class XoptSession(Session):
    """Xopt's expected-improvement generator (MOBO for two objectives), after a random start.

    Its generators take no pending points: with several stations each proposal is made from the results alone.
    """

    initial = 5  # Xopt's examples start its Bayesian generators from a handful of random points

    def __init__(self, problem: Problem, seed: int):
        import pandas as pd
        from gest_api.vocs import VOCS
        from xopt.vocs import random_inputs

        self.pd, self.problem, self.seed = pd, problem, seed
        variables: dict[str, Any] = {}
        for name, p in problem.campaign.tunable_parameters.items():
            if isinstance(p, ContinuousParameter):
                variables[name] = [float(p.bounds[0]), float(p.bounds[1])]
            elif isinstance(p, IntegerParameter):
                variables[name] = {float(v) for v in range(int(p.bounds[0]), int(p.bounds[1]) + 1)}
            elif isinstance(p, DiscreteParameter):
                variables[name] = {float(v) for v in p.values}
            else:
                # Xopt's discrete variables are numbers: categories travel as their index.
                variables[name] = {float(i) for i in range(len(p.values))}
        objectives = {n: o.goal.upper() for n, o in problem.campaign.objectives.items()}
        constraints = {b.output: ["LESS_THAN" if b.op == "<=" else "GREATER_THAN", b.value]
                       for b in problem.campaign.output_bounds}
        self.vocs = VOCS(variables=variables, objectives=objectives, constraints=constraints)
        if len(objectives) > 1:
            from xopt.generators.bayesian.mobo import MOBOGenerator

            reference = dict(zip(objectives, problem.reference or []))
            self.generator = MOBOGenerator(vocs=self.vocs, reference_point=reference)
        else:
            from xopt.generators.bayesian.expected_improvement import ExpectedImprovementGenerator

            self.generator = ExpectedImprovementGenerator(vocs=self.vocs)
        self.random_inputs = random_inputs
        self.count = 0
        self.points: list[dict[str, Any]] = []
        self.values: list[dict[str, float]] = []

    def _decode(self, row: dict[str, Any]) -> dict[str, Any]:
        point = {}
        for name, p in self.problem.campaign.tunable_parameters.items():
            v = row[name]
            point[name] = p.values[int(round(float(v)))] if isinstance(p, CategoricalParameter) else v
        return _typed(self.problem.campaign, point)

    def _encode(self, point: dict[str, Any]) -> dict[str, float]:
        row = {}
        for name, p in self.problem.campaign.tunable_parameters.items():
            row[name] = float(p.values.index(point[name])) if isinstance(p, CategoricalParameter) else float(point[name])
        return row

    def suggest(self, n: int) -> list[dict[str, Any]]:
        if self.count < self.initial:
            rows = self.random_inputs(self.vocs, n, seed=self.seed * 1000 + self.count)
        else:
            rows = self.generator.generate(n)
        self.count += n
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict("records")
        return [self._decode(r) for r in rows]

    def observe(self, points: list[dict[str, Any]], values: list[dict[str, float]]) -> None:
        outputs = list(self.problem.campaign.outputs)
        frame = self.pd.DataFrame([{**self._encode(p), **{o: v[o] for o in outputs}} for p, v in zip(points, values)])
        self.generator.add_data(frame)
        self.count = max(self.count, len(self.points) + len(points))
        self.points += points
        self.values += values

    def reported_best(self) -> dict[str, Any] | None:
        return best_observed(self.problem, self.points, self.values)


class XoptPeer(Peer):
    name, label, modules = "xopt", "Xopt EI", ("xopt",)

    def start(self, problem: Problem, seed: int) -> Session:
        seed_everything(seed)
        return XoptSession(problem, seed)


def _typed(campaign: Campaign, point: dict[str, Any]) -> dict[str, Any]:
    """A peer's point in the campaign's declared types, snapped to allowed values."""
    out: dict[str, Any] = {}
    for name, p in campaign.parameters.items():
        if isinstance(p, FixedParameter):
            out[name] = p.value
            continue
        v = point[name]
        if isinstance(p, ContinuousParameter):
            out[name] = min(p.bounds[1], max(p.bounds[0], float(v)))
        elif isinstance(p, IntegerParameter):
            out[name] = int(round(float(v)))
        elif isinstance(p, DiscreteParameter):
            out[name] = min(p.values, key=lambda a: abs(a - float(v)))
        else:
            match = [a for a in p.values if a == v or str(a) == str(v)]
            if not match:
                raise ValueError(f"{name}: {v!r} is not one of {p.values}")
            out[name] = match[0]
    return out


#: Every peer, in table order. Sobol and ours need nothing beyond the engine.
PEERS: dict[str, Peer] = {
    "botorch": ClosedLoopPeer("botorch", "botorch", "ours (botorch)"),
    "ax": ClosedLoopPeer("ax", "ax", "Ax", ("ax",)),
    "baybe": BaybePeer(),
    "xopt": XoptPeer(),
    "optuna": OptunaPeer(),
    "sobol": ClosedLoopPeer("sobol", "sobol", "Sobol"),
}
