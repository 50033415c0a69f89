"""The campaign file: what may be varied, within which limits, what to optimize, and how.

The pydantic models here are the single source of truth of the format: the YAML loader, the JSON
Schema (``closedloop schema``), the Python API and the round trip back to YAML all come from them.
The reference page is ``docs/campaign.md``.

Two levels of checking:

* the models check everything that the file alone decides (types, bounds, expressions, names,
  feasibility of the linear constraints), so ``Campaign(...)`` never holds a wrong campaign;
* :func:`load_campaign` also checks what lies outside the file: the candidate table it names and the
  instrument it imports. Every problem found is reported at once, with file, line, column and field path.

Example:
    >>> c = Campaign.from_yaml_text('''
    ... name: demo
    ... parameters:
    ...   x1: {type: continuous, bounds: [-5, 10]}
    ...   x2: {type: continuous, bounds: [0, 15]}
    ... objectives:
    ...   y: {goal: minimize}
    ... budget: {experiments: 10}
    ... instrument: {simulator: "simulators.surfaces:Branin"}
    ... ''')
    >>> c.parameters["x1"].bounds
    (-5.0, 10.0)
"""

from __future__ import annotations

import ast
import contextvars
import csv
import difflib
import functools
import hashlib
import importlib
import inspect
import io
import json
import keyword
import math
import os
import sys
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
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
    StrictBool,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_serializer,
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
_DURATION_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_duration(value: Any) -> float:
    """Seconds in a duration given as a number of seconds or a string with a unit ("10 min").

    >>> parse_duration("10 min"), parse_duration(90), parse_duration("0.5 s")
    (600.0, 90.0, 0.5)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. '90 s', '10 min' or '2 h'")
        number, unit = match.groups()
        if unit and unit not in _DURATION_UNITS:
            close = difflib.get_close_matches(unit, list(_DURATION_UNITS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown time unit {unit!r} in {value!r}{hint}; use ms, s, min, h or d")
        seconds = float(number) * _DURATION_UNITS.get(unit or "s", 1.0)
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. '90 s', '10 min' or '2 h'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive and finite")
    return seconds


def _format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and float(seconds / size).is_integer() and seconds / size < 1e15:
            return f"{int(seconds / size)} {unit}"
    text = repr(float(seconds))  # the shortest text that reads back as the same number
    return f"{text[:-2] if text.endswith('.0') else text} s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_duration, return_type=str),
    WithJsonSchema({
        "anyOf": [
            {"type": "number", "exclusiveMinimum": 0},
            {"type": "string",
             "pattern": r"^\s*[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*(ms|s|sec|seconds?|min|minutes?|m|h|hours?|d|days?)?\s*$"},
        ],
        "description": "a duration: seconds, or a number with a unit ('90 s', '10 min', '2 h')",
    }),
]

# Option values written as durations are given to instrument factories in seconds. The bare 'm' is
# left out here: in an option it could as well mean metres; so is the bare 'd': a detector's 'mode: 2d'
# reached its factory as 172800.0 (two days), and '0d' was refused as a duration.
_OPTION_DURATION_RE = re.compile(
    r"\s*[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*(ms|s|sec|seconds?|min|minutes?|h|hours?|days?)\s*"
)

# --------------------------------------------------------------------------------------------
# Scalar types. YAML gives ints, floats, strings and booleans; a scientist's '60' in quotes or a
# 'yes' that YAML reads as true must be an error, not silently converted, so numbers are strict.

Real = Annotated[float, Strict()]
Whole = Annotated[int, Strict()]
Text = Annotated[str, Strict()]


def _no_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(
            f"{value!r} is a boolean: YAML reads yes/no/on/off/true/false as booleans; "
            "quote it ('\"yes\"') if you meant text"
        )
    return value


# set while a store's copy of a campaign is read: the rules on names and text values came after stores that hold
# campaigns run without them, and reading those stores' results must not fail (every command would refuse them)
_STORED = contextvars.ContextVar("_STORED", default=False)


# the zero-width joiner and non-joiner are format characters that emoji sequences and some scripts (Devanagari,
# Persian) need to be written right
_JOINERS = {"\u200c", "\u200d"}


def _invisible(text: str) -> str | None:
    """Why ``text`` may not be a name or value: it holds a format character (Unicode category Cf), if so."""
    # a zero-width space or a right-to-left override prints as nothing, or turns the text after it around: 'DMF'
    # and 'DMF' with a zero-width space were two values that every table printed the same
    if c := next((c for c in text if unicodedata.category(c) == "Cf" and c not in _JOINERS), None):
        return (f"{text!r} holds U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')}), an invisible format character "
                "(it prints as nothing, or turns the text around it); remove it")
    return None


def _one_line(value: Any) -> Any:
    # tables (show, export) print a value in one cell, and a table read back (import, tell --csv) takes cells
    # without the spaces spreadsheets pad them with
    if isinstance(value, str) and not _STORED.get():
        if control := next((c for c in value if unicodedata.category(c) == "Cc"), None):
            raise ValueError(f"{value!r} holds a control character ({control!r}); write it on one line")
        if invisible := _invisible(value):
            raise ValueError(invisible)
        if value != value.strip():
            raise ValueError(f"{value!r} has spaces at its ends, which a table read back (closedloop import) "
                             "drops; write it without them")
    return value


Choice = Annotated[Union[Text, Whole, Real], BeforeValidator(_one_line), BeforeValidator(_no_boolean)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Parameters


class ContinuousParameter(_Model):
    """A real number within ``bounds``, searched on a linear or logarithmic scale.

    >>> ContinuousParameter(bounds=(1, 600), scale="log", unit="s").bounds
    (1.0, 600.0)
    """

    type: Literal["continuous"] = "continuous"
    bounds: tuple[Real, Real] = Field(description="[lower, upper], both included")
    scale: Literal["linear", "log"] = Field("linear", description="log: search orders of magnitude evenly")
    unit: Text | None = None

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not low < high:
            raise ValueError(f"lower bound {low:g} is not below upper bound {high:g}")
        return bounds

    @field_validator("scale")
    @classmethod
    def _log_positive(cls, scale: str, info: ValidationInfo) -> str:
        bounds = info.data.get("bounds")  # absent when the bounds are themselves wrong
        if scale == "log" and bounds is not None and bounds[0] <= 0:
            raise ValueError(
                f"a log scale needs positive bounds, got [{bounds[0]:g}, {bounds[1]:g}]; "
                "use scale: linear or a positive lower bound"
            )
        return scale


_EXACT_INTEGERS = 2**53  # the largest size up to which every integer is a float, as the planner computes with them


class IntegerParameter(_Model):
    """An integer within ``bounds`` (both included).

    >>> IntegerParameter(bounds=(1, 10)).bounds
    (1, 10)
    """

    type: Literal["integer"] = "integer"
    bounds: tuple[Real, Real] = Field(description="[lower, upper], both included")
    unit: Text | None = None

    @field_validator("bounds")
    @classmethod
    def _has_integers(cls, bounds: tuple[float, float]) -> tuple[int, int]:
        low, high = bounds
        if max(abs(low), abs(high)) > _EXACT_INTEGERS:
            # read as floats, larger integers are rounded: [9007199254740990, 9007199254740995] became
            # ...990..996, and the instrument was sent 9007199254740996, beyond the bound written
            raise ValueError(f"integer bounds are exact up to 2**53 = {_EXACT_INTEGERS} in size; got [{low:.17g}, "
                             f"{high:.17g}] (a number this large is a continuous parameter)")
        if not low < high:
            raise ValueError(f"lower bound {low:g} is not below upper bound {high:g}")
        if math.ceil(low) > math.floor(high):
            raise ValueError(f"no integer lies within [{low:g}, {high:g}]")
        if math.ceil(low) == math.floor(high):
            raise ValueError(f"only one integer lies within [{low:g}, {high:g}]; use type: fixed")
        return (int(math.ceil(low)), int(math.floor(high)))


class CategoricalParameter(_Model):
    """One of a set of unordered choices (a solvent, a catalyst).

    >>> CategoricalParameter(values=["DMF", "DMSO", "GBL"]).values
    ['DMF', 'DMSO', 'GBL']
    """

    type: Literal["categorical"] = "categorical"
    values: list[Choice] = Field(description="the choices, at least two, each once")

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        return _check_choices(values)


class DiscreteParameter(_Model):
    """One of a set of ordered numbers (available concentrations, nozzle sizes).

    >>> DiscreteParameter(values=[2.0, 0.25, 0.5]).values
    [0.25, 0.5, 2.0]
    >>> DiscreteParameter(values=[4, 1, 2]).values
    [1, 2, 4]
    """

    type: Literal["discrete"] = "discrete"
    values: list[Union[Whole, Real]] = Field(description="the allowed numbers, at least two, each once")
    unit: Text | None = None

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[int | float]) -> list[int] | list[float]:
        values = sorted(_check_choices(values))
        # all written as whole numbers, they are counts (tips, layers) and reach the instrument as ints, where
        # range(n) works; one decimal makes them measures, all floats, as they always were
        if all(isinstance(v, int) for v in values):
            return values
        return [float(v) for v in values]

    def allowed(self, number: float) -> int | float | None:
        """The allowed value equal to ``number`` in its declared type (4 for 4.0), or None if none is."""
        for v in self.values:
            if v == number:
                return v
        return None


class FixedParameter(_Model):
    """A value held constant; recorded with every experiment and sent to the instrument.

    >>> FixedParameter(value=1.0, unit="bar").value
    1.0
    """

    type: Literal["fixed"] = "fixed"
    value: Choice
    unit: Text | None = None


def _check_choices(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("is empty; list at least two values")
    if len(values) < 2:
        raise ValueError(f"has only one value ({values[0]!r}); use type: fixed for a constant")
    seen: set[Any] = set()
    written: dict[str, Any] = {}
    for v in values:
        if v in seen:
            raise ValueError(f"value {v!r} is listed twice")
        seen.add(v)
        # 10 and "10", or an accent composed and combining, are one cell of a table: show and export could not
        # tell them apart, and an import took the first
        text = unicodedata.normalize("NFC", str(v))
        if text in written and not _STORED.get():
            first = written[text]
            both = f"{first!r} and {v!r}" + (f" ({ascii(v)})" if isinstance(v, str) and isinstance(first, str) else "")
            raise ValueError(f"values {both} are written the same way in a table; keep one")
        written[text] = v
    return values


Parameter = Annotated[
    Union[ContinuousParameter, IntegerParameter, CategoricalParameter, DiscreteParameter, FixedParameter],
    Field(discriminator="type"),
]
_PARAMETER_TYPES: dict[str, type[_Model]] = {
    "continuous": ContinuousParameter,
    "integer": IntegerParameter,
    "categorical": CategoricalParameter,
    "discrete": DiscreteParameter,
    "fixed": FixedParameter,
}
_UNION_TAGS = set(_PARAMETER_TYPES)
NUMERIC = (ContinuousParameter, IntegerParameter, DiscreteParameter)

# --------------------------------------------------------------------------------------------
# Expressions: linear constraints on parameters, and bounds on outputs


@dataclass(frozen=True)
class LinearConstraint:
    """``sum(coefficients[name] * name) <op> rhs``, op one of ``<=``, ``>=``, ``==``."""

    coefficients: dict[str, float]
    op: Literal["<=", ">=", "=="]
    rhs: float
    text: str

    def satisfied(self, values: Mapping[str, Any], tolerance: float = 1e-6) -> bool:
        """Whether ``values`` (a parameter dict) meets the constraint, equalities to within ``tolerance``."""
        total = sum(c * float(values[n]) for n, c in self.coefficients.items())
        scale = tolerance * max(1.0, abs(self.rhs))
        if self.op == "<=":
            return total <= self.rhs + scale
        if self.op == ">=":
            return total >= self.rhs - scale
        return abs(total - self.rhs) <= scale


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
        if not math.isfinite(node.value):
            raise ValueError("holds a number that is not finite")
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
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        raise ValueError("is not linear: it raises to a power (** or ^)")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ValueError("is not linear: it raises to a power (** or ^)")
    if isinstance(node, ast.Call):
        raise ValueError("is not linear: it calls a function")
    raise ValueError("is not a linear expression of parameters (use +, -, *, / and numbers)")


_KEYWORD_PREFIX = "_closedloop_kw_"


def _too_long(text: str) -> str:
    shown = repr(text) if len(text) <= 60 else repr(text[:60]) + f" (... {len(text):,} characters)"
    return f"{shown} is too long or nests too deeply to read; write it with fewer terms"


def _parse_expression(text: str) -> ast.expr:
    # names such as 'yield' or 'lambda' are Python keywords but fine outputs and parameters
    escaped = re.sub(r"[A-Za-z_]\w*",
                     lambda m: _KEYWORD_PREFIX + m.group(0) if keyword.iskeyword(m.group(0)) else m.group(0),
                     text.strip())
    try:
        tree = ast.parse(escaped, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{text!r} does not parse; write e.g. 'a + 0.5 * b <= 10'") from None
    except (RecursionError, MemoryError):
        raise ValueError(_too_long(text)) from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id.startswith(_KEYWORD_PREFIX):
            node.id = node.id[len(_KEYWORD_PREFIX):]
    return tree


def parse_linear_constraint(text: str) -> LinearConstraint:
    """Parse ``"a + 0.5 * b <= 10"`` into a :class:`LinearConstraint` (variables on either side).

    >>> parse_linear_constraint("a + 0.5 * b <= 10").coefficients
    {'a': 1.0, 'b': 0.5}
    """
    if "=" in text and not re.search(r"<=|>=|==", text):
        raise ValueError(f"{text!r} uses '='; write '==' for an equality")
    tree = _parse_expression(text)
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in _COMPARISONS):
        raise ValueError(f"{text!r} must compare two sides with <=, >= or ==")
    try:
        left, right = _linear_terms(tree.left), _linear_terms(tree.comparators[0])
    except ValueError as exc:
        raise ValueError(f"{text!r} {exc}") from None
    except RecursionError:
        # _linear_terms recurses once per term: a sum of a thousand parameters stopped the command with a traceback
        raise ValueError(_too_long(text)) from None
    for k, v in right.items():
        left[k] = left.get(k, 0.0) - v
    rhs = -left.pop("", 0.0)
    coefficients = {k: v for k, v in left.items() if v != 0.0}
    if not coefficients:
        raise ValueError(f"{text!r} names no parameter")
    return LinearConstraint(coefficients, _COMPARISONS[type(tree.ops[0])], rhs, text)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1024)
def parse_output_bound(text: str) -> OutputBound:
    """Parse ``"yield >= 0.8"`` into an :class:`OutputBound` (immutable, so kept: a campaign's bounds are asked
    for once per result whenever results are filtered, which re-parsed them 25,000 times for a 5,000-result front).

    >>> parse_output_bound("0.8 <= yield").op
    '>='
    """
    tree = _parse_expression(text)
    bounds_ops = (ast.LtE, ast.GtE, ast.Lt, ast.Gt)
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1 and type(tree.ops[0]) in bounds_ops):
        raise ValueError(f"{text!r} must be 'OUTPUT >= NUMBER' or 'OUTPUT <= NUMBER'")
    left, right, op = tree.left, tree.comparators[0], _COMPARISONS[type(tree.ops[0])]
    if isinstance(right, ast.Name):
        left, right, op = right, left, {"<=": ">=", ">=": "<="}[op]
    try:
        value = _linear_terms(right) if not isinstance(right, ast.Name) else {}
    except (ValueError, RecursionError):
        value = {}
    if not isinstance(left, ast.Name) or set(value) != {""}:
        raise ValueError(f"{text!r} must compare one output with a number, e.g. 'yield >= 0.8'")
    return OutputBound(left.id, op, value[""], text)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The rest of the campaign


class Objective(_Model):
    """An output to optimize; ``threshold`` is the worst value still worth having (Pareto reference), so only
    a campaign with several objectives takes one.

    >>> Objective(goal="minimize", threshold=5.0).goal
    'minimize'
    """

    goal: Literal["minimize", "maximize"]
    threshold: Real | None = Field(None, description="worst value still worth having; the Pareto reference point of "
                                   "several objectives")
    unit: Text | None = None


# the most experiments a budget may give, with room below 2**31 - 1: a PostgreSQL store numbers a campaign's experiments
# in 32-bit integers. Nothing runs more; larger budgets were typos or 'forever', and past a float's range (~1.8e308)
# the botorch planner failed at its first model-based proposal, after the space-filling start
MAX_EXPERIMENTS = 1_000_000_000


def _experiments_limit(n: int) -> str:
    digits = len(str(n))
    given = f"{n:,}" if digits <= 24 else f"a number of {digits:,} digits"  # a line, not a screenful of zeros
    return (f"must be at most {MAX_EXPERIMENTS:,}, got {given}: no campaign runs that many (a PostgreSQL store numbers "
            "them in 32-bit integers); to run until a result is good enough, add stop_when")


class Budget(_Model):
    """When the campaign ends: after ``experiments``, once ``cost`` is spent, after ``hours``, or once ``stop_when`` holds.

    ``cost`` is in the unit of the sources' costs (a campaign with ``sources`` only); at least one of
    ``experiments`` and ``cost`` is given.

    >>> Budget(experiments=60, hours=12, stop_when="quality >= 0.95").hours
    12.0
    """

    experiments: Whole | None = Field(None, ge=1, description="the most experiments to run",
                                      json_schema_extra={"maximum": MAX_EXPERIMENTS})
    cost: Real | None = Field(None, gt=0, description="the most cost to spend, summed over the sources' costs")
    hours: Real | None = Field(None, gt=0, description="wall-clock limit")
    stop_when: Text | None = Field(None, description="stop early once a result meets this, e.g. 'quality >= 0.95'")

    @model_validator(mode="after")
    def _limited(self) -> Budget:
        if self.experiments is None and self.cost is None:
            raise ValueError("give 'experiments', 'cost' (with sources) or both")
        return self

    @field_validator("experiments")
    @classmethod
    def _runnable(cls, n: int | None) -> int | None:
        # not on a store's copy: a campaign begun with a larger budget before the limit must still read
        if n is not None and n > MAX_EXPERIMENTS and not _STORED.get():
            raise ValueError(_experiments_limit(n))
        return n

    @field_validator("stop_when")
    @classmethod
    def _parses(cls, text: str | None) -> str | None:
        if text is not None:
            parse_output_bound(text)
        return text


class Execution(_Model):
    """How experiments are run: how many at once, how long each may take, how often to retry.

    >>> Execution(concurrency=4, timeout="10 min").timeout
    600.0
    """

    # at most what one station may say it runs at once (protocol.Hello.capacity): 10**20 passed validation, and the
    # local compute station started a worker process for each until the machine ran out of memory
    concurrency: Whole = Field(1, ge=1, le=1024, description="experiments in flight at once")
    timeout: Duration | None = Field(None, description="per experiment, e.g. '10 min'")
    retries: Whole = Field(0, ge=0, description="how often a failed experiment is run again")
    approve: StrictBool = Field(False, description="a person approves each experiment before it runs")


class PlannerSettings(_Model):
    """Which planner proposes experiments, and its settings.

    >>> PlannerSettings(backend="sobol", seed=7).backend
    'sobol'
    """

    backend: Literal["botorch", "ax", "sobol", "random"] = "botorch"
    initial_experiments: Whole | None = Field(None, ge=1, description="space-filling experiments before the model")
    # torch's and NumPy's generators take seeds of 0 to 2**63 - 1: a larger one passed validation, then the
    # planner failed at every suggestion
    seed: Whole | None = Field(None, ge=0, le=2**63 - 1, description="the planner's seed: same seed, same data, "
                               "same proposals")


def _said(value: Any) -> str:
    """A setting's value in a message: ``unset`` for one not given."""
    return "unset" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def _instrument_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: parse_duration(v) if isinstance(v, str) and _OPTION_DURATION_RE.fullmatch(v) else v
            for k, v in options.items()}


class Instrument(_Model):
    """The instrument that runs experiments: a simulator or a hardware driver, by import path.

    Option values written as durations (``latency: 0.5 s``) reach the factory in seconds.

    >>> Instrument(simulator="simulators.surfaces:Branin", options={"latency": "0.5 s"}).options
    {'latency': 0.5}
    """

    simulator: Text | None = Field(None, description="import path 'package.module:Factory' of a simulated instrument")
    driver: Text | None = Field(None, description="import path 'package.module:Factory' of a hardware binding")
    function: Text | None = Field(None, description="import path 'package.module:function' of a computational "
                                  "experiment run on Dask: called with the parameters and options as keywords, it "
                                  "returns a mapping of outputs")
    command: Text | None = Field(None, min_length=1, max_length=480,
                                 description="external program run on Dask, e.g. 'python sim.py --x {x1}': each "
                                 "{name} is filled from the parameters and options; it prints its outputs as JSON")
    options: dict[Text, Any] = Field(default_factory=dict, description="keyword arguments of the factory")

    @field_validator("options")
    @classmethod
    def _durations(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _instrument_options(options)

    @model_validator(mode="after")
    def _exactly_one(self) -> Instrument:
        given = [k for k in ("simulator", "driver", "function", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'simulator', 'driver', 'function' or 'command'")
        if self.command is not None:
            command_placeholders(self.command)  # raises ValueError for a malformed template
            return self
        path = self.import_path or ""
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path):
            raise ValueError(f"{path!r} is not an import path of the form 'package.module:Name'")
        return self

    @property
    def target(self) -> str:
        """What a station is asked to run: the import path of a simulator's or driver's factory, or
        ``function:<import path>`` / ``command:<template>`` for a computational experiment (issue 8)."""
        if self.function is not None:
            return f"function:{self.function}"
        if self.command is not None:
            return f"command:{self.command}"
        return self.simulator or self.driver or ""

    @property
    def import_path(self) -> str | None:
        """The 'package.module:Name' to import (None for a command)."""
        return self.simulator or self.driver or self.function

    @property
    def field(self) -> str:
        """``simulator``, ``driver``, ``function`` or ``command``: the key that names the instrument."""
        for key in ("simulator", "driver", "function"):
            if getattr(self, key) is not None:
                return key
        return "command"

    @property
    def computational(self) -> bool:
        """A function or command, which a compute station runs on Dask (closedloop.compute)."""
        return self.function is not None or self.command is not None


SOURCE = "source"  # the key naming an experiment's source among its parameters (campaigns with sources)
# what every table of trials (show, export, report, import) holds besides the parameters and outputs
TABLE_COLUMNS = ("trial", "status", "station", "error", "run_uid", "generator", "execution", "attempts", "duration_s",
                 "proposed_at", "dispatched_at", "finished_at")


class Source(_Model):
    """One source of the campaign's outputs and the cost of an experiment there: a fast simulation, a slow robot.

    Every source measures the same objectives; exactly one is the ``target``, the one whose results
    count (the real experiment). The others are cheaper, biased views of it that the planner may use
    to decide where to spend the target's experiments.

    >>> Source(cost=0.1, instrument=Instrument(function="simulators.surfaces:biased_branin")).target
    False
    """

    cost: Real = Field(gt=0, description="cost of one experiment from this source, in a unit shared by all sources")
    instrument: Instrument = Field(description="what runs this source's experiments (as the top-level 'instrument')")
    target: StrictBool = Field(False, description="this source's results are the ones that count; exactly one")


def command_placeholders(template: str) -> list[str]:
    """The ``{name}`` fields of a command template; ValueError if it is malformed or indexes a field."""
    import string

    names = []
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise ValueError(f"placeholder {{{name}}} must be a parameter or option name")
            names.append(name)
    except ValueError as exc:
        raise ValueError(f"command {template!r}: {exc}") from None
    return names


def _candidates_schema(schema: dict[str, Any]) -> None:
    # the short form 'candidates: library.csv' is a plain string
    obj = dict(schema)
    schema.clear()
    schema.update({"anyOf": [{"type": "string", "description": "path of a CSV file"}, obj]})


class Candidates(_Model):
    """A table of allowed experiments: every proposal is one of its rows.

    Written as a path (``candidates: library.csv``) or as ``{file: library.csv, repeats: true}``. The CSV
    file has a header naming the parameters; a relative path is read from the campaign file's folder.

    >>> Candidates.model_validate("library.csv").file
    'library.csv'
    """

    model_config = ConfigDict(json_schema_extra=_candidates_schema)

    file: Text = Field(min_length=1, description="path of a CSV file with one column per parameter")
    repeats: StrictBool = Field(False, description="whether a row may be proposed more than once")

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value


class Campaign(_Model):
    """A whole campaign: the search space, the goals, the budget and the instrument.

    >>> c = Campaign(name="demo", parameters={"x": ContinuousParameter(bounds=(0, 1))},
    ...              objectives={"y": Objective(goal="minimize")}, budget=Budget(experiments=10),
    ...              instrument=Instrument(simulator="simulators.surfaces:Branin"))
    >>> Campaign.from_yaml_text(c.to_yaml(), check_instrument=False) == c
    True
    """

    model_config = ConfigDict(
        title="closedloop campaign",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    # the name makes file names (results/NAME.db and beside it): a 5,000-character one passed, then failed to run
    name: Text = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                       description="names the campaign in the store")
    description: Text = ""
    parameters: dict[Text, Parameter] = Field(min_length=1, description="what may be varied, by name")
    constraints: list[Text] = Field(default_factory=list,
                                    description="linear constraints, e.g. 'a + b <= 1', 'a + b + c == 1'")
    candidates: Candidates | None = Field(None, description="a CSV table of allowed experiments")
    objectives: dict[Text, Objective] = Field(min_length=1, description="outputs to optimize, by name")
    outcome_constraints: list[Text] = Field(default_factory=list,
                                            description="bounds on measured outputs, e.g. 'yield >= 0.8'")
    budget: Budget
    execution: Execution = Field(default_factory=Execution)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    instrument: Instrument | None = Field(None, description="the simulator, driver, function or command that runs the "
                                          "experiments (or give 'sources')")
    sources: dict[Text, Source] = Field(default_factory=dict,
                                        description="several sources of the same objectives with their costs (a "
                                        "simulation and a robot), instead of one 'instrument'")

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        problems = consistency_problems(
            self.parameters, self.constraints, self.objectives, self.outcome_constraints, self.budget, self.planner,
            self.candidates, self.instrument, self.sources,
        )
        if problems:
            raise CampaignFileError([Problem("<campaign>", None, None, path, message) for path, message in problems])
        return self

    @field_serializer("candidates")
    def _short_candidates(self, candidates: Candidates | None) -> Any:
        if candidates is None or candidates.repeats:
            return candidates
        return candidates.file

    # -- derived views ------------------------------------------------------------------

    @property
    def linear_constraints(self) -> list[LinearConstraint]:
        """The constraints over tunable parameters; fixed parameters are folded into the right-hand side."""
        return [_fold_fixed(parse_linear_constraint(c), self.parameters) for c in self.constraints]

    @property
    def output_bounds(self) -> list[OutputBound]:
        return [parse_output_bound(c) for c in self.outcome_constraints]

    @property
    def stop_rule(self) -> OutputBound | None:
        return parse_output_bound(self.budget.stop_when) if self.budget.stop_when else None

    @property
    def outputs(self) -> list[str]:
        """Every output the instrument must measure: objectives, then constrained outputs, then the stop rule's."""
        names = list(self.objectives)
        bounds = self.output_bounds + ([self.stop_rule] if self.stop_rule else [])
        for bound in bounds:
            if bound.output not in names:
                names.append(bound.output)
        return names

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]

    @property
    def spec_hashes(self) -> set[str]:
        """``spec_hash``, and the hash the same file had when discrete whole numbers were held as floats
        ([1.0, 2.0, 4.0]), so that a store begun then still takes the file it was begun with."""
        parameters = {name: p.model_copy(update={"values": [float(v) for v in p.values]})
                      if isinstance(p, DiscreteParameter) else p for name, p in self.parameters.items()}
        legacy = self.model_copy(update={"parameters": parameters})  # no validation: it would make them ints again
        return {self.spec_hash, legacy.spec_hash}

    @property
    def tunable_parameters(self) -> dict[str, Parameter]:
        return {n: p for n, p in self.parameters.items() if not isinstance(p, FixedParameter)}

    # -- sources: one instrument, or several sources of the same objectives with costs --------------

    @property
    def target_source(self) -> str | None:
        """The source whose results count; None for a campaign with one instrument."""
        return next((name for name, s in self.sources.items() if s.target), None)

    @property
    def instruments(self) -> dict[str | None, Instrument]:
        """Every instrument the campaign runs: by source name, or ``{None: instrument}`` without sources."""
        if self.sources:
            return {name: s.instrument for name, s in self.sources.items()}
        assert self.instrument is not None  # the model validator requires one or the other
        return {None: self.instrument}

    def source_of(self, parameters: Mapping[str, Any]) -> str | None:
        """The source an experiment ran at (from its ``source`` parameter); None without sources."""
        return str(parameters.get(SOURCE)) if self.sources else None

    def instrument_for(self, parameters: Mapping[str, Any]) -> Instrument:
        """The instrument that runs an experiment: its source's, or the campaign's only one."""
        return self.instruments[self.source_of(parameters)]

    def at_source(self, source: str) -> Campaign:
        """The campaign as one of its sources measures it: the same parameters and objectives on that source's
        instrument, without sources, its budget in experiments (what the cost buys at the cheapest source). For a
        planner that cannot choose among sources but may be told where: the daemon's space-filling filler.

        >>> campaign.at_source("simulation").sources                  # doctest: +SKIP
        {}
        """
        budget = self.budget.model_copy(update={"experiments": self.max_experiments, "cost": None})
        return self.model_copy(update={"sources": {}, "instrument": self.sources[source].instrument, "budget": budget})

    def counts(self, parameters: Mapping[str, Any]) -> bool:
        """Whether an experiment's results count towards the objectives: run at the target source (or no sources)."""
        return not self.sources or parameters.get(SOURCE) == self.target_source

    def cost_of(self, parameters: Mapping[str, Any]) -> float:
        """What an experiment costs: its source's cost; 1 (one experiment) without sources."""
        source = self.source_of(parameters)
        return self.sources[source].cost if source in self.sources else 1.0

    @property
    def max_experiments(self) -> int:
        """The most experiments the budget allows: ``budget.experiments``, or what ``budget.cost`` buys at the
        cheapest source (the last experiment may pass the cost, so rounded up)."""
        limits = [self.budget.experiments] if self.budget.experiments is not None else []
        if self.budget.cost is not None and self.sources:
            # held to the limit: a cost of 1e300 at a source costing 1e-300 buys infinitely many, and math.ceil
            # raised OverflowError (a file refuses that; a store's older copy must still read)
            bought = min(self.budget.cost / min(s.cost for s in self.sources.values()), MAX_EXPERIMENTS)
            limits.append(max(1, math.ceil(bought - 1e-9)))
        return min(limits) if limits else 1

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """(field path, message) for each problem that spans several fields (empty for a valid campaign)."""
        return consistency_problems(self.parameters, self.constraints, self.objectives, self.outcome_constraints,
                                    self.budget, self.planner, self.candidates, self.instrument, self.sources)

    def default_initial_experiments(self) -> int:
        """Size of the botorch planner's space-filling start before the model takes over:
        ``planner.initial_experiments``, else ``max(5, 2 d + 1)`` for one or two varied parameters and
        ``max(5, d + 4)`` above, and at least the most choices of a categorical parameter, at most a third of
        the budget and at most the candidate table's rows.

        A one-hot model knows nothing of a choice never tried but what the prior says: on the direct-arylation
        table (twelve ligands, 40 experiments) the nine-point start left the 100 % yield's ligand untried in
        many runs, and the search then spent thirty experiments on the first good ligand's variations."""
        if self.planner.initial_experiments is not None:
            return self.planner.initial_experiments
        dims = len(self.tunable_parameters)
        size = max(5, 2 * dims + 1) if dims <= 2 else max(5, dims + 4)
        size = max([size] + [len(p.values) for p in self.tunable_parameters.values()
                             if isinstance(p, CategoricalParameter)])
        size = min(size, max(1, self.max_experiments // 3))
        if self.candidates is not None:
            size = min(size, len(self.candidate_table()))
        return max(1, size)

    def space_size(self) -> int | None:
        """How many distinct experiments the space holds, before linear constraints; None if infinite.

        With a candidate table, the number of its rows.
        """
        if self.candidates is not None:
            return len(self.candidate_table())
        size = 1
        for p in self.tunable_parameters.values():
            if isinstance(p, ContinuousParameter):
                return None
            size *= p.bounds[1] - p.bounds[0] + 1 if isinstance(p, IntegerParameter) else len(p.values)  # type: ignore[union-attr]
        return size

    def summary(self) -> list[str]:
        """A few lines describing the campaign: parameters, objectives, budget, size of the space."""
        varied = len(self.tunable_parameters)
        lines = [f"parameters ({varied} varied, {len(self.parameters) - varied} fixed):"]
        for name, p in self.parameters.items():
            unit = f" {p.unit}" if getattr(p, "unit", None) else ""
            if isinstance(p, ContinuousParameter):
                detail = f"[{p.bounds[0]:g}, {p.bounds[1]:g}]{unit}" + (" (log scale)" if p.scale == "log" else "")
            elif isinstance(p, IntegerParameter):
                detail = f"{p.bounds[0]}..{p.bounds[1]}{unit}"
            elif isinstance(p, FixedParameter):
                detail = f"= {p.value}{unit}"
            else:
                detail = "{" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in p.values) + "}" + unit
            lines.append(f"  {name}: {p.type} {detail}")
        for text in self.constraints:
            lines.append(f"constraint: {text}")
        goals = []
        for name, o in self.objectives.items():
            goals.append(f"{o.goal} {name}" + (f" (threshold {o.threshold:g})" if o.threshold is not None else ""))
        kind = "Pareto front of " if len(goals) > 1 else ""
        lines.append(f"objectives: {kind}{', '.join(goals)}")
        if self.outcome_constraints:
            lines.append(f"outcome constraints: {', '.join(self.outcome_constraints)}")
        spends = ([f"{self.budget.experiments} experiments"] if self.budget.experiments is not None else []) + (
            [f"cost {self.budget.cost:g}"] if self.budget.cost is not None else [])
        budget = f"budget: {' or '.join(spends)}"
        if self.budget.hours is not None:
            budget += f", at most {self.budget.hours:g} h"
        if self.budget.stop_when:
            budget += f", stop when {self.budget.stop_when}"
        lines.append(budget)
        lines.append(f"space: {self.describe_space()}")
        start = (f", {self.default_initial_experiments()} initial experiments" if self.planner.backend == "botorch"
                 else "")
        lines.append(f"planner: {self.planner.backend}{start}"
                     + (f", seed {self.planner.seed}" if self.planner.seed is not None else ""))
        ex = self.execution
        lines.append(f"execution: {ex.concurrency} at once"
                     + (f", timeout {_format_duration(ex.timeout)}" if ex.timeout else "")
                     + (f", {ex.retries} retr{'y' if ex.retries == 1 else 'ies'}" if ex.retries else "")
                     + (", each approved by a person" if ex.approve else ""))
        for source, instrument in self.instruments.items():
            what = f"{instrument.field} {getattr(instrument, instrument.field)}"
            if source is None:
                lines.append(f"instrument: {what}")
            else:
                s = self.sources[source]
                lines.append(f"source {source}: cost {s.cost:g}, {what}" + (" (target)" if s.target else ""))
        return lines

    def describe_space(self) -> str:
        """The size of the search space in words."""
        if self.candidates is not None:
            repeats = " (repeats allowed)" if self.candidates.repeats else ""
            return f"{len(self.candidate_table())} candidate rows{repeats}"
        continuous = [p for p in self.tunable_parameters.values() if isinstance(p, ContinuousParameter)]
        discrete = 1
        for p in self.tunable_parameters.values():
            if isinstance(p, IntegerParameter):
                discrete *= p.bounds[1] - p.bounds[0] + 1
            elif isinstance(p, (CategoricalParameter, DiscreteParameter)):
                discrete *= len(p.values)
        parts = []
        if continuous:
            parts.append(f"{len(continuous)} continuous dimension{'s' if len(continuous) > 1 else ''}")
        if len(continuous) < len(self.tunable_parameters):
            parts.append(f"{discrete:,} combination{'s' if discrete > 1 else ''} of the others")
        text = " x ".join(parts) if continuous else f"{discrete:,} points"
        if self.constraints:
            text += f", cut by {len(self.constraints)} linear constraint{'s' if len(self.constraints) > 1 else ''}"
        return text

    def candidate_table(self, base: str | Path | None = None) -> list[dict[str, Any]]:
        """The rows of the candidate table, as parameter dicts in declared types (fixed ones included).

        ``base`` is the folder a relative path is read from (default: the current one; campaigns read
        by :func:`load_campaign` hold an absolute path). Raises :class:`CampaignError` on a bad table.
        """
        if self.candidates is None:
            return []
        rows, problems = _read_candidates(self, Path(base) if base is not None else Path.cwd())
        if problems:
            raise CampaignFileError([Problem("<campaign>", None, None, path, message) for path, message in problems])
        return rows

    def differences(self, other: Campaign, limit: int = 3) -> list[str]:
        """Where ``other`` differs from this campaign, as a person would say it: ``budget.experiments: 12 → 15``
        (at most ``limit``, then ``and N more``)."""
        def flat(value: Any, prefix: str = "") -> dict[str, Any]:
            if isinstance(value, dict):
                return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
            return {prefix[:-1]: value}

        mine = flat(self.model_dump(mode="json", exclude_defaults=True))
        theirs = flat(other.model_dump(mode="json", exclude_defaults=True))
        said = [f"{key}: {_said(mine.get(key))} → {_said(theirs.get(key))}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
        return said[:limit] + ([f"and {len(said) - limit} more"] if len(said) > limit else [])

    # -- YAML ---------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The campaign as YAML that loads back into an equal campaign."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        # the 'type' tag has a default in Python but the file needs it to tell the variants apart
        data["parameters"] = {
            name: {"type": p.type, **data["parameters"][name]} for name, p in self.parameters.items()
        }
        data = {"name": self.name, **data}  # keep the name first even when other keys are defaults
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<campaign>", *, check_instrument: bool = True) -> Campaign:
        """Parse a campaign from YAML text; raises :class:`CampaignFileError` with every problem found."""
        return load_campaign_text(text, source, check_instrument=check_instrument)

    @classmethod
    def from_yaml(cls, path: str | Path, *, check_instrument: bool = True) -> Campaign:
        """Read and validate a campaign file."""
        return load_campaign(path, check_instrument=check_instrument)

    @classmethod
    def from_stored_yaml(cls, text: str, source: str = "<store>") -> Campaign:
        """A campaign as a store holds it (its ``to_yaml`` when it began), read under today's rules.

        A threshold on the only objective was accepted, and ignored, until it was refused (it is the reference
        point of several objectives): it is dropped, so such a store still reads, and takes the same file without
        it, which runs the same.
        """
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        objectives = data.get("objectives") if isinstance(data, dict) else None
        if isinstance(objectives, dict) and len(objectives) == 1:
            [objective] = objectives.values()
            if isinstance(objective, dict) and objective.pop("threshold", None) is not None:
                text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        # checked against its instrument when it was started; reading results must not need the lab's drivers
        stored = _STORED.set(True)
        try:
            return load_campaign_text(text, source, check_instrument=False)
        finally:
            _STORED.reset(stored)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of a campaign file (``closedloop schema``)."""
        schema = cls.model_json_schema(mode="validation")
        _trim_descriptions(schema)
        return schema


def _trim_descriptions(node: Any) -> None:
    """Keep the first paragraph of class docstrings: editors show it, the doctest is for readers of the code."""
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            node["description"] = node["description"].split("\n\n")[0].replace("``", "'")
        for value in node.values():
            _trim_descriptions(value)
    elif isinstance(node, list):
        for value in node:
            _trim_descriptions(value)


# --------------------------------------------------------------------------------------------
# Checks that span fields. They run on whatever parts of a file are valid, so that one broken
# section does not hide the problems of another.


def _fold_fixed(constraint: LinearConstraint, parameters: Mapping[str, Any]) -> LinearConstraint:
    coefficients, rhs = {}, constraint.rhs
    for name, c in constraint.coefficients.items():
        p = parameters.get(name)
        if isinstance(p, FixedParameter):
            rhs -= c * float(p.value)
        else:
            coefficients[name] = c
    return LinearConstraint(coefficients, constraint.op, rhs, constraint.text)


def _bad_name(name: Any) -> str | None:
    if not isinstance(name, str):
        return None  # the type check says it: names are text
    if invisible := _invisible(name):
        return invisible
    if not name.isidentifier():
        return (f"{name!r} is not a usable name: start with a letter, use only letters, digits and '_' "
                "(names appear in constraint expressions)")
    # expressions read names as Python does, in NFKC: 'e' and a combining accent, or the micro sign, would be
    # another name there, and would stand beside their composed twin as a second parameter that looks the same
    if (normal := unicodedata.normalize("NFKC", name)) != name and not _STORED.get():
        return (f"{name!r} ({ascii(name)}) is not in Unicode's normal form NFKC, in which expressions read it as "
                f"{normal!r} ({ascii(normal)}); write it that way")
    return None


def _column_name(name: Any) -> str | None:
    if name in TABLE_COLUMNS and not _STORED.get():
        return (f"{name!r} is a column of every table of trials (show, export, import: "
                f"{', '.join(TABLE_COLUMNS)}); choose another name")
    return None


def consistency_problems(
    parameters: Mapping[str, Any] | None,
    constraints: list[str] | None,
    objectives: Mapping[str, Any] | None,
    outcome_constraints: list[str] | None,
    budget: Budget | None,
    planner: PlannerSettings | None,
    candidates: Candidates | None = None,
    instrument: Any = None,
    sources: Mapping[str, Source] | None = None,
) -> list[tuple[str, str]]:
    """(field path, message) for each problem spanning several fields.

    ``None`` stands for a section that is itself invalid: checks that need it are skipped. In
    ``parameters``, a value of ``None`` marks a parameter whose name is known but whose definition is
    invalid. ``instrument`` only matters by being given (anything but None) or not.
    """
    problems: list[tuple[str, str]] = []
    names = set(parameters or {})
    for name in parameters or {}:
        if bad := _bad_name(name) or _column_name(name):
            problems.append((f"parameters.{name}", bad))
    for name in objectives or {}:
        if bad := _bad_name(name) or _column_name(name):
            problems.append((f"objectives.{name}", bad))
        elif name in names:
            problems.append((f"objectives.{name}", f"{name!r} is both a parameter and an objective"))
    if objectives is not None and len(objectives) == 1:
        [(name, objective)] = objectives.items()
        if objective.threshold is not None:
            # 'yield: {goal: maximize, threshold: 80}' was accepted and ignored; the scientist meant a stop or a goal
            op, verb = (">=", "reaches") if objective.goal == "maximize" else ("<=", "falls to")
            value = repr(float(objective.threshold)).removesuffix(".0")
            problems.append((f"objectives.{name}.threshold",
                             "thresholds are the reference point of several objectives (their Pareto front), so one "
                             f"objective's would be ignored; to stop once {name} {verb} {value}, write "
                             f'budget.stop_when: "{name} {op} {value}"'))
    if parameters is not None and parameters and all(isinstance(p, FixedParameter) for p in parameters.values()):
        problems.append(("parameters", "every parameter is fixed: there is nothing to vary"))

    parsed: list[LinearConstraint] = []
    for i, text in enumerate(constraints or []):
        where = f"constraints[{i}]"
        try:
            constraint = parse_linear_constraint(text)
        except ValueError as exc:
            problems.append((where, str(exc)))
            continue
        if parameters is None:
            continue
        unknown = sorted(set(constraint.coefficients) - names)
        if unknown:
            problems.append((where, f"{text!r}: " + _unknown_names("parameter", unknown, names)))
            continue
        if any(parameters[n] is None for n in constraint.coefficients):
            continue
        wrong = [n for n in constraint.coefficients
                 if not isinstance(parameters[n], NUMERIC)
                 and not (isinstance(parameters[n], FixedParameter) and not isinstance(parameters[n].value, str))]
        if wrong:
            problems.append((where, f"{text!r}: {', '.join(repr(n) for n in wrong)} is not numeric "
                                    f"({', '.join(parameters[n].type for n in wrong)}); only numeric parameters "
                                    "can appear in a linear constraint"))
            continue
        folded = _fold_fixed(constraint, parameters)
        if not folded.coefficients:
            holds = folded.satisfied({})
            problems.append((where, f"{text!r} names only fixed parameters, so it constrains nothing"
                                    + ("" if holds else " and never holds")))
            continue
        if folded.op == "==":
            not_continuous = [n for n in folded.coefficients if not isinstance(parameters[n], ContinuousParameter)]
            if not_continuous and candidates is None:
                problems.append((where, f"{text!r}: an equality can only hold continuous parameters; "
                                        f"{', '.join(repr(n) for n in not_continuous)} cannot be moved continuously "
                                        "to meet it (use a candidate table, or <= and >=)"))
                continue
        parsed.append(folded)
    if parsed and parameters is not None and len(parsed) == len(constraints or []):
        degenerate = _infeasible(parameters, parsed) or (_one_point(parameters, parsed) if candidates is None else None)
        if degenerate:
            problems.append(("constraints", degenerate))

    known_outputs = set(objectives or {})
    bounds_so_far: list[OutputBound] = []
    for i, text in enumerate(outcome_constraints or []):
        where = f"outcome_constraints[{i}]"
        try:
            bound = parse_output_bound(text)
        except ValueError as exc:
            problems.append((where, str(exc)))
            continue
        if bound.output in names:
            problems.append((where, f"{text!r}: {bound.output!r} is a parameter, not an output"))
        elif bad := _bad_name(bound.output) or _column_name(bound.output):
            problems.append((where, bad))
        # 'z >= 2' and 'z <= 1' ran the whole budget with every experiment breaking one of them, none counted
        for other in bounds_so_far:
            if other.output == bound.output and other.op != bound.op and not (
                    bound.satisfied(other.value) and other.satisfied(bound.value)):
                problems.append((where, f"{text!r} contradicts {other.text!r}: no {bound.output} meets both, so "
                                        "every experiment would break an outcome constraint"))
        bounds_so_far.append(bound)
        known_outputs.add(bound.output)
    if budget is not None and budget.stop_when and objectives is not None and outcome_constraints is not None:
        rule = parse_output_bound(budget.stop_when)
        if rule.output not in known_outputs:
            problems.append(("budget.stop_when", f"{budget.stop_when!r}: "
                             + _unknown_names("output", [rule.output], known_outputs)
                             + " (an objective or an output named in outcome_constraints)"))
        elif rule.output in objectives and not _STORED.get():
            # the campaign stops at its first result meeting the rule, and while maximizing the first results are the
            # low ones: 'y <= 0.1' ended it at about the first experiment, reporting the goal reached
            goal = objectives[rule.output].goal
            if (goal == "maximize") == (rule.op == "<="):
                value = repr(float(rule.value)).removesuffix(".0")
                want = ">=" if goal == "maximize" else "<="
                problems.append(("budget.stop_when",
                                 f"{budget.stop_when!r} points against the goal: {rule.output} is {goal}d, so the "
                                 "rule is met by poor results, which come first, and the campaign would stop at about "
                                 f"its first experiment; to stop once {rule.output} is good enough, write "
                                 f"'{rule.output} {want} {value}'"))
    problems.extend(_source_problems(parameters, budget, planner, instrument, sources))
    if budget is not None and planner is not None and budget.experiments is not None:
        initial = planner.initial_experiments
        if initial is not None and initial > budget.experiments:
            problems.append(("planner.initial_experiments",
                             f"{initial} initial experiments exceed the budget of {budget.experiments} experiments"))
    return problems


def _source_problems(parameters: Mapping[str, Any] | None, budget: Budget | None, planner: PlannerSettings | None,
                     instrument: Any, sources: Mapping[str, Source] | None) -> list[tuple[str, str]]:
    """One instrument or several sources (exactly one the target), and what sources ask of the rest."""
    if sources is None:  # the sources section is itself wrong: its own errors say why
        return []
    problems: list[tuple[str, str]] = []
    if not sources:
        if instrument is None:
            problems.append(("instrument", "required field is missing (the instrument that runs the experiments, "
                                           "or 'sources' for several of them with costs)"))
        if budget is not None and budget.cost is not None:
            problems.append(("budget.cost", "a budget in cost needs 'sources', each with the cost of its experiments; "
                                            "with one instrument give 'experiments'"))
        return problems
    if instrument is not None:
        problems.append(("sources", "give either 'instrument' (one) or 'sources' (several, with costs), not both"))
    for name in sources:
        if bad := _bad_name(name):
            problems.append((f"sources.{name}", bad))
    if len(sources) < 2:
        problems.append(("sources", f"needs at least two sources (only {', '.join(map(repr, sources))}); "
                                    "with one, write it as 'instrument'"))
    targets = [name for name, s in sources.items() if s.target]
    if len(targets) != 1:
        found = "none is" if not targets else f"{', '.join(map(repr, targets))} are"
        problems.append(("sources", f"exactly one source must be the target ('target: true'), the one whose results "
                                    f"count; {found}"))
    if parameters is not None and SOURCE in parameters:
        problems.append((f"parameters.{SOURCE}", f"{SOURCE!r} names each experiment's source in a campaign with "
                                                 "sources; give the parameter another name"))
    if budget is not None and budget.cost is not None and budget.experiments is None and not _STORED.get():
        cheapest = min(sources.items(), key=lambda item: item[1].cost)
        bought = budget.cost / cheapest[1].cost
        if bought > MAX_EXPERIMENTS:
            count = f"{bought:.3g}" if math.isfinite(bought) else "endlessly many"
            problems.append(("budget.cost", f"{budget.cost:g} buys {count} experiments at the cheapest source "
                                            f"({cheapest[0]!r}, cost {cheapest[1].cost:g}), more than the "
                                            f"{MAX_EXPERIMENTS:,} a campaign may run; lower it or add "
                                            "budget.experiments"))
    if planner is not None and planner.backend != "botorch":
        problems.append(("planner.backend", f"the {planner.backend} backend cannot choose among sources; "
                                            "use 'botorch' (its multi-fidelity model)"))
    return problems


# Ax refuses a range narrower than this, whatever its units (ax.core.parameter: 100 * EPS, EPS = 1.5e-7)
AX_NARROWEST = 1.5e-5


def backend_problems(campaign: Campaign) -> list[tuple[str, str]]:
    """What the campaign's planner (the ax backend, or the multi-fidelity planner of a campaign with sources)
    cannot handle, as ``(field path, message)``: found when the file is loaded, not when the daemon builds the
    planner, by which time the campaign had been written to the store (an idle campaign of 0 experiments) and
    `closedloop run` ended with exit code 1."""
    if campaign.sources:
        if campaign.planner.backend != "botorch":
            return []  # the sources' check says it
        from closedloop.planner.multifidelity import unsupported as multifidelity_unsupported

        return [tuple(text.split(": ", 1)) for text in multifidelity_unsupported(campaign)]  # type: ignore[misc]
    if campaign.planner.backend != "ax":
        return []  # the other backends handle every campaign
    from closedloop.planner.ax_backend import unsupported

    problems = [tuple(text.split(": ", 1)) for text in unsupported(campaign)]
    for name, p in campaign.tunable_parameters.items():
        if isinstance(p, ContinuousParameter) and p.bounds[1] - p.bounds[0] < AX_NARROWEST:
            problems.append((f"parameters.{name}.bounds", f"the ax backend refuses a range narrower than "
                             f"{AX_NARROWEST:g} (Ax's numerics); rescale the parameter or use the botorch backend"))
    return problems  # type: ignore[return-value]


def _unknown_names(kind: str, unknown: list[str], known: set[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        parts.append(f"unknown {kind} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(parts) + f"; known: {', '.join(sorted(known)) or 'none'}"


def _polytope(parameters: Mapping[str, Any], constraints: list[LinearConstraint], *,
              choices: bool = False) -> dict[str, Any]:
    """The constrained parameters' bounds and constraints as keyword arguments of ``scipy.optimize.linprog``,
    with ``names`` (sorted) for its first columns. With ``choices``, a discrete parameter takes only its values: one
    0/1 column per value after the names' columns, exactly one of them 1, stands for it in the constraints (a
    mixed-integer program); its range alone let "x >= 1.5" and "x <= 2.5" through for values [1, 3], and the
    planner then failed on the first proposal."""
    import numpy as np

    names = sorted({n for c in constraints for n in c.coefficients})
    bounds, integrality = [], []
    picks: list[tuple[int, list[float]]] = []  # (column, values) of each discrete parameter, with choices
    for j, n in enumerate(names):
        p = parameters[n]
        if isinstance(p, DiscreteParameter):
            bounds.append((min(p.values), max(p.values)))
            # the solver's tolerances are absolute: values far from 1 (1e30, 1e-153) keep the range, as before
            if choices and all(v == 0 or 1e-9 <= abs(v) <= 1e9 for v in p.values):
                picks.append((j, [float(v) for v in p.values]))
        else:
            bounds.append(tuple(p.bounds))
        integrality.append(1 if isinstance(p, IntegerParameter) else 0)
    width = len(names) + sum(len(values) for _, values in picks)
    a_ub, b_ub, a_eq, b_eq = [], [], [], []
    for c in constraints:
        # each row over its largest coefficient: HiGHS called "1e15 * x1 <= 1e16" (x1 <= 10) infeasible
        scale = max(abs(c.coefficients.get(n, 0.0)) for n in names) or 1.0
        row = [c.coefficients.get(n, 0.0) / scale for n in names]
        for j, values in picks:
            # the value picked in place of the parameter (its own column kept, unused, so the names' columns stay)
            row += [row[j] * v for v in values]
            row[j] = 0.0
        if c.op == "<=":
            a_ub.append(row)
            b_ub.append(c.rhs / scale)
        elif c.op == ">=":
            a_ub.append([-v for v in row])
            b_ub.append(-c.rhs / scale)
        else:
            a_eq.append(row)
            b_eq.append(c.rhs / scale)
    start = len(names)
    for _, values in picks:
        a_eq.append([1.0 if start <= k < start + len(values) else 0.0 for k in range(width)])
        b_eq.append(1.0)
        bounds += [(0, 1)] * len(values)
        integrality += [1] * len(values)
        start += len(values)
    return {"names": names, "bounds": bounds, "integrality": integrality,
            "A_ub": np.array(a_ub) if a_ub else None, "b_ub": np.array(b_ub) if b_ub else None,
            "A_eq": np.array(a_eq) if a_eq else None, "b_eq": np.array(b_eq) if b_eq else None}


def _infeasible(parameters: Mapping[str, Any], constraints: list[LinearConstraint]) -> str | None:
    """A message when no point within the parameters' bounds satisfies every linear constraint."""
    import numpy as np
    from scipy.optimize import linprog

    problem = _polytope(parameters, constraints, choices=True)
    problem.pop("names")
    result = linprog(np.zeros(len(problem["bounds"])), **problem, method="highs")
    if result.status == 2:
        return ("no point within the parameters' bounds satisfies all constraints together: "
                + "; ".join(repr(c.text) for c in constraints))
    return None


def _one_point(parameters: Mapping[str, Any], constraints: list[LinearConstraint]) -> str | None:
    """A message when the constraints leave every parameter a single value: the campaign would run that one
    experiment for its whole budget (``a + b == 2`` with both at most 1)."""
    import numpy as np
    from scipy.optimize import linprog

    problem = _polytope(parameters, constraints)
    names = problem.pop("names")
    if any(n not in names and not isinstance(p, FixedParameter) for n, p in parameters.items()):
        return None
    values = []
    for i, n in enumerate(names):
        direction = np.zeros(len(names))
        direction[i] = 1.0
        low, high = (linprog(sign * direction, **problem, method="highs") for sign in (1.0, -1.0))
        if low.status != 0 or high.status != 0:
            return None
        width = problem["bounds"][i][1] - problem["bounds"][i][0]
        if high.x[i] - low.x[i] > 1e-9 * max(width, 1e-300):
            return None
        values.append(f"{n}={low.x[i]:g}")
    return (f"the constraints leave a single point ({', '.join(values)}): there is nothing to vary; make these "
            "fixed parameters, or loosen the constraints: " + "; ".join(repr(c.text) for c in constraints))


# --------------------------------------------------------------------------------------------
# The candidate table


_MAX_ROW_PROBLEMS = 5

# a number as a table or a command line writes it: Python's float() also takes '1_000' and other scripts' digits
# ('٣' for 3), so a typo became data
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.ASCII | re.IGNORECASE)


def decimal_number(text: str) -> float:
    """``text`` (a table's cell, a command line's value) as a float: ASCII digits, a point, an exponent.

    Raises ValueError(``could not convert ...``) as ``float`` does for anything else; infinities and NaN are read (the
    caller refuses them with its own words)."""
    if not _DECIMAL.fullmatch(text.strip()):
        raise ValueError(f"could not convert string to float: {text!r}")
    return float(text)


def _cell(p: Any, raw: str) -> Any:
    """The value of one CSV cell in the parameter's declared type; ValueError says what is wrong."""
    text = raw.strip()
    if isinstance(p, ContinuousParameter):
        v = decimal_number(text)
        if not math.isfinite(v):
            raise ValueError(f"{text!r} is not a finite number")
        if not p.bounds[0] <= v <= p.bounds[1]:
            raise ValueError(f"{v:g} is outside the bounds [{p.bounds[0]:g}, {p.bounds[1]:g}]")
        return v
    if isinstance(p, IntegerParameter):
        v = decimal_number(text)
        if not v.is_integer():
            raise ValueError(f"{text!r} is not an integer")
        if not p.bounds[0] <= v <= p.bounds[1]:
            raise ValueError(f"{v:g} is outside the bounds [{p.bounds[0]}, {p.bounds[1]}]")
        return int(v)
    if isinstance(p, DiscreteParameter):
        v = decimal_number(text)
        allowed = p.allowed(v)
        if allowed is None:
            raise ValueError(f"{v:g} is not one of the values {p.values}")
        return allowed
    choices = p.values if isinstance(p, CategoricalParameter) else [p.value]
    for choice in choices:
        if isinstance(choice, str) and choice == text:
            return choice
        if not isinstance(choice, str):
            try:
                if decimal_number(text) == choice:
                    return choice
            except ValueError:
                pass
    if isinstance(p, FixedParameter):
        raise ValueError(f"{text!r} differs from the fixed value {p.value!r}")
    raise ValueError(f"{text!r} is not one of the values {p.values}")


def _read_candidates(campaign: Campaign, base: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The table's rows in declared types, and (field path, message) for each problem."""
    assert campaign.candidates is not None
    where = "candidates" if not campaign.candidates.repeats else "candidates.file"
    path = Path(campaign.candidates.file)
    path = path if path.is_absolute() else base / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [(where, f"cannot read the candidate table {str(path)!r}: {exc.strerror}")]
    try:
        text = data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as exc:
        # Excel's plain "CSV" is Windows-1252/Latin-1 ('°C', 'é'): the codec's byte offset tells a scientist nothing
        line = data.count(b"\n", 0, exc.start) + 1
        return [], [(where, f"{path.name} is not UTF-8 text (line {line} has the byte 0x{data[exc.start]:02x}, "
                     "perhaps Latin-1 or Windows-1252); save it as UTF-8 (in Excel: 'CSV UTF-8')")]
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        lines = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        return [], [(where, f"{path.name} is not a readable CSV file: {exc}")]
    lines = [(n, row) for n, row in lines if "".join(row).strip()]
    if not lines:
        return [], [(where, f"{path.name} is empty; it needs a header naming the parameters and at least one row")]
    header = [h.strip() for h in lines[0][1]]
    if any(";" in h for h in header):
        # Excel in a language with decimal commas saves 'CSV' with ';': reported column by column, the
        # problems ('ligand;temp;loading' is not a parameter, no column for each) hid the one cause
        return [], [(where, f"{path.name}, line {lines[0][0]}: the header {','.join(lines[0][1])!r} seems to use ';' "
                     "as separator; the table must be comma-separated, with '.' as decimal point")]
    problems: list[tuple[str, str]] = []
    tunable = campaign.tunable_parameters
    seen_columns: set[str] = set()
    for h in header:
        if h in seen_columns:
            problems.append((where, f"{path.name}: column {h!r} appears twice"))
        seen_columns.add(h)
        if h not in campaign.parameters:
            close = difflib.get_close_matches(h, list(campaign.parameters), n=1)
            problems.append((where, f"{path.name}: column {h!r} is not a parameter"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; the parameters are {', '.join(campaign.parameters)}"))
    missing = [n for n in tunable if n not in header]
    if missing:
        problems.append((where, f"{path.name}: no column for the parameter{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(m) for m in missing)}; the header is {', '.join(header)}"))
    if problems:
        return [], problems
    rows: list[dict[str, Any]] = []
    row_problems: list[str] = []
    constraints = campaign.linear_constraints
    seen_rows: dict[tuple, int] = {}
    fixed = {name: p.value for name, p in campaign.parameters.items() if isinstance(p, FixedParameter)}
    for line, cells in lines[1:]:
        if len(cells) != len(header):
            row_problems.append(f"line {line} has {len(cells)} cells, the header {len(header)}")
            continue
        row: dict[str, Any] = {}
        for h, raw in zip(header, cells):
            try:
                row[h] = _cell(campaign.parameters[h], raw)
            except ValueError as exc:
                message = str(exc)
                if message.startswith("could not convert"):
                    message = f"{raw.strip()!r} is not a number"
                row_problems.append(f"line {line}, column {h}: {message}")
        if len(row) != len(header):
            continue
        row = {name: fixed[name] if name in fixed else row[name] for name in campaign.parameters}
        for c in constraints:
            if not c.satisfied(row):
                row_problems.append(f"line {line} violates the constraint {c.text!r}")
        key = tuple(row[n] for n in tunable)
        if key in seen_rows and not campaign.candidates.repeats:
            row_problems.append(f"line {line} repeats line {seen_rows[key]}")
        seen_rows.setdefault(key, line)
        rows.append(row)
    if row_problems:
        shown = row_problems[:_MAX_ROW_PROBLEMS]
        more = len(row_problems) - len(shown)
        problems.append((where, f"{path.name}: " + "; ".join(shown) + (f"; and {more} more" if more else "")))
        return [], problems
    if not rows:
        problems.append((where, f"{path.name} has a header but no rows"))
    elif not campaign.candidates.repeats and (campaign.budget.experiments or 0) > len(rows):
        problems.append(("budget.experiments",
                         f"a budget of {campaign.budget.experiments} experiments but only {len(rows)} candidate rows, "
                         "each used at most once (lower the budget or set candidates.repeats: true)"))
    return rows, problems


# --------------------------------------------------------------------------------------------
# The instrument: the import path must import, take the options, and (for a simulator, which is
# safe to build) have an axis for every parameter and a reading for every output.


def _import_problems(module_name: str, base: str | Path | None = None) -> str:
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = ""
        missing = exc.name or ""
        parent, _, leaf = missing.rpartition(".")
        # A lab's own module beside the campaign file: Python's path holds the script's folder, not the working
        # one, so the import fails there; say so rather than suggest a look-alike module (mylab -> pylab)
        local = [f for f in (f"{missing}.py", os.path.join(missing, "__init__.py")) if os.path.exists(f)]
        # or beside the campaign file, run from another folder: the hint was a look-alike ('did you mean optparse?')
        beside = [os.path.relpath(os.path.join(base, f)) for f in (f"{missing}.py", os.path.join(missing, "__init__.py"))
                  if base is not None and os.path.exists(os.path.join(base, f))]
        if missing and missing == module_name.split(".")[0] and local:
            hint = (f" ({local[0]} is in the working folder, which Python does not search for it: add the folder "
                    "to PYTHONPATH, e.g. PYTHONPATH=. closedloop ...)")
        elif missing and missing == module_name.split(".")[0] and beside:
            folder = os.path.dirname(beside[0] if beside[0].endswith(".py") else os.path.dirname(beside[0])) or "."
            hint = (f" ({beside[0]} is beside the campaign file, in a folder Python does not search: add it to "
                    f"PYTHONPATH, e.g. PYTHONPATH={folder} closedloop ...)")
        elif missing and module_name.startswith(missing):
            try:
                import pkgutil

                if parent:
                    siblings = [m.name for m in pkgutil.iter_modules(importlib.import_module(parent).__path__)]
                else:
                    siblings = [m.name for m in pkgutil.iter_modules()]
                close = difflib.get_close_matches(leaf, siblings, n=1)
                if close:
                    hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))!r}?)"
            except Exception:  # a hint is a courtesy; never let it hide the real error
                pass
        return f"cannot import {module_name!r}: ModuleNotFoundError: {exc}{hint}"
    except Exception as exc:  # the module itself is broken: report its own error
        if (interrupt := _interrupt_within(exc)) is not None:
            # a Ctrl-C while a class was being built comes wrapped ("RuntimeError: Error calling __set_name__"), and
            # was reported as a fault of the campaign's instrument (exit 2)
            raise interrupt from None
        return f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
    return ""


def _interrupt_within(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind ``exc`` (its cause, or what it arose while handling), if one is."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


#: Builds a driver's binding and connects its devices (``closedloop validate --connect``, see
#: ``closedloop.connect``). It returns None for an instrument it could not reach, and says so itself: an IOC
#: that is down is not a fault of the campaign file. An error of the factory itself it raises.
Connector = Callable[[Instrument], Any]


def instrument_problems(campaign: Campaign, base: str | Path | None = None,
                        connect: Connector | None = None) -> list[tuple[str, str]]:
    """(field path, message) for each way the campaign's instrument (or a source's) cannot serve it.

    Imports the factory and checks its options against its signature. A simulator is also built (it
    touches no hardware) so that its axes, limits and outputs can be compared with the campaign; a
    driver is only imported, never called, unless ``connect`` is given: then it builds the driver's
    binding, connected, for the same comparison with its devices as they are (an EPICS motor's limits).
    """
    problems: list[tuple[str, str]] = []
    for source, instrument in campaign.instruments.items():
        at = "instrument" if source is None else f"sources.{source}.instrument"
        problems.extend(_instrument_problems(campaign, instrument, at, base, connect))
    return problems


def _search_working_folder(instrument: Instrument) -> None:
    """A compute station imports a function from the working folder too, so the check does."""
    if instrument.function is not None and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def _function_problems(campaign: Campaign, instrument: Instrument, function: Any, where: str) -> list[tuple[str, str]]:
    """Whether ``function`` takes what each experiment passes it: every parameter and option, by name.

    A function without them passed validation and then failed every experiment of its budget ("raised TypeError:
    got an unexpected keyword argument"), as if its body had gone wrong."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    from closedloop.compute import RESERVED_OPTIONS

    passed = {n for n in campaign.parameters if not (campaign.sources and n == SOURCE)}
    passed |= set(instrument.options) - RESERVED_OPTIONS
    kinds = {name: p.kind for name, p in signature.parameters.items()}
    named = {n for n, kind in kinds.items() if kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)}
    problems = []
    if inspect.Parameter.VAR_KEYWORD not in kinds.values() and (unknown := sorted(passed - named)):
        problems.append(f"takes no argument {', '.join(map(repr, unknown))}, which every experiment passes it (it "
                        f"takes {', '.join(sorted(named)) or 'none by name'}; give it the parameters, or **parameters)")
    required = sorted(n for n, p in signature.parameters.items()
                      if p.default is p.empty and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_ONLY)
                      and n not in passed)
    if required:
        problems.append(f"needs {', '.join(map(repr, required))}, neither a parameter nor an option of the campaign")
    return [(where, f"{instrument.target!r} {' and '.join(problems)}")] if problems else []


def _instrument_problems(campaign: Campaign, instrument: Instrument, at: str,
                         base: str | Path | None = None, connect: Connector | None = None) -> list[tuple[str, str]]:
    where = f"{at}.{instrument.field}"
    if instrument.command is not None:  # issue 8: every placeholder must be a parameter or an option
        known = set(campaign.parameters) | set(instrument.options)
        unknown = sorted(set(command_placeholders(instrument.command)) - known)
        return [(where, f"unknown placeholder {{{n}}}; known: {', '.join(sorted(known))}") for n in unknown]
    module_name, _, attribute = (instrument.import_path or "").partition(":")
    _search_working_folder(instrument)
    failure = _import_problems(module_name, base)
    if failure:
        return [(where, failure)]
    module = importlib.import_module(module_name)
    factory = getattr(module, attribute, None)
    if factory is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attribute, public, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [(where, f"module {module_name!r} has no {attribute!r}{hint}")]
    if not callable(factory):
        return [(where, f"{instrument.target!r} is not callable")]
    if instrument.function is not None:  # called per experiment with the parameters: nothing to build, its arguments
        return _function_problems(campaign, instrument, factory, where)  # to check
    problems: list[tuple[str, str]] = []
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        accepted = {n for n, p in signature.parameters.items()
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            for key in instrument.options:
                if key not in accepted:
                    close = difflib.get_close_matches(key, sorted(accepted), n=1)
                    problems.append((f"{at}.options.{key}", f"{instrument.target} takes no option {key!r}"
                                     + (f" (did you mean {close[0]!r}?)" if close else "")
                                     + f"; it takes: {', '.join(sorted(accepted)) or 'none'}"))
        for n, p in signature.parameters.items():
            if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in instrument.options:
                problems.append((f"{at}.options", f"{instrument.target} needs the option {n!r}"))
    if problems or (instrument.driver is not None and connect is None):
        return problems
    if instrument.driver is not None:
        try:
            binding = connect(instrument)  # type: ignore[misc]
        except Exception as exc:  # the factory's own error ("serial port not found"), as a station would fail on it
            return [(where, str(exc))]
        if binding is None:
            return problems
    else:
        try:
            binding = factory(**instrument.options)
        except Exception as exc:  # a simulator that cannot be built cannot run the campaign
            return [(where, f"{instrument.target}(...) failed: {type(exc).__name__}: {exc}")]
    outputs = getattr(binding, "outputs", None)
    if not isinstance(outputs, Mapping) or not isinstance(getattr(binding, "positioners", None), Mapping):
        # what a station refuses at every experiment (an InstrumentBinding, by its attributes: the engine does not
        # import the drivers' package), refused here once
        return [(where, f"{instrument.target}(...) returned {type(binding).__name__}, not an InstrumentBinding")]
    if isinstance(outputs, Mapping):
        known = set(outputs)
        for name in campaign.objectives:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                problems.append((f"objectives.{name}", f"{instrument.target} measures no output {name!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; it measures: {', '.join(sorted(known))}"))
        for i, bound in enumerate(campaign.output_bounds):
            if bound.output not in known:
                close = difflib.get_close_matches(bound.output, sorted(known), n=1)
                problems.append((f"outcome_constraints[{i}]", f"{instrument.target} measures no output {bound.output!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; it measures: {', '.join(sorted(known))}"))
        rule = campaign.stop_rule
        if rule is not None and rule.output not in known:
            problems.append(("budget.stop_when", f"{instrument.target} measures no output {rule.output!r}; "
                             f"it measures: {', '.join(sorted(known))}"))
        problems.extend((where, message) for message in _data_key_problems(instrument.target, binding))
    devices = getattr(binding, "settable", None)  # positioners and set-and-forget signals
    if not isinstance(devices, Mapping):
        devices = getattr(binding, "positioners", None)
    if isinstance(devices, Mapping):
        axes = set(devices)
        custom_plan = getattr(binding, "plan", None) is not None
        for name, p in campaign.parameters.items():
            device = devices.get(name)
            if device is None:
                # fixed values are sent too, and the binding refuses a setpoint no device takes
                if not custom_plan:
                    close = difflib.get_close_matches(name, sorted(axes), n=1)
                    problems.append((f"parameters.{name}", f"{instrument.target} has no axis or setting {name!r}"
                                     + (f" (did you mean {close[0]!r}?)" if close else "")
                                     + f"; it has: {', '.join(sorted(axes)) or 'none'}"))
                continue
            limits = getattr(binding, "limits", None)
            # an AllowedValues rule (by its fields: the engine does not import the drivers' package) says what the
            # hardware offers; unchecked here, a campaign naming a solvent not loaded validated, and the station
            # refused every experiment that chose it
            allowed = [tuple(rule.values) for rule in getattr(binding, "safety", None) or []
                       if getattr(rule, "parameter", None) == name and isinstance(getattr(rule, "values", None),
                                                                                  (tuple, list))]
            problems.extend(_limit_problems(name, p, device, limits.get(name) if isinstance(limits, Mapping) else None,
                                            allowed))
    return problems


def _data_key_problems(target: str, binding: Any) -> list[str]:
    """Each output whose data key (or a :class:`Derived` output's key) none of the simulator's devices reads.

    Such a binding validated and then failed every experiment ("data key 'uv_450' not in the run's readings").
    A device that cannot describe itself here (ophyd-async's coroutine) leaves the check to the run.
    """
    outputs, readables = getattr(binding, "outputs", None), getattr(binding, "readables", None)
    if not isinstance(outputs, Mapping) or not callable(readables):
        return []
    keys: set[str] = set()
    try:
        for device in readables():
            keys.update(_answer(device.describe()))
    except Exception:  # a courtesy check (and an ophyd-async device with no loop to ask on): the run reports it
        return []
    problems = []
    for output, source in outputs.items():
        for key in getattr(source, "keys", None) or ([source] if isinstance(source, str) else []):
            if key not in keys:
                close = difflib.get_close_matches(key, sorted(keys), n=1)
                problems.append(f"{target}: output {output!r} reads data key {key!r}, which none of its devices "
                                "reads" + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; they read: {', '.join(sorted(keys))}")
    return problems


class _CannotWait(Exception):
    """An ophyd-async device's answer is a coroutine, and no RunEngine's event loop runs here to wait for it."""


# seconds `validate --connect` waits for an ophyd-async device's answer (its check_value, its describe)
DEVICE_ANSWER_S = 10.0


def _answer(result: Any) -> Any:
    """A device's answer; an ophyd-async device's coroutine is waited for on the RunEngine's event loop.

    ``validate --connect`` makes a RunEngine before building the driver, as a station does: without waiting, an
    ophyd-async motor's ``check_value`` refused nothing (a range past its soft limits passed) and its detector's
    data keys went unchecked.
    """
    if not inspect.isawaitable(result):
        return result
    from bluesky.run_engine import call_in_bluesky_event_loop

    try:
        return call_in_bluesky_event_loop(result, timeout=DEVICE_ANSWER_S)  # type: ignore[arg-type]
    except TimeoutError:  # its own text is empty: the problem read 'is refused by the instrument: '
        raise TimeoutError(f"the device did not answer within {DEVICE_ANSWER_S:g} s") from None
    except RuntimeError as exc:
        if "event loop not running" in str(exc):  # bluesky closed the coroutine
            raise _CannotWait() from None
        raise


def _limit_problems(name: str, p: Any, device: Any, limit: tuple[float, float] | None = None,
                    allowed: Sequence[tuple[Any, ...]] = ()) -> list[tuple[str, str]]:
    """What the instrument would refuse of a parameter's range: the binding's own ``limits``, the values its
    ``AllowedValues`` rules hold (``allowed``), then the device's."""
    if isinstance(p, (ContinuousParameter, IntegerParameter)):
        field, values = "bounds", list(p.bounds)
    elif isinstance(p, (DiscreteParameter, CategoricalParameter)):
        field, values = "values", list(p.values)
    else:
        field, values = "value", [p.value]
    if limit is not None:  # enforced by the engine for devices with no limits of their own (a SynAxis, a Signal)
        low, high = limit
        for v in values:
            if not (isinstance(v, (int, float)) and low <= v <= high):
                shown = f"{v:g}" if isinstance(v, (int, float)) else repr(v)
                return [(f"parameters.{name}.{field}",
                         f"{shown} is refused by the instrument: outside its limits [{low:g}, {high:g}]")]
    for permitted in allowed:
        for v in values:
            if v not in permitted:
                shown = f"{v:g}" if isinstance(v, (int, float)) else repr(v)
                return [(f"parameters.{name}.{field}",
                         f"{shown} is refused by the instrument: not one of {list(permitted)}")]
    check = getattr(device, "check_value", None)
    if check is None:
        return []
    for v in values:
        try:
            _answer(check(v))
        except _CannotWait:  # an ophyd-async device with no RunEngine's loop to ask on: the station's pre-flight will
            return []
        except Exception as exc:  # each device family raises its own limit error
            shown = f"{v:g}" if isinstance(v, (int, float)) else repr(v)
            return [(f"parameters.{name}.{field}", f"{shown} is refused by the instrument: {exc}")]
    return []


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
    """Every problem found in one campaign file (``.problems``)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``; people write ``1e-3``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:
        # Python reads at most sys.get_int_max_str_digits() digits: a longer number stopped the command with
        # 'ValueError: Exceeds the limit (4300 digits)', exit 1 and no line
        digits = sum(c.isdigit() for c in node.value)
        raise yaml.constructor.ConstructorError(
            None, None, f"a whole number of {digits:,} digits is longer than any value of a campaign can be",
            node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting text that :class:`_Loader` would read as a number (a name ``0e0``)."""


_Dumper.yaml_implicit_resolvers = dict(_Loader.yaml_implicit_resolvers)


# a campaign is a few hundred values a few levels deep; these limits stop hostile files (nested aliases that
# expand a few kilobytes into billions of values, thousands of nested brackets) before anything walks them
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


# a line a quoted text swallowed that reads as a key of the file ('parameters:', '  - x1:'): the quote ran on past it
_SWALLOWED_KEY = re.compile(r"\n[ \t]*(?:-[ \t]+)?[^\s#'\"-][^\n]*?:(?:[ \t]|$)", re.M)


def _opening(text: str, mark: yaml.Mark) -> str:
    """The text from ``mark`` to the end of its line, shortened: which quote a message means."""
    rest = text[mark.index:].split("\n", 1)[0].rstrip()
    return rest if len(rest) <= 30 else rest[:29] + "…"


def _unclosed(text: str, exc: yaml.MarkedYAMLError) -> tuple[yaml.Mark, str] | None:
    """Where a quote or bracket that YAML's error comes from was opened, and what to say, when YAML noticed only
    later (None otherwise): an unclosed quote was reported at the file's end, and a quote closed by the next text's
    opening quote where that text then stood bare; the scientist needs the line the quote or bracket is on."""
    problem, context = exc.problem_mark, exc.context_mark
    if problem is None:
        return None
    if context is not None and context.line < problem.line and context.index < len(text):
        opener = text[context.index]
        if exc.context == "while scanning a quoted scalar" and "end of stream" in str(exc.problem):
            return context, (f"the quoted text opened here ({_opening(text, context)}) is never closed: the file "
                             f"ends before its closing {opener}")
        if exc.context in ("while parsing a flow sequence", "while parsing a flow mapping") and opener in "[{":
            closer = "]" if opener == "[" else "}"
            found = (f"the file ends before its {closer!r}" if "<stream end>" in str(exc.problem)
                     else f"YAML reached line {problem.line + 1}, column {problem.column + 1} without its {closer!r} "
                     f"({exc.problem})")
            return context, f"the {opener!r} opened here is never closed: {found}"
    # a quote closed by the next text's opening quote parses, as text running over several lines, until the text
    # after it stands bare: the error came at that text, lines below the quote actually left open
    last = None
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if token.start_mark.index >= problem.index:
                break
            last = token
    except yaml.YAMLError:
        pass
    if (isinstance(last, yaml.ScalarToken) and last.style in ("'", '"')
            and last.start_mark.line < last.end_mark.line
            and _SWALLOWED_KEY.search(text, last.start_mark.index, last.end_mark.index)):
        start = last.start_mark
        return start, (f"the quoted text opened here ({_opening(text, start)}) runs on to line {last.end_mark.line + 1}"
                       f"; YAML then fails at line {problem.line + 1}, column {problem.column + 1} ({exc.problem}): "
                       f"is this text's closing {last.style} missing?")
    return None


def _oversized(root: yaml.Node | None) -> tuple[str, yaml.Mark] | None:
    """Why the composed file is too large to read (None if it is not): too deep, or too many values counted
    with every alias (``*name``) expanded, as reading it would; each node is counted once, so a shared one
    costs nothing to count."""
    if root is None:
        return None
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, children_done, level = stack.pop()
        if level > MAX_YAML_DEPTH:
            return f"the file nests deeper than {MAX_YAML_DEPTH} levels of lists and mappings", node.start_mark
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if id(node) in size:
            continue
        if not children_done:
            stack.append((node, True, level))
            stack.extend((child, False, level + 1) for child in children if id(child) not in size)
            continue
        size[id(node)] = 1 + sum(size[id(child)] for child in children)
        if size[id(node)] > MAX_YAML_VALUES:
            return (f"the file holds more than {MAX_YAML_VALUES:,} values once its aliases (*name) are expanded; "
                    "a campaign needs far fewer", node.start_mark)
    return None


def _walk_marks(node: yaml.Node, path: tuple, marks: dict[tuple, yaml.Mark],
                duplicates: list[tuple[tuple, yaml.Mark, yaml.Mark]]) -> None:
    marks.setdefault(path, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            key = _key_value(key_node)
            if key in seen:
                duplicates.append((path + (key,), key_node.start_mark, seen[key]))
            else:
                seen[key] = key_node.start_mark
            marks[path + (key,)] = key_node.start_mark
            marks[path + (key, "<value>")] = value_node.start_mark
            _walk_marks(value_node, path + (key,), marks, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[path + (i,)] = item.start_mark
            _walk_marks(item, path + (i,), marks, duplicates)


def _lone_surrogates(data: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Where the loaded file holds text with half of a UTF-16 pair (a ``"\\ud800"`` escape), and that text."""
    found: list[tuple[tuple, str]] = []
    if isinstance(data, str):
        if any("\ud800" <= c <= "\udfff" for c in data):
            found.append((path, data))
    elif isinstance(data, dict):
        for key, value in data.items():
            found += _lone_surrogates(key, path + (key,)) if isinstance(key, str) else []
            found += _lone_surrogates(value, path + (key,))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += _lone_surrogates(item, path + (i,))
    return found


def _key_value(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        try:
            return _Loader("").construct_object(node)  # the key as the loader reads it (1, true, 'a')
        except Exception:
            return node.value
    return node.start_mark.index  # an unhashable key: only its position identifies it


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
        elif part == "[key]":
            continue
        elif (isinstance(node, dict) and isinstance(part, str) and part not in _UNION_TAGS
              and part not in ("str", "int", "float") and not part.startswith("function-")):
            path.append(part)  # a missing or unknown key: name it, it has no position of its own
            node = None
    return tuple(path)


_SECTION_MODELS: dict[str, type[_Model]] = {
    "budget": Budget, "execution": Execution, "planner": PlannerSettings, "instrument": Instrument,
    "candidates": Candidates,
}


def _model_at(data: Any, path: tuple) -> type[_Model] | None:
    """The model that validates the mapping at ``path`` in the file's data."""
    if path == ():
        return Campaign
    if len(path) == 1 and path[0] in _SECTION_MODELS:
        return _SECTION_MODELS[path[0]]
    if len(path) == 2 and path[0] == "objectives":
        return Objective
    if len(path) == 2 and path[0] == "sources":
        return Source
    if len(path) == 3 and path[0] == "sources" and path[2] == "instrument":
        return Instrument
    if len(path) == 2 and path[0] == "parameters":
        node = data.get("parameters", {}).get(path[1]) if isinstance(data.get("parameters"), dict) else None
        if isinstance(node, dict):
            return _PARAMETER_TYPES.get(node.get("type"))  # type: ignore[arg-type]
    return None


def _unknown_key(data: Any, path: tuple) -> str:
    key = str(path[-1])
    model = _model_at(data, path[:-1])
    fields = sorted(model.model_fields) if model else []
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    message = f"unknown key {key!r}"
    if close:
        return message + f" (did you mean {close[0]!r}?)"
    if model in _PARAMETER_TYPES.values():
        owners = sorted(t for t, m in _PARAMETER_TYPES.items() if key in m.model_fields)
        if owners:
            this = model.model_fields["type"].default
            return message + f": {key!r} belongs to {' and '.join(owners)} parameters, this one is {this}"
    return message + (f"; allowed here: {', '.join(fields)}" if fields else "")


_TYPE_WORDS = {
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "string_type": "text", "bool_type": "true or false", "bool_parsing": "true or false",
    "dict_type": "a mapping (key: value)", "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "list_type": "a list", "tuple_type": "a list", "model_class": "a mapping (key: value)",
}


def _shown(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _closest_choice(given: str, choices: list[str]) -> list[str]:
    """The one choice meant by ``given``, as a list (empty when unsure)."""
    # 'max', 'min', 'Max': too short or capitalized for difflib's ratio against 'maximize', yet plain abbreviations
    said = given.strip().lower()
    starting = [c for c in choices if said and c.lower().startswith(said)]
    if len(starting) == 1:
        return starting
    lowered = {c.lower(): c for c in choices}
    return [lowered[c] for c in difflib.get_close_matches(said, list(lowered), n=1)]


def _describe(data: Any, path: tuple, error: dict) -> str:
    kind, msg, ctx = error["type"], error["msg"], error.get("ctx") or {}
    given = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(data, path)
    if kind == "missing":
        model = _model_at(data, path[:-1])
        field = model.model_fields.get(str(path[-1])) if model else None
        about = f" ({field.description})" if field is not None and field.description else ""
        return f"required field is missing{about}"
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag", given))
        close = difflib.get_close_matches(tag, sorted(_UNION_TAGS), n=1)
        return (f"unknown parameter type {tag!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; use one of {', '.join(sorted(_UNION_TAGS))}")
    if kind == "union_tag_not_found":
        hint = ""
        if isinstance(given, dict):
            if "bounds" in given:
                hint = " (with bounds: continuous or integer)"
            elif "values" in given:
                hint = " (with values: categorical or discrete)"
            elif "value" in given:
                hint = " (with value: fixed)"
        return f"'type' is missing; use one of {', '.join(sorted(_UNION_TAGS))}{hint}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = _closest_choice(given, expected) if isinstance(given, str) else []
        quoted = [repr(e) for e in expected]
        choices = " or ".join(quoted) if len(quoted) < 3 else "one of " + ", ".join(quoted)
        return (f"{_shown(given)} is not allowed; use {choices}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
    if kind in _TYPE_WORDS:
        word = _TYPE_WORDS[kind]
        if isinstance(given, bool) and kind != "bool_type":
            return f"expected {word}, got the boolean {given!r} (YAML reads yes/no/on/off as booleans)"
        return f"expected {word}, got {_shown(given)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        word = {"greater_than_equal": "at least", "greater_than": "above", "less_than_equal": "at most",
                "less_than": "below"}[kind]
        limit = next(iter(ctx.values()), "?")
        # an integer limit in full: the seed's 2**63 - 1 read 9.22337e+18
        limit = str(limit) if isinstance(limit, int) else f"{limit:g}" if isinstance(limit, float) else limit
        return f"must be {word} {limit}, got {_shown(given)}"
    if kind in ("too_short", "too_long") and "Tuple" in msg:
        count = len(given) if isinstance(given, (list, tuple)) else "?"
        return f"expected a list of two numbers [lower, upper], got {count} items"
    if kind == "too_short":
        return "is empty; it needs at least one entry" if not given else msg
    if kind == "string_pattern_mismatch":
        return f"{given!r} is not a usable name: start with a letter or digit, then letters, digits, '_', '.' or '-'"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _position(marks: dict[tuple, yaml.Mark], path: tuple) -> tuple[int | None, int | None]:
    while path not in marks and path:
        path = path[:-1]
    mark = marks.get(path)
    return (mark.line + 1, mark.column + 1) if mark else (None, None)


def _dotted(path: tuple | str) -> str:
    if isinstance(path, str):
        return path
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _parse_path(path: str) -> tuple:
    parts: list[Any] = []
    for piece in re.finditer(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(piece.group(2)) if piece.group(2) is not None else piece.group(1))
    return tuple(parts)


def _section_parts(data: dict[str, Any]) -> dict[str, Any]:
    """Each section of the file validated on its own (None where invalid), for the cross-field checks."""

    def valid(adapter: TypeAdapter, value: Any) -> Any:
        try:
            return adapter.validate_python(value)
        except (ValidationError, CampaignError):
            return None

    parameters = data.get("parameters")
    parts: dict[str, Any] = {
        "parameters": ({n: valid(_PARAMETER_ADAPTER, v) for n, v in parameters.items()}
                       if isinstance(parameters, dict) else None),
        "constraints": [c for c in data.get("constraints") or [] if isinstance(c, str)]
        if valid(_TEXTS, data.get("constraints", [])) is not None else None,
        "objectives": valid(_OBJECTIVES, data.get("objectives")),
        "outcome_constraints": valid(_TEXTS, data.get("outcome_constraints", [])),
        "budget": valid(TypeAdapter(Budget), data.get("budget")),
        "planner": valid(TypeAdapter(PlannerSettings), data.get("planner", {})),
        "candidates": valid(TypeAdapter(Candidates | None), data.get("candidates")),
        "instrument": data.get("instrument"),
        "sources": valid(_SOURCES, data.get("sources") or {}),
    }
    return parts


_PARAMETER_ADAPTER: TypeAdapter = TypeAdapter(Parameter)
_TEXTS: TypeAdapter = TypeAdapter(list[Text])
_OBJECTIVES: TypeAdapter = TypeAdapter(dict[Text, Objective])
_SOURCES: TypeAdapter = TypeAdapter(dict[Text, Source])


def load_campaign_text(
    text: str, source: str = "<campaign>", *, base: str | Path | None = None, check_instrument: bool = True,
    connect: Connector | None = None,
) -> Campaign:
    """Validate YAML text as a campaign, raising :class:`CampaignFileError` with every problem.

    Args:
        text: the YAML.
        source: the file name that problems are reported against.
        base: the folder a relative candidate table is read from (default: the current one).
        check_instrument: import the instrument and compare it with the campaign (see
            :func:`instrument_problems`), and check what the planner backend cannot handle (see
            :func:`backend_problems`); turn off on a host that cannot import the lab's drivers.
        connect: with ``check_instrument``, also build each driver's binding with it and compare the
            campaign with the connected devices (see :func:`instrument_problems`).
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
        oversized = _oversized(root)
        if oversized:
            message, mark = oversized
            raise CampaignFileError([Problem(source, mark.line + 1, mark.column + 1, "", message)])
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise CampaignFileError([Problem(source, None, None, "", f"the file nests deeper than {MAX_YAML_DEPTH} levels "
                                         "of lists and mappings")]) from None
    except yaml.reader.ReaderError as exc:
        # a character YAML refuses anywhere (a NUL, a BEL pasted from a terminal) is reported with a position in
        # the text, not a line: the message was two lines, the second '  in "<unicode string>", position 264'
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        raise CampaignFileError([Problem(source, line, column, "", f"YAML syntax: the character U+{exc.character:04X} "
                                         f"({'a control character' if unicodedata.category(chr(exc.character)) == 'Cc' else 'not a character'})"
                                         " is not "
                                         "allowed in a YAML file; remove it")]) from None
    except yaml.YAMLError as exc:
        opened = _unclosed(text, exc) if isinstance(exc, yaml.MarkedYAMLError) else None
        if opened:
            mark, message = opened
            raise CampaignFileError([Problem(source, mark.line + 1, mark.column + 1, "", f"YAML syntax: {message}")]
                                    ) from None
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        if "\t" in text and ("\\t" in str(problem) or "tab" in str(problem)):
            problem += " (indent with spaces, not tabs)"
        message = f"YAML syntax: {problem}" + (f" ({context})" if context else "")
        raise CampaignFileError(
            [Problem(source, mark.line + 1 if mark else None, mark.column + 1 if mark else None, "", message)]
        ) from None
    if data is None:
        raise CampaignFileError([Problem(source, None, None, "", "the file is empty; a campaign needs name, "
                                         "parameters, objectives, budget and instrument")])
    if not isinstance(data, dict):
        raise CampaignFileError(
            [Problem(source, 1, 1, "", "a campaign file must be a mapping of fields (name, parameters, ...)")]
        )
    marks: dict[tuple, yaml.Mark] = {}
    duplicates: list[tuple[tuple, yaml.Mark, yaml.Mark]] = []
    if root is not None:
        _walk_marks(root, (), marks, duplicates)
    problems = [
        Problem(source, m.line + 1, m.column + 1, _dotted(p),
                f"key {p[-1]!r} appears twice (also on line {first.line + 1}); YAML would silently keep the last one")
        for p, m, first in duplicates
    ]

    def add(path: tuple, message: str, at_value: bool = False) -> None:
        line, column = _position(marks, path + ("<value>",) if at_value and path + ("<value>",) in marks else path)
        problems.append(Problem(source, line, column, _dotted(path), message))

    # such text loads, runs and is stored, but no UTF-8 file can hold it: the report failed writing its page
    # (a store begun with it still opens, as with the other rules on text)
    for path, text in [] if _STORED.get() else _lone_surrogates(data):
        add(path, f"{text!r} holds a lone surrogate (a \\ud800 to \\udfff escape without its pair), which is no "
            "character; write the character itself", at_value=True)
    campaign: Campaign | None = None
    try:
        campaign = Campaign.model_validate(data)
    except ValidationError as exc:
        by_path: dict[tuple, list[dict]] = {}
        for error in exc.errors():
            by_path.setdefault(_data_path(data, tuple(error["loc"])), []).append(error)
        seen: set[tuple] = set(by_path)
        for path, group in by_path.items():
            kinds = {e["type"] for e in group}
            if len(group) > 1 and kinds <= {"string_type", "int_type", "float_type", "finite_number"}:
                if "string_type" in kinds:
                    # the branches of a text-or-number union (a categorical or fixed value): one message
                    add(path, f"expected text or a finite number, got {_shown(group[0].get('input'))}")
                else:
                    # a whole-or-real union (a discrete value), whose number branch says it as before
                    add(path, _describe(data, path, next(e for e in group if e["type"] != "int_type")))
            else:
                add(path, _describe(data, path, group[0]))
        parts = _section_parts(data)
        for path, message in consistency_problems(**parts):
            key = _parse_path(path)
            if key not in seen:
                add(key, message)
    except CampaignFileError as exc:
        for p in exc.problems:
            add(_parse_path(p.path), p.message)
    if campaign is not None:
        if campaign.candidates is not None:
            folder = Path(base) if base is not None else Path.cwd()
            file = Path(campaign.candidates.file)
            if not file.is_absolute():
                file = (folder / file).resolve()
                # hold the path the table was found at, so the campaign runs from any folder
                candidates = campaign.candidates.model_copy(update={"file": str(file)})
                campaign = campaign.model_copy(update={"candidates": candidates})
            _, table_problems = _read_candidates(campaign, folder)
            for path, message in table_problems:
                add(_parse_path(path), message)
        if check_instrument:
            for path, message in instrument_problems(campaign, base, connect):
                add(_parse_path(path), message)
            # whether it can be run here, as the instrument: a stored campaign is read back without either
            for path, message in backend_problems(campaign):
                add(tuple(int(k) if k.isdigit() else k for k in _parse_path(path)), message)
    elif check_instrument:
        # the rest of the file is wrong, but an instrument that does not import is worth saying now
        sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
        given = [(("instrument",), data.get("instrument"))] + [
            (("sources", name, "instrument"), s.get("instrument")) for name, s in sources.items() if isinstance(s, dict)]
        for at, raw in given:
            try:
                instrument = Instrument.model_validate(raw)
            except ValidationError:
                continue
            if instrument.import_path is not None:
                # as when the rest is right: a function beside the file had been said not to import
                _search_working_folder(instrument)
                failure = _import_problems(instrument.import_path.partition(":")[0], base)
                if failure:
                    add(at + (instrument.field,), failure)
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise CampaignFileError(problems)
    assert campaign is not None
    return campaign


def load_campaign(path: str | Path, *, check_instrument: bool = True, connect: Connector | None = None) -> Campaign:
    """Read a campaign file; :class:`CampaignFileError` lists every problem with its line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CampaignFileError([Problem(str(path), None, None, "", f"cannot read the file: {exc.strerror}")]) from None
    try:
        # UTF-8 whatever the locale (YAML's own encoding), with the line of the first byte that is not: a file
        # saved as Latin-1 or Windows-1252 ('µm') was refused as 'not a text file: invalid start byte'
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        guess = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "Latin-1 or Windows-1252"
        raise CampaignFileError([Problem(str(path), line, column, "", f"not UTF-8 text (the byte 0x{data[exc.start]:02x}"
                                         f", perhaps {guess}); save the file as UTF-8")]) from None
    return load_campaign_text(text, str(path), base=path.resolve().parent, check_instrument=check_instrument,
                              connect=connect)
