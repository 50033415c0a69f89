"""Multi-fidelity planning: choose where *and from which source* to experiment next, per unit cost.

A campaign may declare several ``sources`` of the same objective with different costs: a fast
simulation and a slow robot, say (``docs/campaign.md``). :class:`MultiFidelityPlanner` models them
jointly with BoTorch's ``SingleTaskMultiFidelityGP`` (the source is one more input, the *fidelity*
``s`` in [0, 1], 1 being the dearest source) and proposes a (point, source) pair. Two acquisitions:

- ``ucb`` (default): after the MF-GP-UCB rule of Kandasamy et al. (2016). *Where*: the point that
  maximizes, at the target source, the log expected improvement over the best target result (the
  upper confidence bound until the target has a result; EI beat UCB here). *Which source*: the
  cheapest one whose prediction there is still uncertain (its posterior standard deviation above
  ``threshold`` times the spread of the observations), else the target. Cheap sources explore,
  the target confirms. About a second per proposal on a busy two-core machine.
- ``kg``: the cost-aware multi-fidelity knowledge gradient (``qMultiFidelityKnowledgeGradient`` with
  ``InverseCostWeightedUtility``): the expected gain in the best value *at the target source* per
  unit of cost. Principled, and tens of seconds per proposal on a small machine.

Sources sit on the fidelity axis by cost, ``s = (cost - cheapest) / (dearest - cheapest)``, so the
affine cost model ``cost(s) = cheapest + (dearest - cheapest) * s`` is exact for every source.

Each proposal's parameters name its source under ``source`` (:data:`closedloop.campaign.SOURCE`),
and so does every stored trial. A proposal depends only on the seed, the results (taken in trial
order) and the pending experiments, so a planner rebuilt from the store after a crash, or by
``closedloop replay``, proposes the same experiments.

Example:
    >>> from closedloop.campaign import load_campaign
    >>> planner = MultiFidelityPlanner(load_campaign("campaigns/branin_multifidelity.yaml"))
    >>> planner.suggest(1)[0].parameters["source"]
    'robot'
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from closedloop.campaign import SOURCE, Campaign, ContinuousParameter, FixedParameter
from closedloop.errors import PlannerError
from closedloop.planner.base import Proposal, Result, proposal_count
from closedloop.planner.models import output_scale
from closedloop.planner.numerics import PLANNER_THREADS, in_planner_numerics
from closedloop.planner.observations import check_pending, check_results, finite_number

__all__ = ["SOURCE", "MultiFidelityPlanner", "unsupported"]


def unsupported(campaign: Campaign) -> list[str]:
    """What of the campaign the multi-fidelity planner cannot handle, each naming the campaign field."""
    problems = []
    if not campaign.sources:
        problems.append("sources: the multi-fidelity planner needs at least two sources")
    for name, p in campaign.parameters.items():
        if not isinstance(p, (ContinuousParameter, FixedParameter)):
            problems.append(f"parameters.{name}: the multi-fidelity planner handles continuous and fixed "
                            f"parameters, not {p.type}")
    if campaign.constraints:
        problems.append("constraints: the multi-fidelity planner does not handle linear constraints")
    if campaign.candidates is not None:
        problems.append("candidates: the multi-fidelity planner does not handle candidate tables")
    if len(campaign.objectives) > 1:
        problems.append("objectives: the multi-fidelity planner optimizes one objective")
    if campaign.outcome_constraints:
        problems.append("outcome_constraints: the multi-fidelity planner does not handle outcome constraints")
    target = campaign.target_source
    if target is not None:
        for name, source in campaign.sources.items():
            if source.cost > campaign.sources[target].cost:
                problems.append(f"sources.{name}.cost: {source.cost:g} is more than the target's "
                                f"{campaign.sources[target].cost:g}; a source dearer than the experiment that counts "
                                "is never worth running")
    return problems


class MultiFidelityPlanner:
    """Cost-aware multi-fidelity Bayesian optimization over the campaign's continuous parameters.

    Args:
        campaign: a campaign with ``sources`` (at least two, one the target) and one objective.
        acquisition: ``ucb`` (default, fast) or ``kg`` (cost-aware knowledge gradient, slow).
        initial: the space-filling start as (source, count) pairs; default: ``planner.initial_experiments``
            (else 2) at the target, and at each cheaper source as many as cost, together, one
            target experiment per cheap source (at least 2, at most 4 per dimension).
        beta: UCB's exploration weight.
        threshold: a cheaper source is chosen while its posterior standard deviation at the chosen
            point exceeds this fraction of the observations' spread.
    """

    backend: ClassVar[str] = "botorch"  # the botorch backend, with a multi-fidelity model (make_planner)
    # suggest thinks in in_planner_numerics: the thread count of every decision, its space-filling start's too
    torch_threads: ClassVar[int] = PLANNER_THREADS

    def __init__(self, campaign: Campaign, *, acquisition: str = "ucb", initial: list[tuple[str, int]] | None = None,
                 beta: float = 4.0, threshold: float = 0.1, num_fantasies: int = 16, num_restarts: int = 4,
                 raw_samples: int = 128):
        problems = unsupported(campaign)
        if problems:
            raise PlannerError("; ".join(problems))
        if acquisition not in ("ucb", "kg"):
            raise PlannerError(f"acquisition {acquisition!r}: use 'ucb' or 'kg'")
        self.campaign = campaign
        self.names = list(campaign.tunable_parameters)
        self.fixed = {n: p.value for n, p in campaign.parameters.items() if isinstance(p, FixedParameter)}
        params = [campaign.parameters[n] for n in self.names]
        self.bounds = [p.bounds for p in params]  # type: ignore[union-attr]
        self.log_scale = torch.tensor([p.scale == "log" for p in params])  # type: ignore[union-attr]
        lower = torch.tensor([p.bounds[0] for p in params], dtype=torch.double)  # type: ignore[union-attr]
        upper = torch.tensor([p.bounds[1] for p in params], dtype=torch.double)  # type: ignore[union-attr]
        self.lower = torch.where(self.log_scale, lower.log(), lower)
        self.upper = torch.where(self.log_scale, upper.log(), upper)
        self.sources = {name: s.cost for name, s in campaign.sources.items()}
        self.target = campaign.target_source or ""
        self.output, objective = next(iter(campaign.objectives.items()))
        self.sign = -1.0 if objective.goal == "minimize" else 1.0  # the model maximizes sign * objective
        cheapest, dearest = min(self.sources.values()), max(self.sources.values())
        span = dearest - cheapest or 1.0
        self.fidelity = {name: (cost - cheapest) / span for name, cost in self.sources.items()}
        self.target_fidelity = self.fidelity[self.target]
        self.cost_fixed, self.cost_slope = cheapest, span
        self.acquisition, self.beta, self.threshold = acquisition, beta, threshold
        self.num_fantasies, self.num_restarts, self.raw_samples = num_fantasies, num_restarts, raw_samples
        self.seed = campaign.planner.seed if campaign.planner.seed is not None else 0
        self.results: list[Result] = []
        self.design = self._initial_design(initial)
        # what each suggest's model proposals rested on, for closedloop.provenance: per point its acquisition value
        # and why its source, each cheaper source's posterior standard deviation there (``source_std``) and the
        # threshold one had to pass to be chosen (``source_threshold``); None after a suggest without a model
        self.last_decision: dict[str, Any] | None = None

    # -- encoding: parameters <-> unit cube (n x d), then the fidelity column ---------------------

    def _unit(self, parameters: dict[str, Any]) -> list[float]:
        x = torch.tensor([float(parameters[n]) for n in self.names], dtype=torch.double)
        x = torch.where(self.log_scale, x.log(), x)
        return ((x - self.lower) / (self.upper - self.lower)).clamp(0, 1).tolist()

    def _parameters(self, unit: torch.Tensor, source: str) -> dict[str, Any]:
        x = self.lower + unit.clamp(0, 1) * (self.upper - self.lower)
        x = torch.where(self.log_scale, x.exp(), x)
        # exp(log(x)) may stray from a bound by an ulp
        values = {n: min(max(float(v), lo), hi) for n, v, (lo, hi) in zip(self.names, x, self.bounds)}
        return {**values, **self.fixed, SOURCE: source}

    # SobolEngine computes its first point in the default dtype: drawn outside, the design (and a replay of
    # it) differed by 1e-7 in a process whose default another library had made float64
    @in_planner_numerics
    def _initial_design(self, initial: list[tuple[str, int]] | None) -> list[tuple[str, torch.Tensor]]:
        if initial is None:
            d = len(self.names)
            at_target = self.campaign.planner.initial_experiments or 2
            initial = [(self.target, at_target)]
            cheaper = [s for s in self.sources if s != self.target]
            for source in cheaper:
                # together the cheap sources' start costs about one target experiment each
                count = int(self.sources[self.target] / self.sources[source])
                initial.append((source, max(2, min(4 * d, count))))
        sobol = torch.quasirandom.SobolEngine(len(self.names), scramble=True, seed=self.seed)
        return [(source, point) for source, count in initial for point in sobol.draw(count)]

    def cost(self, source: str) -> float:
        """What one experiment at ``source`` costs."""
        return self.sources[source]

    # -- the Planner protocol -----------------------------------------------------------------------

    def ingest(self, results: list[Result]) -> None:
        """Add finished experiments; each result's parameters name their source under ``source``.

        All or none, as every backend: it took any result, and one with a parameter missing or out of its limits, or
        a source the campaign lacks, broke every later suggestion (and could be reported as the best)."""
        check_results(self.campaign, results)
        for k, r in enumerate(results):
            if r.parameters.get(SOURCE) not in self.sources:
                raise PlannerError(f"result {k}: source {r.parameters.get(SOURCE)!r} is not one of the campaign's "
                                   f"({', '.join(self.sources)}); none of the {len(results)} results was taken")
        self.results.extend(results)

    def _measured(self, result: Result) -> bool:
        """Whether a result holds a finite reading of the objective (NaN or text is a failed measurement)."""
        return result.values is not None and finite_number(result.values.get(self.output))

    @in_planner_numerics
    def best(self) -> Result | None:
        """The best *measured* result at the target source: what was seen, not a model estimate.

        Cheaper sources never count. :meth:`recommend` gives the model's estimate instead.
        """
        at_target = [r for r in self.results if self._measured(r) and r.parameters.get(SOURCE) == self.target]
        if not at_target:
            return None
        return max(at_target, key=lambda r: self.sign * r.values[self.output])  # type: ignore[index]

    def pareto_front(self) -> list[Result]:
        """One objective: the best result, or nothing."""
        best = self.best()
        return [best] if best is not None else []

    def hypervolume(self) -> float:
        """One objective: refused by name, as every backend refuses it."""
        raise PlannerError(f"hypervolume: the campaign has one objective ({self.output!r}); a hypervolume measures a "
                           "Pareto front of several (best() is the best experiment of one)")

    def recommend(self) -> dict[str, Any] | None:
        """The point with the best posterior mean at the target source (what to build or report)."""
        X, _, _ = self._training_data()
        if len(X) < 2:
            return None
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self._model()
            unit, _ = self._best_at_target(model)
        parameters = self._parameters(unit, self.target)
        del parameters[SOURCE]
        return parameters

    @in_planner_numerics
    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        """``n`` proposals, chosen one after another, each treating the ones before and ``pending`` as
        measured at the model's mean (the kriging believer). Parameters and metadata name the source."""
        n = proposal_count(n)
        check_pending(self.campaign, pending or [])
        pending = [dict(p) for p in pending or []]
        proposals: list[Proposal] = []
        # each model proposal's evidence, by its parameters (closedloop.provenance matches them): one left for the
        # whole call had kept only the last proposal's, and named no point
        points: list[dict[str, Any]] = []
        acquisition = None
        self.last_decision = None
        for _ in range(n):
            started = len(self.results) + len(pending)
            if started < len(self.design):
                source, unit = self.design[started]
                meta: dict[str, Any] = {"generator": "sobol", "design_index": started}
                evidence: dict[str, Any] | None = None
            else:
                X, _, _ = self._training_data()
                if len(X) < 2:  # no model yet (everything failed): keep filling the space at the target
                    sobol = torch.quasirandom.SobolEngine(len(self.names), scramble=True, seed=self.seed + 1)
                    unit, source = sobol.draw(started + 1).double()[-1], self.target
                    meta, evidence = {"generator": "sobol", "design_index": started}, None
                else:
                    # the same seed for the same data: a rebuilt planner proposes the same experiment
                    decision_seed = self.seed * 1_000_003 + started
                    with torch.random.fork_rng():
                        torch.manual_seed(decision_seed)
                        unit, source, meta, evidence = self._model_proposal(pending)
                    if evidence is not None:
                        evidence["seed"] = decision_seed  # each point's own: explain showed 'decision seed -'

            parameters = self._parameters(unit, source)
            proposals.append(Proposal(parameters, {**meta, SOURCE: source, "cost": self.sources[source]}))
            pending.append(parameters)
            if evidence is not None:
                acquisition = evidence.pop("acquisition")  # the same for the whole call: the data are
                points.append({"parameters": parameters, **evidence})
        if points:
            self.last_decision = {"acquisition": acquisition, "points": points}
        return proposals

    # -- BoTorch ------------------------------------------------------------------------------------

    def _training_data(self) -> tuple[list[list[float]], list[float], float]:
        """n x (d + 1) inputs (unit cube, then fidelity) and n outputs (oriented to maximize, in the unit
        :func:`~closedloop.planner.models.output_scale` gives them), in trial order; and that unit."""
        X, Y = [], []
        ordered = sorted(self.results, key=lambda r: r.trial if r.trial is not None else -1)
        for result in ordered:
            if not self._measured(result):
                continue  # a failed experiment teaches this model nothing about the surface
            source = result.parameters.get(SOURCE)
            if source not in self.fidelity:
                continue
            X.append(self._unit(result.parameters) + [self.fidelity[source]])
            Y.append(self.sign * float(result.values[self.output]))
        unit = output_scale(torch.tensor(Y, dtype=torch.double)) if Y else 1.0
        return X, [y / unit for y in Y], unit

    def _model(self) -> Any:
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskMultiFidelityGP
        from gpytorch.mlls import ExactMarginalLogLikelihood

        X_list, Y_list, _ = self._training_data()
        X = torch.tensor(X_list, dtype=torch.double)  # n x (d + 1)
        Y = torch.tensor(Y_list, dtype=torch.double).unsqueeze(-1)  # n x 1
        model = SingleTaskMultiFidelityGP(X, Y, data_fidelities=[X.shape[-1] - 1])
        # a capped L-BFGS run: the fit is most of a proposal's time and more iterations rarely move it
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                         optimizer_kwargs={"options": {"maxiter": 75}})
        return model

    def _believe(self, model: Any, pending: list[dict[str, Any]]) -> Any:
        """The model conditioned on the pending experiments at its own mean: it stops proposing them again."""
        known = [p for p in pending if p.get(SOURCE) in self.fidelity and all(n in p for n in self.names)]
        if not known:
            return model
        X = torch.tensor([self._unit(p) + [self.fidelity[p[SOURCE]]] for p in known], dtype=torch.double)
        with torch.no_grad():
            mean = model.posterior(X).mean  # p x 1
        return model.condition_on_observations(X, mean)

    def _best_at_target(self, model: Any) -> tuple[torch.Tensor, float]:
        from botorch.acquisition import PosteriorMean
        from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
        from botorch.optim import optimize_acqf

        d = len(self.names)
        mean = FixedFeatureAcquisitionFunction(PosteriorMean(model), d + 1, [d], [self.target_fidelity])
        unit, value = optimize_acqf(mean, self._box(d), q=1, num_restarts=self.num_restarts,
                                    raw_samples=self.raw_samples)
        return unit.squeeze(0), float(value)

    @staticmethod
    def _box(d: int) -> torch.Tensor:
        return torch.stack([torch.zeros(d), torch.ones(d)]).double()  # 2 x d

    def _model_proposal(self, pending: list[dict[str, Any]]
                        ) -> tuple[torch.Tensor, str, dict[str, Any], dict[str, Any] | None]:
        """The point (``d``), its source, the proposal's metadata, and the evidence for the decision (None: the
        knowledge gradient weighs the sources within one optimization, and leaves none apart from its value)."""
        model = self._believe(self._model(), pending)
        if self.acquisition == "kg":
            return (*self._knowledge_gradient(model), None)
        return self._ucb_then_cheapest_informative(model)

    def _knowledge_gradient(self, model: Any) -> tuple[torch.Tensor, str, dict[str, Any]]:
        from botorch.acquisition.cost_aware import InverseCostWeightedUtility
        from botorch.acquisition.knowledge_gradient import qMultiFidelityKnowledgeGradient
        from botorch.acquisition.utils import project_to_target_fidelity
        from botorch.models.cost import AffineFidelityCostModel
        from botorch.optim.optimize import optimize_acqf_mixed

        d = len(self.names)
        _, current = self._best_at_target(model)
        cost_model = AffineFidelityCostModel(fidelity_weights={d: self.cost_slope}, fixed_cost=self.cost_fixed)
        target = {d: self.target_fidelity}
        acquisition = qMultiFidelityKnowledgeGradient(
            model, num_fantasies=self.num_fantasies, current_value=torch.tensor(current, dtype=torch.double),
            cost_aware_utility=InverseCostWeightedUtility(cost_model=cost_model),
            project=lambda X: project_to_target_fidelity(X=X, target_fidelities=target, d=d + 1))
        candidate, value = optimize_acqf_mixed(
            acquisition, bounds=self._box(d + 1), q=1, num_restarts=self.num_restarts, raw_samples=self.raw_samples,
            fixed_features_list=[{d: f} for f in sorted(set(self.fidelity.values()))],
            options={"batch_limit": 4, "maxiter": 100})
        fidelity = float(candidate[0, d])
        source = min(self.fidelity, key=lambda s: abs(self.fidelity[s] - fidelity))
        return candidate[0, :d], source, {"generator": "mf-kg", "acquisition_value": float(value)}

    def _ucb_then_cheapest_informative(self, model: Any
                                       ) -> tuple[torch.Tensor, str, dict[str, Any], dict[str, Any]]:
        """Where: the upper confidence bound at the target source. Which source: the cheapest one still
        uncertain there, else the target (MF-GP-UCB: cheap sources explore, the expensive one confirms)."""
        from botorch.acquisition import LogExpectedImprovement, UpperConfidenceBound
        from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
        from botorch.optim import optimize_acqf

        d = len(self.names)
        X, Y, scale = self._training_data()
        at_target = [y for x, y in zip(X, Y) if x[-1] == self.target_fidelity]
        if at_target:
            where = LogExpectedImprovement(model, best_f=max(at_target))
        else:
            where = UpperConfidenceBound(model, beta=self.beta)
        at_fidelity = FixedFeatureAcquisitionFunction(where, d + 1, [d], [self.target_fidelity])
        unit, value = optimize_acqf(at_fidelity, self._box(d), q=1, num_restarts=self.num_restarts,
                                    raw_samples=self.raw_samples)
        unit = unit.squeeze(0)
        spread = float(torch.tensor(Y, dtype=torch.double).std()) or 1.0
        chosen, stds = self.target, {}
        for source in sorted(self.sources, key=self.sources.__getitem__):
            if source == self.target:
                break
            X = torch.cat([unit, torch.tensor([self.fidelity[source]], dtype=torch.double)]).unsqueeze(0)
            with torch.no_grad():
                stds[source] = float(model.posterior(X).variance.sqrt().squeeze())
            if stds[source] > self.threshold * spread:
                chosen = source
                break
        # in the objective's units (the model's are a power of ten apart for outputs like 1e-12), as a prediction's
        evidence = {"acquisition": f"MF-GP-UCB source rule, {type(where).__name__} at the target",
                    "acquisition_value": float(value), "source_std": {s: std * scale for s, std in stds.items()},
                    "source_threshold": self.threshold * spread * scale}
        return unit, chosen, {"generator": "mf-ucb", "acquisition_value": float(value)}, evidence
