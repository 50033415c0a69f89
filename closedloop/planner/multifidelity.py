"""Multi-fidelity planning: choose where *and from which source* to experiment next, per unit cost.

A campaign may have several sources of the same objective with different costs: a fast simulation
and a slow robot, say. :class:`MultiFidelityPlanner` models them jointly with BoTorch's
``SingleTaskMultiFidelityGP`` (the source is one more input, the *fidelity* ``s`` in [0, 1], 1 being
the target source) and proposes a (point, source) pair. Two acquisitions:

- ``kg``: the cost-aware multi-fidelity knowledge gradient (``qMultiFidelityKnowledgeGradient`` with
  ``InverseCostWeightedUtility``): the expected gain in the best value *at the target source* per
  unit of cost. Principled, and tens of seconds per proposal on a small machine.
- ``ucb`` (default): the MF-GP-UCB rule: the point maximizes the upper confidence bound at the
  target source; the source is the cheapest one still uncertain there. Fractions of a second.

Sources sit on the fidelity axis by cost, ``s = (cost - cheapest) / (dearest - cheapest)``, so the
affine cost model ``cost(s) = cheapest + (dearest - cheapest) * s`` is exact for every source.

Status: a prototype planner (issue 8). The campaign file does not yet declare sources, so the daemon
does not use it, and the benchmark against the expensive source alone is still to be run on a
machine where a multi-fidelity GP fit takes less than the 4 to 40 s it took on a loaded 2-core one.

Example:
    >>> planner = MultiFidelityPlanner({"x1": (-5, 10), "x2": (0, 15)}, {"sim": 0.1, "robot": 1.0},
    ...                                target="robot", output="y", goal="minimize", seed=0)
    >>> [p.metadata["source"] for p in planner.suggest(1)]                       # doctest: +SKIP
    ['sim']
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from closedloop.planner.base import Proposal, Result

SOURCE = "source"  # the key that names the source in a proposal's metadata and a result's parameters


class MultiFidelityPlanner:
    """Cost-aware multi-fidelity Bayesian optimization over a box of continuous parameters.

    Args:
        bounds: parameter name -> (low, high).
        sources: source name -> cost of one experiment (any positive unit); at least two.
        target: the source whose objective counts (usually the dearest, the real experiment).
        output: the objective's name in results.
        goal: ``minimize`` or ``maximize``.
        initial: experiments of the space-filling start, as (source, count) pairs; default: 2 at the
            target and 2 per unit of target cost at each cheaper source, at least 4.
    """

    backend: ClassVar[str] = "multifidelity"

    def __init__(self, bounds: dict[str, tuple[float, float]], sources: dict[str, float], *, target: str,
                 output: str, goal: str = "minimize", seed: int | None = None,
                 initial: list[tuple[str, int]] | None = None, acquisition: str = "ucb", num_fantasies: int = 16,
                 num_restarts: int = 4, raw_samples: int = 128, beta: float = 4.0, threshold: float = 0.1):
        if len(sources) < 2 or target not in sources or min(sources.values()) <= 0:
            raise ValueError("give at least two sources with positive costs, the target among them")
        self.names = list(bounds)
        self.lower = torch.tensor([float(bounds[n][0]) for n in self.names], dtype=torch.double)
        self.upper = torch.tensor([float(bounds[n][1]) for n in self.names], dtype=torch.double)
        self.sources, self.target, self.output = dict(sources), target, output
        self.sign = -1.0 if goal == "minimize" else 1.0  # the model maximizes sign * objective
        cheapest, dearest = min(sources.values()), max(sources.values())
        span = dearest - cheapest or 1.0
        self.fidelity = {name: (cost - cheapest) / span for name, cost in sources.items()}
        self.target_fidelity = self.fidelity[target]
        self.cost_fixed, self.cost_slope = cheapest, span
        if acquisition not in ("ucb", "kg"):
            raise ValueError(f"acquisition {acquisition!r}: use 'ucb' or 'kg'")
        self.acquisition, self.beta, self.threshold = acquisition, beta, threshold
        self.num_fantasies, self.num_restarts, self.raw_samples = num_fantasies, num_restarts, raw_samples
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.seed = seed
        self.X: list[list[float]] = []  # n x (d + 1): unit-cube parameters, then fidelity
        self.Y: list[float] = []
        self.results: list[Result] = []
        self._initial = self._initial_design(initial)

    # -- encoding ---------------------------------------------------------------------------

    def _unit(self, parameters: dict[str, Any]) -> list[float]:
        x = torch.tensor([float(parameters[n]) for n in self.names], dtype=torch.double)
        return ((x - self.lower) / (self.upper - self.lower)).tolist()

    def _parameters(self, unit: torch.Tensor) -> dict[str, float]:
        x = self.lower + unit.clamp(0, 1) * (self.upper - self.lower)
        return {n: float(v) for n, v in zip(self.names, x)}

    def _initial_design(self, initial: list[tuple[str, int]] | None) -> list[tuple[str, torch.Tensor]]:
        if initial is None:
            ratio = max(self.sources.values()) / min(self.sources.values())
            initial = [(self.target, 2)] + [(s, max(2, min(8, int(ratio // 2)))) for s in self.sources if s != self.target]
        d = len(self.names)
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=self.seed if self.seed is not None else 0)
        return [(source, point) for source, count in initial for point in sobol.draw(count).double()]

    def cost(self, source: str) -> float:
        return self.sources[source]

    # -- the verbs -------------------------------------------------------------------------------

    def ingest(self, results: list[Result]) -> None:
        """Add finished experiments; each result's parameters name their source under ``source``."""
        for result in results:
            self.results.append(result)
            if result.values is None or self.output not in result.values:
                continue  # a failed experiment teaches the model nothing about the surface here
            source = result.parameters[SOURCE]
            self.X.append(self._unit(result.parameters) + [self.fidelity[source]])
            self.Y.append(self.sign * float(result.values[self.output]))

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        """``n`` proposals, one at a time; metadata holds the ``source`` and its ``cost``."""
        proposals = []
        for _ in range(n):
            if self._initial:
                source, unit = self._initial.pop(0)
                meta: dict[str, Any] = {"generator": "sobol"}
            elif self.acquisition == "kg":
                unit, source, meta = self._knowledge_gradient()
            else:
                unit, source, meta = self._ucb_then_cheapest_informative()
            parameters = self._parameters(unit)
            proposals.append(Proposal({**parameters, SOURCE: source},
                                      {**meta, SOURCE: source, "cost": self.sources[source]}))
        return proposals

    def recommend(self) -> dict[str, float] | None:
        """The point with the best posterior mean at the target source (what to build or report)."""
        if not self.X:
            return None
        model = self._model()
        unit, _ = self._best_at_target(model)
        return self._parameters(unit)

    def best(self) -> Result | None:
        """The best measured result at the target source."""
        at_target = [r for r in self.results if r.values is not None and r.parameters.get(SOURCE) == self.target]
        if not at_target:
            return None
        return max(at_target, key=lambda r: self.sign * r.values[self.output])  # type: ignore[index]

    # -- BoTorch -----------------------------------------------------------------------------------

    def _model(self) -> Any:
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskMultiFidelityGP
        from gpytorch.mlls import ExactMarginalLogLikelihood

        X = torch.tensor(self.X, dtype=torch.double)  # n x (d + 1)
        Y = torch.tensor(self.Y, dtype=torch.double).unsqueeze(-1)  # n x 1
        model = SingleTaskMultiFidelityGP(X, Y, data_fidelities=[X.shape[-1] - 1])
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        return model

    def _best_at_target(self, model: Any) -> tuple[torch.Tensor, float]:
        from botorch.acquisition import PosteriorMean
        from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
        from botorch.optim import optimize_acqf

        d = len(self.names)
        mean = FixedFeatureAcquisitionFunction(PosteriorMean(model), d + 1, [d], [self.target_fidelity])
        unit, value = optimize_acqf(mean, torch.stack([torch.zeros(d), torch.ones(d)]).double(), q=1,
                                    num_restarts=self.num_restarts, raw_samples=self.raw_samples)
        return unit.squeeze(0), float(value)

    def _knowledge_gradient(self) -> tuple[torch.Tensor, str, dict[str, Any]]:
        from botorch.acquisition.cost_aware import InverseCostWeightedUtility
        from botorch.acquisition.knowledge_gradient import qMultiFidelityKnowledgeGradient
        from botorch.acquisition.utils import project_to_target_fidelity
        from botorch.models.cost import AffineFidelityCostModel
        from botorch.optim.optimize import optimize_acqf_mixed

        d = len(self.names)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            model = self._model()
            _, current = self._best_at_target(model)
            cost_model = AffineFidelityCostModel(fidelity_weights={d: self.cost_slope}, fixed_cost=self.cost_fixed)
            target = {d: self.target_fidelity}
            acquisition = qMultiFidelityKnowledgeGradient(
                model, num_fantasies=self.num_fantasies, current_value=torch.tensor(current, dtype=torch.double),
                cost_aware_utility=InverseCostWeightedUtility(cost_model=cost_model),
                project=lambda X: project_to_target_fidelity(X=X, target_fidelities=target, d=d + 1))
            bounds = torch.stack([torch.zeros(d + 1), torch.ones(d + 1)]).double()
            candidate, value = optimize_acqf_mixed(
                acquisition, bounds=bounds, q=1, num_restarts=self.num_restarts, raw_samples=self.raw_samples,
                fixed_features_list=[{d: f} for f in sorted(set(self.fidelity.values()))],
                options={"batch_limit": 4, "maxiter": 100})
        fidelity = float(candidate[0, d])
        source = min(self.fidelity, key=lambda s: abs(self.fidelity[s] - fidelity))
        return candidate[0, :d], source, {"generator": "mf-kg", "acquisition_value": float(value)}

    def _ucb_then_cheapest_informative(self) -> tuple[torch.Tensor, str, dict[str, Any]]:
        """Where: the upper confidence bound at the target source. Which source: the cheapest one that
        is still uncertain there (posterior standard deviation above ``threshold`` x the spread of the
        observations), else the target. The rule of MF-GP-UCB (Kandasamy et al., 2016): cheap sources
        explore, the expensive one confirms; a fraction of a second per proposal where the
        knowledge gradient takes tens of seconds."""
        from botorch.acquisition import UpperConfidenceBound
        from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
        from botorch.optim import optimize_acqf

        d = len(self.names)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            model = self._model()
            ucb = FixedFeatureAcquisitionFunction(UpperConfidenceBound(model, beta=self.beta), d + 1, [d],
                                                  [self.target_fidelity])
            unit, value = optimize_acqf(ucb, torch.stack([torch.zeros(d), torch.ones(d)]).double(), q=1,
                                        num_restarts=self.num_restarts, raw_samples=self.raw_samples)
            unit = unit.squeeze(0)
            spread = float(torch.tensor(self.Y, dtype=torch.double).std()) or 1.0
            chosen = self.target
            for source in sorted(self.sources, key=self.sources.__getitem__):
                if source == self.target or self.sources[source] >= self.sources[self.target]:
                    continue
                X = torch.cat([unit, torch.tensor([self.fidelity[source]], dtype=torch.double)]).unsqueeze(0)
                std = float(model.posterior(X).variance.sqrt().squeeze().detach())
                if std > self.threshold * spread:
                    chosen = source
                    break
        return unit, chosen, {"generator": "mf-ucb", "acquisition_value": float(value)}
