"""The ``ax`` backend: Ax's ``Client`` API with its default generation strategy, behind our protocol.

Ax keeps its own ``Experiment`` of trials. Every proposal we hand out is an Ax trial left RUNNING
until its result comes back, which is how Ax itself treats experiments in flight: the pending points
of its acquisition. Results that Ax did not propose (a campaign rebuilt from the store, experiments
added by hand) are attached as trials of their own, so Ax learns from every experiment run.

Example:
    >>> from closedloop.campaign import Campaign
    >>> campaign = Campaign.from_yaml_text('''
    ... name: demo
    ... parameters:
    ...   x: {type: continuous, bounds: [0, 1]}
    ... objectives:
    ...   y: {goal: minimize}
    ... budget: {experiments: 10}
    ... planner: {backend: ax, seed: 0}
    ... instrument: {simulator: "simulators.surfaces:Branin"}
    ... ''')
    >>> planner = AxPlanner(campaign)
    >>> [proposal] = planner.suggest(1)
    >>> 0.0 <= proposal.parameters["x"] <= 1.0
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
)
from closedloop.errors import PlannerError, PlannerWaiting, SpaceExhausted
from closedloop.planner.base import Proposal, Result, proposal_count
from closedloop.planner.observations import ObservationLog, check_pending, check_results, finite_number
from closedloop.planner.space import Space

log = logging.getLogger(__name__)
# Importing Ax logs "Ax SQL storage initialized with SQLAlchemy ..." at INFO on its own stderr handler, before
# set_stderr_log_level can be called: every `closedloop run`/`suggest` of an ax campaign opened with that line.
# A filter (unlike a level, which Ax resets when it makes the logger) keeps its warnings.
logging.getLogger("ax.storage.sqa_store.with_db_settings_base").addFilter(lambda record: record.levelno >= logging.WARNING)

_Key = tuple[tuple[str, Any], ...]


class AxPlanner:
    """Ax ``Client`` with its default generation strategy (Sobol, then a GP chosen by Ax).

    Handles continuous (linear or log), integer, categorical, discrete and fixed parameters,
    ``<=``/``>=`` linear constraints on linear-scale continuous and integer parameters, one or several
    objectives (thresholds become Ax's objective thresholds) and outcome constraints. It refuses,
    at construction, candidate tables and equality constraints (written ``==`` or as a pair of
    inequalities that leave no room), naming the campaign field.
    """

    backend: ClassVar[str] = "ax"

    def __init__(self, campaign: Campaign):
        problems = unsupported(campaign)
        if problems:
            raise PlannerError("; ".join(problems))
        from ax.api.client import Client
        from ax.exceptions.core import UserInputError
        from ax.utils.common.logger import set_stderr_log_level

        # Ax prints every trial at INFO on its own stderr handler; our loop logs transitions itself.
        set_stderr_log_level(logging.WARNING)

        self.campaign = campaign
        self.seed = campaign.planner.seed if campaign.planner.seed is not None else 0
        # Ax parses names with sympy, where words such as ``yield`` or ``lambda`` break: Ax sees
        # neutral names (p0, p1... for parameters, m0, m1... for outputs) and we translate.
        self.names = {name: f"p{i}" for i, name in enumerate(campaign.tunable_parameters)}
        self.metrics = {name: f"m{i}" for i, name in enumerate(campaign.outputs)}
        self.client = Client(random_seed=self.seed)
        try:
            self._configure(campaign)
        except UserInputError as exc:  # e.g. a parameter range too narrow for Ax's numerics
            raise PlannerError(f"planner.backend: Ax refuses this campaign: {exc}") from None
        self.results: list[Result] = []
        self._running: dict[int, _Key] = {}  # Ax trial index -> parameters, for experiments in flight
        self._abandoned: set[_Key] = set()  # dropped by the caller: Ax never proposes these again
        grid = Space(campaign).grid
        # Ax never repeats a point of a finite space, and near its end spends ~24 s per call rejection
        # sampling before it says so: the size lets us ask only for what is left
        self._points = len(grid) if grid is not None else None

    def _configure(self, campaign: Campaign) -> None:
        self.client.configure_experiment(
            parameters=[_parameter_config(self.names[name], p) for name, p in campaign.tunable_parameters.items()],
            parameter_constraints=[_constraint_text({self.names[n]: v for n, v in c.coefficients.items() if n in self.names},
                                                    c.op, c.rhs - _fixed_part(campaign, c.coefficients))
                                   for c in campaign.linear_constraints if set(c.coefficients) & set(self.names)],
            name=campaign.name,
        )
        self.client.configure_optimization(
            objective=_objective_text(campaign, self.metrics),
            outcome_constraints=_outcome_constraints(campaign, self.metrics) or None,
        )
        if campaign.planner.initial_experiments is not None:
            # the file's space-filling start (the centre, then Sobol points) before Ax's model, as for botorch;
            # without one Ax's own default (5). It had been Ax's 5 whatever the file said.
            self.client.configure_generation_strategy(initialization_budget=campaign.planner.initial_experiments)

    # -- the protocol ----------------------------------------------------------------------

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        """``n`` new Ax trials; ``pending`` are the experiments in flight, kept RUNNING in Ax."""
        n = proposal_count(n)
        check_pending(self.campaign, pending or [])
        if n < 1:
            return []
        self._sync_pending(pending or [])
        proposals: list[Proposal] = []
        one_by_one = False
        while len(proposals) < n:
            # Ax may hand out fewer trials than asked while its generation step is capped.
            ask = 1 if one_by_one else n - len(proposals)
            if self._points is not None:
                tried = ({_key(self._typed(r.parameters)) for r in self.results} | set(self._running.values())
                         | self._abandoned)
                ask = min(ask, self._points - len(tried))
            try:
                trials = self._next_trials(ask) if ask > 0 else None
            except PlannerWaiting:
                if ask > 1:  # Ax refuses a batch past what its step has left, not the points it has left
                    one_by_one = True
                    continue
                if proposals:
                    return proposals  # the rest once results come in
                raise
            if trials is None:  # the finite space has fewer points left than asked
                if ask > 1:  # Ax refuses the batch, not the points
                    one_by_one = True
                    continue
                proposals += self._dropped_points(n - len(proposals))
                if proposals:
                    return proposals  # the rest of the space, as a candidate table gives its last rows
                raise SpaceExhausted("the ax backend has proposed every point of this finite space and does not "
                                   "repeat experiments (the botorch backend does)")
            if not trials:
                raise PlannerError(f"the ax backend could not propose {n} experiments ({len(proposals)} given)")
            for index, parameters in trials.items():
                values = self._decode(parameters)
                self._running[index] = _key(values)
                log.info("ax trial %d proposed: %s", index, values)
                proposals.append(Proposal(values, {"generator": "ax", "ax_trial": index}))
        return proposals

    def ingest(self, results: list[Result]) -> None:
        """Completes (or fails) the matching Ax trials; experiments Ax never proposed are attached.

        All or none, as every backend: a result whose parameters cannot be an experiment of the campaign
        raises :class:`PlannerError` and nothing is taken (Ax attached a value outside the limits as a
        trial of its own, and a missing parameter raised ``KeyError`` with the results before it taken).
        """
        check_results(self.campaign, results)
        for result in results:
            index = self._take_running(_key(self._typed(result.parameters)))
            if index is None:
                index = self.client.attach_trial(parameters=self._ax_parameters(result.parameters))
            values = self._outcome(result)
            if values is None:
                self.client.mark_trial_failed(index, failed_reason="experiment failed or gave no value")
                log.info("ax trial %d failed (our trial %s)", index, result.trial)
            else:
                self.client.complete_trial(index, raw_data={self.metrics[k]: v for k, v in values.items()})
                log.info("ax trial %d completed (our trial %s): %s", index, result.trial, values)
            self.results.append(result)

    def best(self) -> Result | None:
        """The experiment Ax reports as best (its model's estimate), or None before any result.

        Several objectives have no single best: this returns None then (see :meth:`pareto_front`).
        """
        if len(self.campaign.objectives) != 1:
            return None
        done = [r for r in self.results if self._outcome(r) is not None]
        if not done:
            return None
        try:
            _, _, index, _ = self.client.get_best_parameterization(use_model_predictions=True)
            chosen = self._result_of_trial(index)
            # Ax's model may pick an experiment whose reading broke an outcome constraint (g=1.0 under
            # 'g >= 5' when none met it): only experiments that satisfy them count, as in every backend
            if chosen is not None and all(b.satisfied(float(chosen.values[b.output]))  # type: ignore[index]
                                          for b in self.campaign.output_bounds):
                return chosen
        except Exception as exc:  # Ax raises assorted errors while it has no feasible point yet
            log.debug("ax get_best_parameterization failed: %s", exc)
        return _observed_best(self.campaign, done)

    def pareto_front(self) -> list[Result]:
        """The non-dominated feasible experiments (several objectives only), as every backend reports them.

        Not Ax's in-sample frontier: before Ax's first proposal (a planner rebuilt from the store, as
        ``closedloop.pareto_front`` builds it) that raised ``AssertionError: GenerationStrategy not set``, and
        after one it could miss them (it gave none where eight experiments had two).
        """
        if len(self.campaign.objectives) < 2:
            return []
        return self._observed().pareto_front()

    def hypervolume(self) -> float:
        """Hypervolume of the feasible experiments above the reference point, as every backend computes it (it was
        missing here: ``AttributeError`` on an ax campaign of several objectives)."""
        return self._observed().hypervolume()

    def _observed(self) -> ObservationLog:
        observed = ObservationLog(self.campaign)
        observed.add(self.results)
        return observed

    # -- bookkeeping -----------------------------------------------------------------------

    def _sync_pending(self, pending: list[dict[str, Any]]) -> None:
        """Make Ax's RUNNING trials exactly the experiments in flight.

        A trial we proposed that is neither pending nor finished was dropped by the caller: Ax abandons
        it (Ax 1.3 keeps an abandoned trial's point among the pending ones for good, and so never
        proposes it again). A pending experiment Ax does not know (the planner was rebuilt) is attached
        so Ax treats it as pending.
        """
        unmatched = dict(self._running)
        for parameters in pending:
            key = _key(self._typed(parameters))
            index = next((i for i, k in unmatched.items() if k == key), None)
            if index is None:
                index = self.client.attach_trial(parameters=self._ax_parameters(parameters))
                self._running[index] = key
            else:
                del unmatched[index]
        for index in unmatched:
            self.client.mark_trial_abandoned(index)
            self._abandoned.add(self._running.pop(index))

    def _dropped_points(self, n: int) -> list[Proposal]:
        """Up to ``n`` points of a finite space that were proposed, dropped by the caller and never run, as
        new trials. Ax keeps an abandoned trial's point pending for good and never proposes it again: the
        daemon drops the proposals it has not handed out when a result comes in, and a campaign of four
        points had stopped after two ("every point proposed")."""
        from ax.core.base_trial import TrialStatus

        taken = {_key(self._typed(r.parameters)) for r in self.results} | set(self._running.values())
        proposals: list[Proposal] = []
        for trial in list(self.client._experiment.trials.values()):  # by trial index: reproducible
            if len(proposals) >= n:
                break
            if trial.status != TrialStatus.ABANDONED or trial.arm is None:
                continue
            values = self._decode(trial.arm.parameters)
            key = _key(values)
            if key in taken:
                continue
            taken.add(key)
            index = self.client.attach_trial(parameters=self._ax_parameters(values))
            self._running[index] = key
            log.info("ax trial %d proposed again (dropped as trial %d): %s", index, trial.index, values)
            proposals.append(Proposal(values, {"generator": "ax", "ax_trial": index}))
        return proposals

    def _next_trials(self, ask: int) -> dict[int, Any] | None:
        """Up to ``ask`` new Ax trials, or None where Ax says its finite space is used up."""
        from ax.exceptions.core import DataRequiredError, SearchSpaceExhausted

        self._catch_up()
        try:
            with self._failures_count_as_proposed():
                return self.client.get_next_trials(max_trials=ask)
        except SearchSpaceExhausted:
            return None
        except DataRequiredError:
            # Ax's normal wait, not a fault: with several stations its initial design is soon all in flight
            raise PlannerWaiting(f"Ax proposes more once results of its initial experiments are in "
                                 f"({len(self._running)} in flight)") from None

    def _catch_up(self) -> None:
        """Move Ax's generation strategy to the step its trials call for, before it proposes.

        Ax moves at most one step (centre, Sobol, model) per proposal, and a Client rebuilt from the store
        starts at the centre with every result attached: its first proposal came from Sobol, not the model
        the uninterrupted planner was on, and every later one differed (Branin killed after 5 of 16
        experiments: 11 of 16 trials differed). In a planner that attached nothing, no step's criteria are
        met right after the step before it, so its proposals are what they were.
        """
        strategy = self.client._generation_strategy_or_choose()
        strategy.experiment = self.client._experiment
        strategy._maybe_transition_to_next_node(raise_data_required_error=False)

    @contextlib.contextmanager
    def _failures_count_as_proposed(self) -> Iterator[None]:
        """While Ax draws Sobol points, failed experiments count as proposed (Ax's ABANDONED) for the call.

        Ax's Sobol sequence goes on from where its last draw left it and skips points already proposed, except
        failed experiments'. A rebuilt Client starts the sequence again and skips every attached point, so it
        reached the uninterrupted planner's place but drew a failed experiment's point again (Branin, the third
        Sobol experiment failed: the next three proposals differed). Counted as proposed, it is skipped there
        too. Sobol learns nothing from results and counts ABANDONED as FAILED towards its budget; Ax's model
        would take an abandoned point as pending, so the model step keeps them FAILED (but for a batch that
        reaches the model within the call). In a finite space Sobol no longer proposes a failed point again.
        """
        from ax.core.base_trial import TrialStatus

        strategy = self.client._generation_strategy_or_choose()
        experiment = self.client._experiment
        failed = ([t for t in experiment.trials.values() if t.status == TrialStatus.FAILED]
                  if strategy.current_node_name == "Sobol" else [])
        for trial in failed:
            trial._status = TrialStatus.ABANDONED
        try:
            yield
        finally:
            for trial in failed:
                trial._status = TrialStatus.FAILED

    def _take_running(self, key: _Key) -> int | None:
        for index, running in self._running.items():
            if running == key:
                del self._running[index]
                return index
        return None

    def _result_of_trial(self, index: int) -> Result | None:
        trial = self.client._experiment.trials.get(index)
        if trial is None or trial.arm is None:
            return None
        key = _key(self._decode(trial.arm.parameters))
        # a failed replicate of the point (a NaN, no values) is not its result: it had been returned as the best
        matches = [r for r in self.results if self._outcome(r) is not None and _key(self._typed(r.parameters)) == key]
        return matches[-1] if matches else None

    def _outcome(self, result: Result) -> dict[str, float] | None:
        """The outputs Ax needs, or None when the experiment failed or gave a non-finite value."""
        if result.values is None:
            return None
        out: dict[str, float] = {}
        for name in self.campaign.outputs:
            value = result.values.get(name)
            # as ObservationLog.usable: a value that is not a number is a failure, not a crash of ingest
            if not finite_number(value):
                return None
            out[name] = float(value)
        return out

    def _typed(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """Parameter values in their declared types (Ax and JSON may turn ints into floats)."""
        out: dict[str, Any] = {}
        for name, p in self.campaign.parameters.items():
            if isinstance(p, FixedParameter):
                out[name] = p.value
            else:
                out[name] = _cast(p, parameters[name])
        return out

    def _decode(self, ax_parameters: dict[str, Any]) -> dict[str, Any]:
        return self._typed({name: ax_parameters[ax] for name, ax in self.names.items()})

    def _ax_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        typed = self._typed(parameters)
        return {self.names[name]: _to_ax(p, typed[name]) for name, p in self.campaign.tunable_parameters.items()}


def unsupported(campaign: Campaign) -> list[str]:
    """Campaign features the ax backend cannot handle, each naming its field."""
    problems: list[str] = []
    if campaign.candidates is not None:
        problems.append("candidates: the ax backend cannot restrict proposals to a candidate table")
    tunable = campaign.tunable_parameters
    for name, p in tunable.items():
        # Ax takes mixed choices as text: 1 and "1" were one choice, and the space then ran out early
        if isinstance(p, CategoricalParameter) and len({str(v) for v in p.values}) < len(p.values):
            problems.append(f"parameters.{name}: the ax backend reads choices as text, and {p.values} has two "
                            "that read alike")
    for i, c in enumerate(campaign.linear_constraints):
        if c.op == "==":
            # a mixture is the common case: say what a scientist can do, not only what Ax cannot
            problems.append(f"constraints.{i}: the ax backend handles only <= and >= constraints, not {c.text!r}: the "
                            "botorch backend handles it; or leave one of its parameters out of the campaign, bound the "
                            "others with <= and >= (a + b + c == 1 becomes a + b <= 1), and compute it in the "
                            "instrument")
        for name in c.coefficients:
            p = campaign.parameters[name]
            if isinstance(p, FixedParameter):
                continue
            if not isinstance(p, (ContinuousParameter, IntegerParameter)):
                problems.append(f"constraints.{i}: the ax backend constrains only continuous and integer "
                                f"parameters; {name!r} is {p.type}")
            elif isinstance(p, ContinuousParameter) and p.scale == "log":
                problems.append(f"constraints.{i}: the ax backend cannot constrain the log-scale parameter {name!r}")
    if not problems and any(c.op != "==" for c in campaign.linear_constraints):
        from closedloop.planner.space import Space

        # Ax samples its start by rejection and finds nothing in a region of no volume
        equalities = sum(c.op == "==" for c in campaign.linear_constraints)
        if len(Space(campaign).equality_constraints) > equalities:
            problems.append("constraints: some <= and >= constraints leave no room between them (together they are "
                            "an equality), which the ax backend cannot sample; the botorch backend can")
    single = len(campaign.objectives) == 1
    for i, bound in enumerate(campaign.output_bounds):
        if single and bound.output in campaign.objectives:
            problems.append(f"outcome_constraints.{i}: the ax backend cannot constrain the objective {bound.output!r}")
    if not tunable:
        problems.append("parameters: nothing to vary")
    return problems


def _parameter_config(name: str, p: Any) -> Any:
    from ax.api.configs import ChoiceParameterConfig, RangeParameterConfig

    if isinstance(p, ContinuousParameter):
        return RangeParameterConfig(name=name, bounds=(float(p.bounds[0]), float(p.bounds[1])), parameter_type="float",
                                    scaling="log" if p.scale == "log" else "linear")
    if isinstance(p, IntegerParameter):
        return RangeParameterConfig(name=name, bounds=(int(p.bounds[0]), int(p.bounds[1])), parameter_type="int")
    if isinstance(p, DiscreteParameter):
        return ChoiceParameterConfig(name=name, values=[float(v) for v in p.values], parameter_type="float",
                                     is_ordered=True)
    if isinstance(p, CategoricalParameter):
        # Mixed or string choices travel to Ax as strings and are mapped back by _cast.
        kind = _choice_type(p)
        return ChoiceParameterConfig(name=name, values=[_to_ax(p, v) for v in p.values], parameter_type=kind,
                                     is_ordered=False)
    raise PlannerError(f"parameters.{name}: the ax backend cannot handle a {type(p).__name__}")


def _choice_type(p: CategoricalParameter) -> str:
    kinds = {type(v) for v in p.values}
    return "int" if kinds == {int} else "float" if kinds <= {int, float} else "str"


def _to_ax(p: Any, value: Any) -> Any:
    """A value as Ax's search space holds it (see :func:`_parameter_config`)."""
    if isinstance(p, CategoricalParameter):
        return {"int": int, "float": float, "str": str}[_choice_type(p)](value)
    if isinstance(p, DiscreteParameter):
        return float(value)
    return value


def _cast(p: Any, value: Any) -> Any:
    if isinstance(p, ContinuousParameter):
        return min(p.bounds[1], max(p.bounds[0], float(value)))
    if isinstance(p, IntegerParameter):
        return int(round(float(value)))
    if isinstance(p, DiscreteParameter):
        return min(p.values, key=lambda allowed: abs(allowed - float(value)))
    if isinstance(p, CategoricalParameter):
        for allowed in p.values:
            if allowed == value or str(allowed) == str(value):
                return allowed
        raise PlannerError(f"value {value!r} is not one of {p.values}")
    return value


def _key(parameters: dict[str, Any]) -> _Key:
    """A hashable identity for an experiment, tolerant of float round trips."""
    return tuple(sorted((k, float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in parameters.items()))


def _constraint_text(coefficients: dict[str, float], op: str, rhs: float) -> str:
    terms = " + ".join(f"{c!r} * {name}" for name, c in coefficients.items())
    return f"{terms} {op} {rhs!r}"


def _fixed_part(campaign: Campaign, coefficients: dict[str, float]) -> float:
    """The constant a constraint's fixed parameters contribute (moved to the right-hand side)."""
    return sum(c * float(campaign.parameters[n].value) for n, c in coefficients.items()  # type: ignore[union-attr]
               if isinstance(campaign.parameters[n], FixedParameter))


def _objective_text(campaign: Campaign, metrics: dict[str, str]) -> str:
    return ", ".join(metrics[name] if o.goal == "maximize" else f"-{metrics[name]}" for name, o in campaign.objectives.items())


def _outcome_constraints(campaign: Campaign, metrics: dict[str, str]) -> list[str]:
    texts = [f"{metrics[b.output]} {b.op} {b.value!r}" for b in campaign.output_bounds]
    if len(campaign.objectives) > 1:
        # Ax turns a bound on an objective into that objective's threshold (Pareto reference point).
        for name, o in campaign.objectives.items():
            if o.threshold is not None:
                texts.append(f"{metrics[name]} {'>=' if o.goal == 'maximize' else '<='} {o.threshold!r}")
    return texts


def _observed_best(campaign: Campaign, done: list[Result]) -> Result | None:
    name, objective = next(iter(campaign.objectives.items()))
    feasible = [r for r in done if all(b.satisfied(float(r.values[b.output])) for b in campaign.output_bounds)]  # type: ignore[index]
    if not feasible:
        return None
    sign = 1.0 if objective.goal == "maximize" else -1.0
    return max(feasible, key=lambda r: sign * float(r.values[name]))  # type: ignore[index]
