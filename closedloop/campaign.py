"""The campaign file: what may be varied, within which limits, what to optimize, and how.

The pydantic models here are the single source of truth of the format: the YAML loader, the JSON
Schema (``closedloop schema``), the Python API and the round trip back to YAML all come from them.

Example:
    >>> c = Campaign.from_yaml_text('''
    ... name: demo
    ... parameters:
    ...   x: {type: continuous, bounds: [0, 1]}
    ... objectives:
    ...   y: {goal: minimize}
    ... budget: {experiments: 10}
    ... instrument: {simulator: "simulators.surfaces:Branin"}
    ... ''')
    >>> c.parameters["x"].bounds
    (0.0, 1.0)
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from closedloop.errors import CampaignError

# --------------------------------------------------------------------------------------------
# Durations ("90 s", "10 min", "2 h") are stored as seconds and written back with a unit.

_DURATION_UNITS = {
    "ms": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "min": 60.0, "minute": 60.0, "minutes": 60.0, "m": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def parse_duration(value: Any) -> float:
    """Seconds in a duration given as a number of seconds or a string with a unit ("10 min")."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. '90 s', '10 min' or '2 h'")
        number, unit = match.groups()
        if unit and unit not in _DURATION_UNITS:
            raise ValueError(f"unknown time unit {unit!r} in {value!r}; use ms, s, min, h or d")
        seconds = float(number) * _DURATION_UNITS.get(unit or "s", 1.0)
    else:
        raise ValueError(f"{value!r} is not a duration")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive and finite")
    return seconds


def _format_duration(seconds: float) -> str:
    return f"{seconds:g} s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(_format_duration, return_type=str)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Parameters


class ContinuousParameter(_Model):
    """A real number within ``bounds``, searched on a linear or logarithmic scale."""

    type: Literal["continuous"] = "continuous"
    bounds: tuple[float, float]
    scale: Literal["linear", "log"] = "linear"
    unit: str | None = None

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = (_finite(b) for b in bounds)
        if not low < high:
            raise ValueError(f"lower bound {low:g} is not below upper bound {high:g}")
        return bounds

    @model_validator(mode="after")
    def _log_positive(self) -> ContinuousParameter:
        if self.scale == "log" and self.bounds[0] <= 0:
            raise ValueError(f"a log scale needs positive bounds, got {list(self.bounds)}")
        return self


class IntegerParameter(_Model):
    """An integer within ``bounds`` (both included)."""

    type: Literal["integer"] = "integer"
    bounds: tuple[float, float]
    unit: str | None = None

    @field_validator("bounds")
    @classmethod
    def _has_integers(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = (_finite(b) for b in bounds)
        if not low <= high:
            raise ValueError(f"lower bound {low:g} is above upper bound {high:g}")
        if math.ceil(low) > math.floor(high):
            raise ValueError(f"no integer lies within [{low:g}, {high:g}]")
        if math.ceil(low) == math.floor(high):
            raise ValueError(f"only one integer lies within [{low:g}, {high:g}]; use type: fixed")
        return (int(math.ceil(low)), int(math.floor(high)))


class CategoricalParameter(_Model):
    """One of a set of unordered choices (a solvent, a catalyst)."""

    type: Literal["categorical"] = "categorical"
    values: list[str | int | float]

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        return _check_choices(values)


class DiscreteParameter(_Model):
    """One of a set of ordered numbers (available concentrations, nozzle sizes)."""

    type: Literal["discrete"] = "discrete"
    values: list[float]
    unit: str | None = None

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[float]) -> list[float]:
        for v in values:
            _finite(v)
        return sorted(_check_choices(values))


class FixedParameter(_Model):
    """A value held constant; recorded with every experiment and sent to the instrument."""

    type: Literal["fixed"] = "fixed"
    value: float | int | str
    unit: str | None = None

    @field_validator("value")
    @classmethod
    def _finite_value(cls, value: Any) -> Any:
        if isinstance(value, float):
            _finite(value)
        return value


def _check_choices(values: list[Any]) -> list[Any]:
    if len(values) < 2:
        raise ValueError("needs at least two values" if values else "is empty")
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"value {v!r} is listed twice")
        seen.add(v)
    return values


Parameter = Annotated[
    Union[ContinuousParameter, IntegerParameter, CategoricalParameter, DiscreteParameter, FixedParameter],
    Field(discriminator="type"),
]

# --------------------------------------------------------------------------------------------
# Expressions: linear constraints on parameters, and bounds on outputs


@dataclass(frozen=True)
class LinearConstraint:
    """``sum(coefficients[name] * name) <op> rhs``, op one of ``<=``, ``>=``, ``==``."""

    coefficients: dict[str, float]
    op: Literal["<=", ">=", "=="]
    rhs: float
    text: str


@dataclass(frozen=True)
class OutputBound:
    """``output <op> value`` on a measured output."""

    output: str
    op: Literal["<=", ">="]
    value: float
    text: str

    def satisfied(self, observed: float) -> bool:
        return observed <= self.value if self.op == "<=" else observed >= self.value


_COMPARISONS = {ast.LtE: "<=", ast.GtE: ">=", ast.Eq: "==", ast.Lt: "<=", ast.Gt: ">="}


def _linear_terms(node: ast.AST) -> dict[str, float]:
    """Coefficients of a linear expression; the constant term is under the key ``""``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return {"": float(node.value)}
    if isinstance(node, ast.Name):
        return {node.id: 1.0}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return {k: sign * v for k, v in _linear_terms(node.operand).items()}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, right = _linear_terms(node.left), _linear_terms(node.right)
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        for k, v in right.items():
            left[k] = left.get(k, 0.0) + sign * v
        return left
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        left, right = _linear_terms(node.left), _linear_terms(node.right)
        if isinstance(node.op, ast.Div):
            if set(right) != {""}:
                raise ValueError("is not linear: it divides by a parameter")
            if right[""] == 0:
                raise ValueError("divides by zero")
            return {k: v / right[""] for k, v in left.items()}
        if set(left) == {""}:
            left, right = right, left
        if set(right) != {""}:
            raise ValueError("is not linear: it multiplies two parameters")
        return {k: v * right[""] for k, v in left.items()}
    raise ValueError("is not a linear expression of parameters (use +, -, * and numbers)")


def parse_linear_constraint(text: str) -> LinearConstraint:
    """Parse ``"a + 0.5 * b <= 10"`` into a :class:`LinearConstraint` (variables on either side)."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{text!r} does not parse as an expression") from None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in _COMPARISONS):
        raise ValueError(f"{text!r} must compare two sides with <=, >= or ==")
    left, right = _linear_terms(tree.left), _linear_terms(tree.comparators[0])
    for k, v in right.items():
        left[k] = left.get(k, 0.0) - v
    rhs = -left.pop("", 0.0)
    coefficients = {k: v for k, v in left.items() if v != 0.0}
    if not coefficients:
        raise ValueError(f"{text!r} names no parameter")
    return LinearConstraint(coefficients, _COMPARISONS[type(tree.ops[0])], rhs, text)  # type: ignore[arg-type]


def parse_output_bound(text: str) -> OutputBound:
    """Parse ``"yield >= 0.8"`` into an :class:`OutputBound`."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{text!r} does not parse as an expression") from None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in (ast.LtE, ast.GtE, ast.Lt, ast.Gt)):
        raise ValueError(f"{text!r} must be 'OUTPUT >= NUMBER' or 'OUTPUT <= NUMBER'")
    left, right, op = tree.left, tree.comparators[0], _COMPARISONS[type(tree.ops[0])]
    if isinstance(right, ast.Name):
        left, right, op = right, left, {"<=": ">=", ">=": "<="}[op]
    value = _linear_terms(right) if not isinstance(right, ast.Name) else {}
    if not isinstance(left, ast.Name) or set(value) != {""}:
        raise ValueError(f"{text!r} must compare one output with a number")
    return OutputBound(left.id, op, _finite(value[""]), text)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The rest of the campaign


class Objective(_Model):
    """An output to optimize; ``threshold`` is the worst value still worth having (Pareto reference)."""

    goal: Literal["minimize", "maximize"]
    threshold: float | None = None
    unit: str | None = None


class Budget(_Model):
    """When the campaign ends: after ``experiments``, after ``hours``, or once ``stop_when`` holds."""

    experiments: int = Field(ge=1)
    hours: float | None = Field(default=None, gt=0)
    stop_when: str | None = None

    @field_validator("stop_when")
    @classmethod
    def _parses(cls, text: str | None) -> str | None:
        if text is not None:
            parse_output_bound(text)
        return text


class Execution(_Model):
    """How experiments are run: how many at once, how long each may take, how often to retry."""

    concurrency: int = Field(default=1, ge=1)
    timeout: Duration | None = None
    retries: int = Field(default=0, ge=0)
    approve: bool = False


class PlannerSettings(_Model):
    """Which planner proposes experiments, and its settings."""

    backend: Literal["botorch", "ax", "sobol", "random"] = "botorch"
    initial_experiments: int | None = Field(default=None, ge=1)
    seed: int | None = None


class Instrument(_Model):
    """The instrument that runs experiments: a simulator or a hardware driver, by import path."""

    simulator: str | None = None
    driver: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> Instrument:
        if (self.simulator is None) == (self.driver is None):
            raise ValueError("give exactly one of 'simulator' or 'driver'")
        path = self.target
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path):
            raise ValueError(f"{path!r} is not an import path of the form 'package.module:Name'")
        return self

    @property
    def target(self) -> str:
        """The import path of the instrument's factory."""
        return self.simulator or self.driver or ""


class Campaign(_Model):
    """A whole campaign: the search space, the goals, the budget and the instrument."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    parameters: dict[str, Parameter] = Field(min_length=1)
    constraints: list[str] = Field(default_factory=list)
    candidates: str | None = None
    objectives: dict[str, Objective] = Field(min_length=1)
    outcome_constraints: list[str] = Field(default_factory=list)
    budget: Budget
    execution: Execution = Field(default_factory=Execution)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    instrument: Instrument

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        problems = self.cross_field_problems()
        if problems:
            raise CampaignError(problems)
        return self

    # -- derived views ------------------------------------------------------------------

    @property
    def linear_constraints(self) -> list[LinearConstraint]:
        return [parse_linear_constraint(c) for c in self.constraints]

    @property
    def output_bounds(self) -> list[OutputBound]:
        return [parse_output_bound(c) for c in self.outcome_constraints]

    @property
    def stop_rule(self) -> OutputBound | None:
        return parse_output_bound(self.budget.stop_when) if self.budget.stop_when else None

    @property
    def outputs(self) -> list[str]:
        """Every output the instrument must measure: objectives, then constrained outputs."""
        names = list(self.objectives)
        for bound in self.output_bounds:
            if bound.output not in names:
                names.append(bound.output)
        return names

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """(field path, message) for each problem that spans several fields."""
        problems: list[tuple[str, str]] = []
        names = set(self.parameters)
        clashing = names & set(self.objectives)
        for name in sorted(clashing):
            problems.append((f"objectives.{name}", f"{name!r} is both a parameter and an objective"))
        numeric = {
            n for n, p in self.parameters.items() if isinstance(p, (ContinuousParameter, IntegerParameter, DiscreteParameter))
        }
        parsed: list[LinearConstraint] = []
        for i, text in enumerate(self.constraints):
            try:
                constraint = parse_linear_constraint(text)
            except ValueError as exc:
                problems.append((f"constraints.{i}", str(exc)))
                continue
            unknown = sorted(set(constraint.coefficients) - names)
            if unknown:
                problems.append((f"constraints.{i}", _unknown_names("parameter", unknown, names)))
                continue
            not_numeric = sorted(set(constraint.coefficients) - numeric)
            if not_numeric:
                problems.append(
                    (f"constraints.{i}", f"{', '.join(not_numeric)} cannot appear in a linear constraint (not numeric)")
                )
                continue
            parsed.append(constraint)
        if parsed and not problems:
            infeasible = _infeasible(self, parsed)
            if infeasible:
                problems.append(("constraints", infeasible))
        known_outputs = set(self.objectives)
        for i, text in enumerate(self.outcome_constraints):
            try:
                bound = parse_output_bound(text)
            except ValueError as exc:
                problems.append((f"outcome_constraints.{i}", str(exc)))
                continue
            if bound.output in names:
                problems.append((f"outcome_constraints.{i}", f"{bound.output!r} is a parameter, not an output"))
            known_outputs.add(bound.output)
        if self.budget.stop_when:
            rule = parse_output_bound(self.budget.stop_when)
            if rule.output not in known_outputs:
                problems.append(("budget.stop_when", _unknown_names("output", [rule.output], known_outputs)))
        initial = self.planner.initial_experiments
        if initial is not None and initial > self.budget.experiments:
            problems.append(
                ("planner.initial_experiments", f"{initial} initial experiments exceed the budget of {self.budget.experiments}")
            )
        if len(self.tunable_parameters) == 0:
            problems.append(("parameters", "every parameter is fixed: there is nothing to vary"))
        return problems

    @property
    def tunable_parameters(self) -> dict[str, Parameter]:
        return {n: p for n, p in self.parameters.items() if not isinstance(p, FixedParameter)}

    def default_initial_experiments(self) -> int:
        """Size of the space-filling design before the model takes over."""
        if self.planner.initial_experiments is not None:
            return self.planner.initial_experiments
        dims = len(self.tunable_parameters)
        return max(1, min(self.budget.experiments, max(5, 2 * dims + 1)))

    # -- YAML ---------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The campaign as YAML that loads back into an equal campaign."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"name": self.name, **data}  # keep the name first even when other keys are defaults
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<campaign>") -> Campaign:
        """Parse a campaign from YAML text; raises :class:`CampaignError` with every problem found."""
        return load_campaign_text(text, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Campaign:
        """Read and validate a campaign file."""
        return load_campaign(path)


def _unknown_names(kind: str, unknown: list[str], known: set[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        parts.append(f"unknown {kind} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(parts) + f"; known: {', '.join(sorted(known)) or 'none'}"


def _infeasible(campaign: Campaign, constraints: list[LinearConstraint]) -> str | None:
    """A message when no point within the parameters' bounds satisfies every linear constraint."""
    import numpy as np
    from scipy.optimize import linprog

    names = sorted({n for c in constraints for n in c.coefficients})
    bounds = []
    for n in names:
        p = campaign.parameters[n]
        if isinstance(p, DiscreteParameter):
            bounds.append((min(p.values), max(p.values)))
        else:
            bounds.append(tuple(p.bounds))  # type: ignore[union-attr]
    a_ub, b_ub, a_eq, b_eq = [], [], [], []
    for c in constraints:
        row = [c.coefficients.get(n, 0.0) for n in names]
        if c.op == "<=":
            a_ub.append(row), b_ub.append(c.rhs)
        elif c.op == ">=":
            a_ub.append([-v for v in row]), b_ub.append(-c.rhs)
        else:
            a_eq.append(row), b_eq.append(c.rhs)
    result = linprog(
        np.zeros(len(names)),
        A_ub=np.array(a_ub) if a_ub else None,
        b_ub=np.array(b_ub) if b_ub else None,
        A_eq=np.array(a_eq) if a_eq else None,
        b_eq=np.array(b_eq) if b_eq else None,
        bounds=bounds,
        method="highs",
    )
    if result.status == 2:
        return "no point within the parameters' bounds satisfies all constraints: " + "; ".join(c.text for c in constraints)
    return None


# --------------------------------------------------------------------------------------------
# Loading with positions: every problem names the file, line, column and field path.


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a campaign file."""

    source: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.source + (f":{self.line}:{self.column}" if self.line else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class CampaignFileError(CampaignError):
    """Every problem found in one campaign file."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _walk_marks(node: yaml.Node, path: tuple, marks: dict[tuple, yaml.Mark], duplicates: list[tuple[tuple, yaml.Mark]]) -> None:
    marks.setdefault(path, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                duplicates.append((path + (key,), key_node.start_mark))
            seen.add(key)
            marks[path + (key,)] = key_node.start_mark
            _walk_value(value_node, path + (key,), marks, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[path + (i,)] = item.start_mark
            _walk_marks(item, path + (i,), marks, duplicates)


def _walk_value(node: yaml.Node, path: tuple, marks: dict, duplicates: list) -> None:
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        _walk_marks(node, path, marks, duplicates)


def _data_path(data: Any, loc: tuple) -> tuple:
    """The part of a pydantic error location that exists in the data (drops union tags)."""
    path: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and part not in _UNION_TAGS:
            path.append(part)  # a missing or unknown key: name it, it has no position of its own
            node = None
    return tuple(path)


_UNION_TAGS = {"continuous", "integer", "categorical", "discrete", "fixed"}


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for model in (ContinuousParameter, IntegerParameter, CategoricalParameter, DiscreteParameter, FixedParameter,
                  Objective, Budget, Execution, PlannerSettings, Instrument, Campaign):
        names.update(model.model_fields)
    return names


def _describe(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, sorted(_all_field_names()), n=1)
        return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown parameter type; use one of {', '.join(sorted(_UNION_TAGS))}"
    if kind == "union_tag_not_found":
        return f"'type' is missing; use one of {', '.join(sorted(_UNION_TAGS))}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    given = error.get("input")
    if kind not in ("value_error", "assertion_error") and not isinstance(given, (dict, list)):
        msg += f" (got {given!r})"
    return msg


def _position(marks: dict[tuple, yaml.Mark], path: tuple) -> tuple[int | None, int | None]:
    while path not in marks and path:
        path = path[:-1]
    mark = marks.get(path)
    return (mark.line + 1, mark.column + 1) if mark else (None, None)


def _dotted(path: tuple | str) -> str:
    return path if isinstance(path, str) else ".".join(str(p) for p in path)


def load_campaign_text(text: str, source: str = "<campaign>") -> Campaign:
    """Validate YAML text as a campaign, raising :class:`CampaignFileError` with every problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise CampaignFileError(
            [Problem(source, mark.line + 1 if mark else None, mark.column + 1 if mark else None, "", f"YAML syntax: {problem}")]
        ) from None
    if not isinstance(data, dict):
        raise CampaignFileError([Problem(source, 1, 1, "", "a campaign file must be a mapping of fields (name, parameters, ...)")])
    marks: dict[tuple, yaml.Mark] = {}
    duplicates: list[tuple[tuple, yaml.Mark]] = []
    if root is not None:
        _walk_marks(root, (), marks, duplicates)
    problems = [
        Problem(source, m.line + 1, m.column + 1, _dotted(p), f"key {p[-1]!r} appears twice (the later one would win)")
        for p, m in duplicates
    ]
    campaign: Campaign | None = None
    try:
        campaign = Campaign.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            path = _data_path(data, tuple(error["loc"]))
            line, column = _position(marks, path)
            problems.append(Problem(source, line, column, _dotted(path), _describe(error)))
    except CampaignError as exc:
        for path, message in exc.args[0]:
            key = tuple(int(p) if p.isdigit() else p for p in path.split("."))
            line, column = _position(marks, key)
            problems.append(Problem(source, line, column, path, message))
    if problems:
        raise CampaignFileError(problems)
    assert campaign is not None
    return campaign


def load_campaign(path: str | Path) -> Campaign:
    """Read a campaign file; :class:`CampaignFileError` lists every problem with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CampaignFileError([Problem(str(path), None, None, "", f"cannot read the file: {exc.strerror}")]) from None
    return load_campaign_text(text, str(path))
