"""Encoding between parameter dicts (declared types) and the model's encoded space.

Every tunable parameter takes one column:

- continuous: mapped linearly (or logarithmically) onto [0, 1];
- integer and discrete: mapped linearly onto [0, 1]; the allowed values are the column's grid
  (``Space.discrete_dims``, as BoTorch's mixed optimizers expect); an integer of more than
  ``MAX_INTEGER_VALUES`` values is searched as a continuous column and rounded on decoding, as a list
  of every value would not fit in memory ([0, 1e9]);
- categorical: the index of the choice, ``0 .. k-1`` (``Space.cat_dims``, as
  ``optimize_acqf_mixed_alternating`` expects; the model encodes it one-hot).

Fixed parameters are not encoded and are added back on decoding. Linear constraints of the campaign
become BoTorch ``(indices, coefficients, rhs)`` constraints on the encoded columns; a log-scale
parameter named in a linear constraint is encoded on a linear scale so that the constraint stays linear.

Decoding is exact: integers are integers, discrete values are allowed values, and when the campaign
has linear constraints the decoded point is the nearest (L1, in encoded units) point that satisfies
every bound, type and constraint, found by a small mixed-integer program (HiGHS via SciPy), with
equalities then corrected to float precision.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
    LinearConstraint,
)
from closedloop.errors import ClosedLoopError, PlannerError

# Inequalities are enforced with this relative margin so that float rounding after decoding cannot
# push a point across the boundary; equalities are corrected afterwards to this absolute tolerance.
_INEQUALITY_MARGIN = 1e-9
EQUALITY_TOLERANCE = 1e-9
# a finite space of at most this many points is searched by enumerating it (``Space.grid``)
GRID_LIMIT = 20_000


@dataclass(frozen=True)
class Column:
    """One parameter's place in the encoded vector (one column per tunable parameter)."""

    name: str
    index: int


class Space:
    """The campaign's search space as a ``d``-dimensional encoded box (see the module docstring).

    Example:
        >>> from closedloop.campaign import Campaign
        >>> c = Campaign.from_yaml_text('''
        ... name: demo
        ... parameters:
        ...   a: {type: continuous, bounds: [0, 1]}
        ...   b: {type: continuous, bounds: [0, 1]}
        ... constraints: ["a + b == 1"]
        ... objectives: {y: {goal: minimize}}
        ... budget: {experiments: 5}
        ... instrument: {simulator: "simulators.surfaces:Branin"}
        ... ''')
        >>> p = Space(c).decode(torch.tensor([0.3, 0.3]))
        >>> abs(p["a"] + p["b"] - 1) < 1e-9
        True
    """

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.parameters = campaign.parameters
        tunable = campaign.tunable_parameters
        self.columns = [Column(name, i) for i, name in enumerate(tunable)]
        self.names = [c.name for c in self.columns]
        self.dim = len(self.columns)
        self.constraints: list[LinearConstraint] = [_well_scaled(c) for c in campaign.linear_constraints]
        constrained = {n for c in self.constraints for n in c.coefficients}
        # a log scale would make a linear constraint nonlinear in the encoded column
        self.linear_override = {n for n in constrained if _is_log(self.parameters[n])}
        self._lo = np.zeros(self.dim)
        self._span = np.ones(self.dim)
        for c in self.columns:
            p = self.parameters[c.name]
            if isinstance(p, CategoricalParameter):
                continue
            lo, hi = self._raw_range(c.name)
            self._lo[c.index], self._span[c.index] = lo, hi - lo
        self.cat_dims: dict[int, list[float]] = {
            c.index: [float(i) for i in range(len(p.values))]
            for c in self.columns
            if isinstance(p := self.parameters[c.name], CategoricalParameter)
        }
        # a log-scale column is keyed on its logarithm: in a range of many decades ([1e-12, 1]) a fraction
        # of the raw range would round every value below 1e-10 to one point
        self._key_scales: list[tuple[str, float | None, float, bool]] = []
        for c in self.columns:
            p = self.parameters[c.name]
            if c.index in self.cat_dims:
                self._key_scales.append((c.name, None, 1.0, False))
            elif _is_log(p) and c.name not in self.linear_override:
                lo, hi = math.log(p.bounds[0]), math.log(p.bounds[1])
                self._key_scales.append((c.name, lo, (hi - lo) or 1.0, True))
            else:
                self._key_scales.append((c.name, float(self._lo[c.index]), float(self._span[c.index]) or 1.0, False))
        self.discrete_dims: dict[int, list[float]] = {}
        for c in self.columns:
            p = self.parameters[c.name]
            if isinstance(p, IntegerParameter) and p.bounds[1] - p.bounds[0] < MAX_INTEGER_VALUES:
                lo, hi = int(p.bounds[0]), int(p.bounds[1])
                self.discrete_dims[c.index] = [(v - lo) / (hi - lo) for v in range(lo, hi + 1)]
            elif isinstance(p, DiscreteParameter):
                lo, hi = min(p.values), max(p.values)
                self.discrete_dims[c.index] = [(v - lo) / (hi - lo) for v in p.values]
        self.inequality_constraints, self.equality_constraints = self._botorch_constraints()
        if self.inequality_constraints or self.equality_constraints:
            # inequalities that leave no room are equalities to BoTorch's samplers and optimizers, which
            # otherwise refuse a start point by 3e-18, stay at one vertex, or fix a column and then find
            # the constraint "not met with fixed features"; so are bounds the constraints pin a column to
            self.inequality_constraints, self.equality_constraints = _pinning_as_equalities(
                self.bounds(), self.inequality_constraints, self.equality_constraints)
        self._constrained_names = sorted(constrained, key=self.names.index)
        if self.constraints:
            self._check_integer_feasible()
        self.candidates: list[dict[str, Any]] | None = load_candidates(campaign) if campaign.candidates else None
        self._candidate_x = self.encode_many(self.candidates) if self.candidates else None

    # -- shape of the space ------------------------------------------------------------

    @property
    def categorical_columns(self) -> list[int]:
        return sorted(self.cat_dims)

    @property
    def continuous_columns(self) -> list[int]:
        """Encoded columns of continuous parameters (neither categorical, integer nor discrete)."""
        return [i for i in range(self.dim) if i not in self.cat_dims and i not in self.discrete_dims]

    @property
    def is_continuous(self) -> bool:
        return not self.cat_dims and not self.discrete_dims

    @property
    def has_constraints(self) -> bool:
        return bool(self.constraints)

    def bounds(self) -> torch.Tensor:
        """``2 x d`` bounds of the encoded space."""
        upper = torch.ones(self.dim, dtype=torch.double)
        for i, values in self.cat_dims.items():
            upper[i] = len(values) - 1
        return torch.stack([torch.zeros(self.dim, dtype=torch.double), upper])

    @functools.cached_property
    def grid(self) -> torch.Tensor | None:
        """Every encoded point (``g x d``) of a finite space that satisfies the linear constraints.

        None when a column is continuous or the space has more than ``GRID_LIMIT`` points: then the
        acquisition is maximized by search, not by enumeration.
        """
        if self.dim == 0 or any(i not in self.cat_dims and i not in self.discrete_dims for i in range(self.dim)):
            return None
        values = [self.cat_dims.get(i) or self.discrete_dims[i] for i in range(self.dim)]
        if math.prod(len(v) for v in values) > GRID_LIMIT:
            return None
        x = torch.cartesian_prod(*[torch.tensor(v, dtype=torch.double) for v in values]).reshape(-1, self.dim)
        keep = torch.ones(len(x), dtype=torch.bool)
        for (idx, coef, rhs), equal in [(c, False) for c in self.inequality_constraints] + \
                                      [(c, True) for c in self.equality_constraints]:
            total = x[:, idx] @ coef
            slack = 1e-6 * max(1.0, abs(rhs))
            keep &= (total - rhs).abs() <= slack if equal else total >= rhs - slack
        return x[keep]

    @property
    def candidate_x(self) -> torch.Tensor | None:
        """``r x d`` encoded rows of the candidate table, or None without one."""
        return self._candidate_x

    # -- encoding ----------------------------------------------------------------------

    def encode(self, parameters: dict[str, Any]) -> torch.Tensor:
        """A ``d`` tensor for one parameter dict."""
        return self.encode_many([parameters])[0]

    def encode_many(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """An ``n x d`` tensor, built a column at a time (a candidate table may have a million rows)."""
        x = np.zeros((len(rows), self.dim))
        for c in self.columns:
            p = self.parameters[c.name]
            if isinstance(p, CategoricalParameter):
                x[:, c.index] = [float(_index_of(p, r[c.name])) for r in rows]
            elif c.name in self.linear_override or not _is_log(p):
                x[:, c.index] = (np.array([float(r[c.name]) for r in rows]) - self._lo[c.index]) / self._span[c.index]
            else:
                lo, hi = math.log(p.bounds[0]), math.log(p.bounds[1])
                # math.log, not np.log: the encoding of a stored experiment must not move by an ulp
                x[:, c.index] = (np.array([math.log(float(r[c.name])) for r in rows]) - lo) / (hi - lo)
        return torch.from_numpy(x)

    def decode(self, x: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Parameter values, in their declared types, for one ``d`` vector; exact (see module docstring)."""
        u = np.clip(np.asarray(x, dtype=float).reshape(-1), self.bounds()[0].numpy(), self.bounds()[1].numpy())
        out: dict[str, Any] = {}
        for c in self.columns:
            p = self.parameters[c.name]
            if isinstance(p, CategoricalParameter):
                out[c.name] = p.values[int(round(u[c.index]))]
            else:
                out[c.name] = self._round(c, u[c.index])
        if self.constraints:
            out.update(self._repair(u, out))
        for name, p in self.parameters.items():
            if isinstance(p, FixedParameter):
                out[name] = p.value
        return {name: out[name] for name in self.parameters}

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``n x d``) moved to the encoding of its exact decoded point."""
        return self.encode_many([self.decode(row) for row in x]) if len(x) else x

    def feasible(self, parameters: dict[str, Any], tolerance: float = 1e-6) -> bool:
        """Whether a parameter dict satisfies bounds, types and constraints, the constraints within ``tolerance``
        (relative): where a constraint leaves a single boundary point, its float sum can miss by rounding."""
        for name, p in self.parameters.items():
            v = parameters.get(name)
            if isinstance(p, FixedParameter):
                if v != p.value:
                    return False
            elif isinstance(p, CategoricalParameter):
                if v not in p.values:
                    return False
            elif isinstance(p, DiscreteParameter):
                if v not in p.values:
                    return False
            elif isinstance(p, IntegerParameter):
                if not isinstance(v, int) or isinstance(v, bool) or not p.bounds[0] <= v <= p.bounds[1]:
                    return False
            elif not (isinstance(v, (int, float)) and p.bounds[0] <= v <= p.bounds[1]):
                return False
        for c in self.constraints:
            total = sum(a * float(parameters[n]) for n, a in c.coefficients.items())
            scale = tolerance * max(1.0, abs(c.rhs))
            if (c.op == "<=" and total > c.rhs + scale) or (c.op == ">=" and total < c.rhs - scale):
                return False
            if c.op == "==" and abs(total - c.rhs) > scale:
                return False
        return True

    def key(self, parameters: dict[str, Any]) -> tuple:
        """A hashable identity of a parameter dict: numbers rounded to 1e-10 of their parameter's range (on a
        log scale, of its logarithm's), so that float noise does not split a point and values in any unit stay
        apart (rounded to nine decimals, every value of a range [1e-9, 1e-8] was one point)."""
        return tuple(parameters[name] if lo is None else _key_number(parameters[name], lo, span, log)
                     for name, lo, span, log in self._key_scales)

    # -- sampling ----------------------------------------------------------------------

    def sample(self, n: int, seed: int, start: int = 0) -> torch.Tensor:
        """Points ``start .. start+n`` of a space-filling design (``n x d``), exactly feasible.

        A scrambled Sobol sequence; with linear constraints, hit-and-run samples of the constrained
        polytope (BoTorch's ``get_polytope_samples``) so that the design is spread inside it rather
        than piled on its faces (inequalities that leave no room, ``u + v <= 1`` with ``u + v >= 1``, are
        equalities here: see ``__init__``).
        """
        if n <= 0:
            return torch.zeros(0, self.dim, dtype=torch.double)
        x = self._sobol(n, seed, start)
        if not self.constraints:
            return self.snap(x)
        from botorch.utils.sampling import get_polytope_samples

        # only the columns a constraint names are sampled inside the polytope, the others are the Sobol
        # points': a region without volume in the constrained columns (``a + b >= 2`` with both at most 1)
        # stopped the chain, and with it every other column (one value in every experiment)
        columns = [self.names.index(name) for name in self._constrained_names]
        at = {column: k for k, column in enumerate(columns)}

        def within(constraints: list) -> list:
            return [(torch.tensor([at[int(i)] for i in idx], dtype=torch.long), coef, rhs)
                    for idx, coef, rhs in constraints]

        x[:, columns] = get_polytope_samples(
            n=start + n, bounds=self.bounds()[:, columns],
            inequality_constraints=within(self.inequality_constraints) or None,
            equality_constraints=within(self.equality_constraints) or None, seed=seed, n_burnin=200, n_thinning=8,
        )[start:]
        return self.snap(x)

    def centre(self, like: torch.Tensor) -> torch.Tensor:
        """The encoded centre of the space (``d``), with the categories of ``like`` (an encoded point).

        Continuous columns at the middle of their range (of its logarithm on a log scale), integer and
        discrete ones at their middle allowed value, the larger of the two middle ones where their number
        is even (Ax's convention). Categories have no middle: a fixed choice would favour whichever name
        comes first, so they are ``like``'s.
        """
        x = like.clone()
        for i in range(self.dim):
            if i in self.discrete_dims:
                values = sorted(self.discrete_dims[i])
                x[i] = values[len(values) // 2]
            elif i not in self.cat_dims:
                x[i] = 0.5
        return self.snap(x.unsqueeze(0))[0]

    def _sobol(self, n: int, seed: int, start: int) -> torch.Tensor:
        """Points ``start .. start+n`` of a scrambled Sobol sequence in which every ``k`` points from a multiple of
        ``k`` on hold each of a ``k``-choice categorical column's choices once.

        Sobol's own points do so only where ``k`` is a power of two: nine points over twelve ligands (the
        direct-arylation table) tried eight. Within each such block the choices go in the order of the
        block's Sobol coordinates, so that where ``k`` is a power of two they are Sobol's own.
        """
        from torch.quasirandom import SobolEngine

        sizes = [len(values) for values in self.cat_dims.values()]
        first = min([start] + [start - start % k for k in sizes])
        last = max([start + n] + [-(-(start + n) // k) * k for k in sizes])
        engine = SobolEngine(dimension=self.dim, scramble=True, seed=seed)
        if first:
            engine.fast_forward(first)
        u = engine.draw(last - first, dtype=torch.double)
        for i, values in self.cat_dims.items():
            k = len(values)
            for block in range(start - start % k - first, start + n - first, k):
                column = u[block:block + k, i]
                u[block:block + k, i] = (column.argsort().argsort().to(u.dtype) + 0.5) / k
        return self.from_uniform(u[start - first:start - first + n])

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Encoded points (``n x d``) from draws uniform in the unit cube, each choice of a categorical column
        and each allowed number of an integer or discrete one given an equal share (rounding would give the
        smallest and the largest number half a share each: n in {6, 8, 10, 12}, 12 in one point of six)."""
        x = u.clone()
        for i, values in self.cat_dims.items():
            x[:, i] = (x[:, i] * len(values) - 0.5).clamp(0, len(values) - 1)
        for i, values in self.discrete_dims.items():
            grid = torch.tensor(sorted(values), dtype=x.dtype)
            x[:, i] = grid[(x[:, i] * len(grid)).long().clamp(max=len(grid) - 1)]
        return x

    # -- internals ---------------------------------------------------------------------

    def _raw_range(self, name: str) -> tuple[float, float]:
        p = self.parameters[name]
        if isinstance(p, DiscreteParameter):
            return float(min(p.values)), float(max(p.values))
        return float(p.bounds[0]), float(p.bounds[1])  # type: ignore[union-attr]

    def _round(self, c: Column, u: float) -> Any:
        p = self.parameters[c.name]
        u = min(1.0, max(0.0, u))
        if isinstance(p, ContinuousParameter):
            if _is_log(p) and c.name not in self.linear_override:
                lo, hi = math.log(p.bounds[0]), math.log(p.bounds[1])
                return float(min(p.bounds[1], max(p.bounds[0], math.exp(lo + u * (hi - lo)))))
            return float(min(p.bounds[1], max(p.bounds[0], p.bounds[0] + u * (p.bounds[1] - p.bounds[0]))))
        v = self._lo[c.index] + u * self._span[c.index]
        if isinstance(p, IntegerParameter):
            return int(min(p.bounds[1], max(p.bounds[0], round(v))))
        assert isinstance(p, DiscreteParameter)
        # the allowed value itself: float() turned a count of 4 into 4.0, and range(4.0) fails in a driver
        return min(p.values, key=lambda allowed: abs(allowed - v))

    def _botorch_constraints(self) -> tuple[list, list]:
        """Linear constraints as BoTorch ``(indices, coefficients, rhs)`` tuples, ``sum >= rhs`` / ``== rhs``."""
        inequalities, equalities = [], []
        for c in self.constraints:
            idx = [self.names.index(n) for n in c.coefficients]
            coef = [a * self._span[i] for a, i in zip(c.coefficients.values(), idx)]
            rhs = c.rhs - sum(a * self._lo[i] for a, i in zip(c.coefficients.values(), idx))
            sign = -1.0 if c.op == "<=" else 1.0
            entry = (torch.tensor(idx, dtype=torch.long), torch.tensor([sign * v for v in coef], dtype=torch.double),
                     float(sign * rhs))
            (equalities if c.op == "==" else inequalities).append(entry)
        return inequalities, equalities

    def _milp(self, target: dict[str, float], *, exact: bool = True) -> dict[str, Any] | None:
        """Nearest values (L1, encoded units) of the constrained parameters satisfying every constraint."""
        from scipy.optimize import Bounds, LinearConstraint as ScipyConstraint, milp

        names = self._constrained_names
        # variables: one value per parameter, one deviation per parameter, one binary per discrete value
        n = len(names)
        extra: dict[str, tuple[int, list[float]]] = {}
        width = 2 * n
        for name in names:
            p = self.parameters[name]
            if isinstance(p, DiscreteParameter):
                extra[name] = (width, list(p.values))
                width += len(p.values)
        cost = np.zeros(width)
        lower, upper, integrality = np.zeros(width), np.zeros(width), np.zeros(width)
        rows, lo_b, hi_b = [], [], []
        for k, name in enumerate(names):
            lo, hi = self._raw_range(name)
            lower[k], upper[k] = lo, hi
            integrality[k] = 1 if isinstance(self.parameters[name], IntegerParameter) else 0
            span = hi - lo
            cost[n + k] = 1.0 / span
            lower[n + k], upper[n + k] = 0.0, np.inf
            for sign in (1.0, -1.0):  # deviation >= +-(value - target)
                row = np.zeros(width)
                row[n + k], row[k] = 1.0, -sign
                rows.append(row), lo_b.append(-sign * target[name]), hi_b.append(np.inf)
            if name in extra:
                start, values = extra[name]
                lower[start:start + len(values)], upper[start:start + len(values)] = 0, 1
                integrality[start:start + len(values)] = 1
                pick = np.zeros(width)
                pick[start:start + len(values)] = 1
                rows.append(pick), lo_b.append(1.0), hi_b.append(1.0)
                link = np.zeros(width)
                link[k] = 1.0
                link[start:start + len(values)] = -np.asarray(values)
                rows.append(link), lo_b.append(0.0), hi_b.append(0.0)
        for c in self.constraints:
            row = np.zeros(width)
            for name, a in c.coefficients.items():
                row[names.index(name)] = a
            margin = _INEQUALITY_MARGIN * max(1.0, abs(c.rhs)) if exact else 0.0
            if c.op == "<=":
                rows.append(row), lo_b.append(-np.inf), hi_b.append(c.rhs - margin)
            elif c.op == ">=":
                rows.append(row), lo_b.append(c.rhs + margin), hi_b.append(np.inf)
            else:
                rows.append(row), lo_b.append(c.rhs), hi_b.append(c.rhs)
        result = milp(
            cost, constraints=ScipyConstraint(np.array(rows), np.array(lo_b), np.array(hi_b)),
            integrality=integrality, bounds=Bounds(lower, upper),
            options={"presolve": True, "mip_rel_gap": 1e-9, "time_limit": 10.0},
        )
        if result.x is None:
            return None
        out: dict[str, Any] = {}
        for k, name in enumerate(names):
            p = self.parameters[name]
            if isinstance(p, IntegerParameter):
                out[name] = int(round(result.x[k]))
            elif isinstance(p, DiscreteParameter):
                start, values = extra[name]
                out[name] = values[int(np.argmax(result.x[start:start + len(values)]))]
            else:
                lo, hi = p.bounds  # type: ignore[union-attr]
                out[name] = float(min(hi, max(lo, result.x[k])))
        return self._polish(out)

    def _polish(self, values: dict[str, Any]) -> dict[str, Any]:
        """Equalities corrected to float precision, and inequalities crossed by the solver's tolerance (HiGHS
        allows 1e-7) or by rounding moved back inside, by moving the continuous parameters they name."""
        equalities = [c for c in self.constraints if c.op == "=="]
        for _ in range(3):
            worst = 0.0
            for c in equalities:
                residual = c.rhs - sum(a * float(values[n]) for n, a in c.coefficients.items())
                worst = max(worst, abs(residual))
                free = [n for n in c.coefficients if isinstance(self.parameters[n], ContinuousParameter)]
                if not free or abs(residual) <= 1e-15:
                    continue
                norm = sum(c.coefficients[n] ** 2 for n in free)
                for n in free:
                    lo, hi = self.parameters[n].bounds  # type: ignore[union-attr]
                    values[n] = float(min(hi, max(lo, values[n] + residual * c.coefficients[n] / norm)))
            if worst <= 1e-13:
                break
        for c in self.constraints:
            free = [n for n in c.coefficients if isinstance(self.parameters[n], ContinuousParameter)]
            if c.op == "==" or not free:
                continue
            sign = 1.0 if c.op == "<=" else -1.0
            norm = sum(c.coefficients[n] ** 2 for n in free)
            for _ in range(4):
                excess = sign * (sum(a * float(values[n]) for n, a in c.coefficients.items()) - c.rhs)
                if excess <= 0:
                    break
                step = excess + 4 * math.ulp(max(1.0, abs(c.rhs)))
                for n in free:
                    lo, hi = self.parameters[n].bounds  # type: ignore[union-attr]
                    values[n] = float(min(hi, max(lo, values[n] - sign * step * c.coefficients[n] / norm)))
        return values

    def _repair(self, u: np.ndarray, rounded: dict[str, Any]) -> dict[str, Any]:
        target = {}
        for name in self._constrained_names:
            i = self.names.index(name)
            # rounded: denormal targets (1e-308) upset the solver's tolerances
            target[name] = round(self._lo[i] + float(min(1.0, max(0.0, u[i]))) * self._span[i], 12)
        point = {**rounded, **self._fixed_values()}
        if self.feasible(point, tolerance=EQUALITY_TOLERANCE):
            # a point across an inequality by float rounding alone (x1 = -6e-15 for "x1 >= 0") moves
            # inside it where it can; on a boundary that is the only solution, rounding is all there is
            return {} if self._inside_inequalities(point) else (self._milp(target) or self._polish(point))
        solved = self._milp(target) or self._milp(target, exact=False) or self._milp(self._middle())
        if solved is None:
            raise PlannerError("constraints: no allowed combination of values satisfies " +
                               "; ".join(c.text for c in self.constraints))
        return solved

    def _inside_inequalities(self, values: dict[str, Any]) -> bool:
        for c in self.constraints:
            total = sum(a * float(values[n]) for n, a in c.coefficients.items())
            if (c.op == "<=" and total > c.rhs) or (c.op == ">=" and total < c.rhs):
                return False
        return True

    def _fixed_values(self) -> dict[str, Any]:
        return {n: p.value for n, p in self.parameters.items() if isinstance(p, FixedParameter)}

    def _middle(self) -> dict[str, float]:
        return {n: self._lo[self.names.index(n)] + 0.5 * self._span[self.names.index(n)]
                for n in self._constrained_names}

    def _check_integer_feasible(self) -> None:
        middle = self._middle()
        if self._milp(middle) is None and self._milp(middle, exact=False) is None:
            raise PlannerError("constraints: no combination of allowed integer/discrete values satisfies " +
                               "; ".join(c.text for c in self.constraints))


def _well_scaled(constraint: LinearConstraint) -> LinearConstraint:
    """``constraint`` over its largest coefficient where that is far from 1: the solvers hold absolute
    tolerances, and HiGHS found no point satisfying ``1e15 * x1 + 1e15 * x2 <= 5e15`` (``x1 + x2 <= 5``)."""
    largest = max(abs(a) for a in constraint.coefficients.values())
    if 1e-3 <= largest <= 1e3:
        return constraint
    return LinearConstraint({n: a / largest for n, a in constraint.coefficients.items()}, constraint.op,
                            constraint.rhs / largest, constraint.text)


# integers with more values than this are searched as continuous columns (see the module docstring)
MAX_INTEGER_VALUES = 100_000


def _key_number(value: Any, lo: float, span: float, log: bool) -> float:
    return round(((math.log(float(value)) if log else float(value)) - lo) / span, 10)


def _is_log(p: Any) -> bool:
    return isinstance(p, ContinuousParameter) and p.scale == "log"


def _index_of(p: CategoricalParameter, value: Any) -> int:
    try:
        return p.values.index(value)
    except ValueError:
        # values read back from a CSV or JSON may have lost their type ("1" for 1)
        for i, allowed in enumerate(p.values):
            if str(allowed) == str(value):
                return i
        raise PlannerError(f"categorical value {value!r} is not one of {p.values}") from None


def candidates_repeat(campaign: Campaign) -> bool:
    """Whether a candidate row may be proposed more than once (``candidates.repeats``)."""
    return bool(getattr(campaign.candidates, "repeats", False))


def table_order(campaign: Campaign, rows: int, seed: int, started: int) -> list[int]:
    """A candidate table's row indices in the seed's shuffle, the order a design takes them in. With
    ``candidates.repeats`` nothing is used up, so the order begins at the ``started``-th row: the design walks
    on through the table (else it took the same first row for every experiment)."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    if candidates_repeat(campaign) and rows:
        order = order[started % rows:] + order[:started % rows]
    return order


def load_candidates(campaign: Campaign) -> list[dict[str, Any]]:
    """The campaign's candidate table as parameter dicts typed as declared (fixed parameters included)."""
    try:
        rows = campaign.candidate_table()
    except ClosedLoopError as exc:
        raise PlannerError(f"candidates: {exc}") from None
    if not rows:
        raise PlannerError("candidates: the table has no rows")
    return rows


def _pinning_as_equalities(box: torch.Tensor, inequalities: list, equalities: list) -> tuple[list, list]:
    """BoTorch ``(indices, coefficients, rhs)`` constraints with every inequality that holds with equality
    at every feasible point (its largest slack, by linear programming, is zero) moved to the equalities,
    less those the others already imply, and with an equality for every constrained column the constraints
    hold at one of its bounds (``a + b == 2`` with both at most 1): hit-and-run moved along the equalities
    in directions that all left the box at once, never moved, and froze the other constrained columns."""
    from scipy.optimize import linprog

    d = box.shape[-1]

    def dense(indices: torch.Tensor, coefficients: torch.Tensor) -> np.ndarray:
        row = np.zeros(d)
        row[indices.numpy()] = coefficients.numpy()
        return row

    a_ub = np.array([-dense(i, c) for i, c, _ in inequalities]).reshape(-1, d)
    b_ub = np.array([-r for *_, r in inequalities])
    a_eq = np.array([dense(i, c) for i, c, _ in equalities]).reshape(-1, d)
    b_eq = np.array([r for *_, r in equalities])
    limits = list(zip(box[0].tolist(), box[1].tolist()))
    free, pinned = [], []
    for constraint, row, rhs in zip(inequalities, -a_ub, -b_ub):
        most = linprog(-row, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq if len(a_eq) else None, b_eq=b_eq if len(b_eq) else None,
                       bounds=limits, method="highs")
        slack = -most.fun - rhs if most.status == 0 else math.inf
        (pinned if slack <= 1e-9 * max(1.0, abs(rhs)) else free).append(constraint)
    a_ub = np.array([-dense(i, c) for i, c, _ in free]).reshape(-1, d)
    b_ub = np.array([-r for *_, r in free])
    a_eq = np.array([dense(i, c) for i, c, _ in [*equalities, *pinned]]).reshape(-1, d)
    b_eq = np.array([r for *_, r in [*equalities, *pinned]])
    for column in sorted({int(i) for idx, _, _ in [*inequalities, *equalities] for i in idx}):
        low, high = limits[column]
        if high <= low:
            continue
        for sign, bound in ((1.0, low), (-1.0, high)):
            # how far the column gets from this bound over the region: its largest value above the lower
            # bound (sign 1), its smallest below the upper one (sign -1)
            extreme = linprog(-sign * np.eye(d)[column], A_ub=a_ub if len(a_ub) else None,
                              b_ub=b_ub if len(b_ub) else None, A_eq=a_eq if len(a_eq) else None,
                              b_eq=b_eq if len(b_eq) else None, bounds=limits, method="highs")
            if extreme.status == 0 and -extreme.fun - sign * bound <= 1e-9 * max(1.0, abs(bound)):
                pinned.append((torch.tensor([column], dtype=torch.long), torch.tensor([1.0], dtype=torch.double),
                               float(bound)))
                break
    kept = list(equalities)
    for constraint in pinned:
        rows = np.array([np.append(dense(i, c), r) for i, c, r in [*kept, constraint]])
        if np.linalg.matrix_rank(rows, tol=1e-9) == len(rows):
            kept.append(constraint)
    return free, kept
