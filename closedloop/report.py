"""The campaign report: one self-contained HTML file a scientist can mail, with its figures beside it.

Figures (matplotlib, PNG): best so far against experiment number and wall time with the initial
design marked; for several objectives the Pareto front and the hypervolume over experiments; each
parameter against each objective; the model's mean and uncertainty along slices through the best
point; leave-one-out predicted against observed. Then the table of experiments (failures and their
errors included), the campaign file as run and the software versions.

The model here is a BoTorch ``SingleTaskGP`` fitted afresh to the stored experiments, so the report
needs only the store, whichever planner ran. It encodes categorical parameters one-hot (see
:class:`Encoding`) and fits one model per objective, in seconds.

Example:
    >>> figures = make_figures(store, "branin", Path("reports/branin"))   # doctest: +SKIP
    >>> write_report(store, "branin", Path("reports/branin/report.html"))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import logging
import math
import platform
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    IntegerParameter,
)
from closedloop.view import non_dominated, trial_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

    from closedloop.planner.base import Result
    from closedloop.store import Store

log = logging.getLogger("closedloop.report")

INITIAL_GENERATORS = ("sobol", "random")  # proposals made before the model takes over
# the experiments table's rows: every trial of a 50,000-trial campaign made a 20 MB page a browser chokes on
TABLE_ROWS = 2000
SOFTWARE = ("closedloop", "torch", "botorch", "gpytorch", "numpy", "scipy", "pandas", "matplotlib", "sqlmodel",
            "pydantic", "bluesky", "ophyd", "pyzmq", "typer", "rich")


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file, title and what it shows."""

    name: str
    title: str
    caption: str
    path: Path


@dataclass
class Data:
    """A campaign's experiments as arrays, in trial order."""

    campaign: Campaign
    records: list[dict[str, Any]]
    spec_yaml: str
    started: datetime | None

    @property
    def completed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "completed"]

    def feasible(self, record: dict[str, Any]) -> bool:
        bounds = self.campaign.output_bounds
        return all(b.satisfied(record[b.output]) for b in bounds if record.get(b.output) is not None)

    def oriented(self, name: str, value: float) -> float:
        """Larger is better."""
        return value if self.campaign.objectives[name].goal == "maximize" else -value

    def initial(self, record: dict[str, Any]) -> bool:
        return (record.get("generator") or "") in INITIAL_GENERATORS


def best(store: Store, campaign: str) -> Result | None:
    """The experiment the campaign reports as best, or None.

    The campaign's planner's ``best()`` where the planner can be built here: under noise that is the
    experiment with the best model estimate, not the luckiest reading (docs/planner.md). Otherwise the
    best feasible reading of the first objective.
    """
    spec, results = _results(store, campaign)
    reported = _planners_best(campaign, spec, results)
    if reported is not None:
        return reported
    data = load(store, campaign)  # the planner cannot be built here: the best reading
    record = _best_record(data, next(iter(data.campaign.objectives)))
    return _result(data, record) if record else None


def _results(store: Store, campaign: str) -> tuple[Campaign, list[Result]]:
    """The campaign as stored and its results, read once: best() loaded every trial as a table record and then
    again as results for the planner (35 s at 50,000 trials), where the planner needs only the results."""
    row = store.campaign_row(campaign)
    return store.campaign(row.id), store.results(row.id)  # type: ignore[arg-type]


def _planners_best(campaign: str, spec: Campaign, results: list[Result]) -> Result | None:
    """The planner's ``best()``; None where it has no answer or cannot give one here (the caller falls back)."""
    planner = _planner(spec, results)
    if planner is None:
        return None
    try:
        return planner.best()
    except Exception as exc:  # noqa: BLE001 - a report must still come out; the best reading stands in
        log.warning("campaign=%s the planner could not name its best (%s); showing the best reading", campaign, exc)
        return None


def _planner(spec: Campaign, results: list[Result]) -> Any:
    """The campaign's planner, given every result in the store; None where it cannot be built here
    (another backend's extras missing) or there is nothing to give it."""
    if not any(result.values is not None for result in results):  # no experiment completed
        return None
    try:
        from closedloop.planner import make_planner

        planner = make_planner(spec)
    except Exception:  # noqa: BLE001 - the caller falls back to the data
        return None
    planner.ingest(results)
    return planner


def pareto_front(store: Store, campaign: str) -> list[Result]:
    """The feasible completed experiments no other one dominates, over every objective.

    Uses the campaign's planner's ``pareto_front()`` when it has one, so the answer is the planner's.
    """
    planner = _planner(*_results(store, campaign))
    if planner is not None:
        return list(planner.pareto_front())
    data = load(store, campaign)
    done = [r for r in data.completed if data.feasible(r)]
    if not done:
        return []
    names = list(data.campaign.objectives)
    mask = non_dominated(np.array([[data.oriented(n, r[n]) for n in names] for r in done]))
    return [_result(data, r) for r, keep in zip(done, mask) if keep]


def hypervolume(store: Store, campaign: str) -> float:
    """The hypervolume the feasible completed experiments dominate above the reference point (the objectives'
    thresholds, inferred from the results where missing), as the campaign's planner reports it: the figure its
    ``hypervolume()`` gives and the report's last. Raises :class:`PlannerError` for a campaign of one objective."""
    from closedloop.planner.observations import ObservationLog

    spec, results = _results(store, campaign)
    planner = _planner(spec, results)
    if planner is not None:
        return float(planner.hypervolume())
    # nothing measured yet, or a backend whose extras are missing here: the rule every backend shares
    log = ObservationLog(spec)
    log.add(results)
    return log.hypervolume()


def _result(data: Data, record: dict[str, Any]) -> Result:
    from closedloop.planner.base import Result

    return Result({n: record[n] for n in data.campaign.parameters}, {n: record[n] for n in data.campaign.outputs},
                  record["trial"])


def load(store: Store, campaign: str) -> Data:
    row = store.campaign_row(campaign)
    started = row.created_at if row.created_at is None or row.created_at.tzinfo else row.created_at.replace(
        tzinfo=timezone.utc)
    return Data(store.campaign(row.id), trial_records(store, row.id), row.spec_yaml, started)  # type: ignore[arg-type]


def _ran_with(store: Store, campaign_id: int) -> dict[str, list[str]]:
    """Package -> every version recorded with the campaign's decisions (a campaign resumed after an upgrade has
    two): a report written later, with other packages installed, would otherwise attribute the results to those.
    Read for the report alone: best() and pareto_front() load the same Data and need none of it."""
    from closedloop.provenance import rows

    found: dict[str, set[str]] = {}
    for row in rows(store, campaign_id).values():
        for package, version in (row.versions or {}).items():
            if package != "torch_threads":  # a setting, not software; `closedloop explain` shows it
                found.setdefault(package, set()).add(version)
    return {package: sorted(versions) for package, versions in found.items()}


# -- figures ----------------------------------------------------------------------------------------


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
              squeeze: bool = True) -> tuple[MplFigure, Any]:
    """A figure of its own, drawn to a file and never to a window. Outside pyplot: its backend and open figures
    are the caller's (``matplotlib.use("Agg")`` here blanked a notebook's inline plots for the rest of its
    session), and pyplot is not safe off the main thread."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _save(fig: MplFigure, outdir: Path, name: str) -> Path:
    path = outdir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    return path


def _log_x(ax: Any) -> None:
    """A log x axis labelled at powers of ten only (minor labels overlap in narrow panels)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plain(text: str) -> str:
    """``text`` drawn as written: matplotlib reads what stands between two '$' as mathtext (a unit '$/kg, $ per lot'
    lost its dollars to math italics, and '$_$' stopped the report)."""
    return text.replace("$", r"\$")


def _label(data: Data, name: str) -> str:
    """A parameter's or objective's name with its unit, for an axis (``temperature [degC]``)."""
    item = data.campaign.parameters.get(name) or data.campaign.objectives.get(name)
    unit = getattr(item, "unit", None)
    return _plain(name + (f" [{unit}]" if unit else ""))


# An experiment that breaks an outcome constraint is not a candidate for the best: drawn like the others it
# sat below a best-so-far line that passed it by, and the time panel left it out.
INFEASIBLE = "breaks an outcome constraint (not counted)"


def _scatter_infeasible(ax: Any, xs: list[float], ys: list[float]) -> None:
    if xs:
        ax.scatter(xs, ys, s=18, facecolors="none", edgecolors="tab:gray", label=INFEASIBLE)


def _best_so_far(values: list[float | None], goal: str) -> list[float]:
    out: list[float] = []
    best = math.nan
    for v in values:
        if v is not None and (math.isnan(best) or (v < best if goal == "minimize" else v > best)):
            best = v
        out.append(best)
    return out


def figure_progress(data: Data, outdir: Path) -> Figure | None:
    """Best so far against experiment number and against wall time, the initial design marked."""
    objectives = list(data.campaign.objectives.items())
    records = data.records
    if not data.completed:
        return None
    fig, axes = _subplots(len(objectives), 2, figsize=(11, 3.4 * len(objectives)), squeeze=False)
    numbers = [r["trial"] for r in records]
    finished = [r for r in records if r["finished_at"]]
    finished.sort(key=lambda r: r["finished_at"])
    t0 = data.started or (datetime.fromisoformat(finished[0]["finished_at"]) if finished else None)
    initial = [r["trial"] for r in records if data.initial(r)]
    for row, (name, objective) in enumerate(objectives):
        ax = axes[row][0]
        values = [r[name] if r["status"] == "completed" and data.feasible(r) else None for r in records]
        if initial:
            ax.axvspan(min(initial) - 0.5, max(initial) + 0.5, color="tab:blue", alpha=0.08, label="initial design")
        feasible = [r for r in data.completed if data.feasible(r)]
        for kind, marker, color in (("initial", "o", "tab:blue"), ("model", "o", "tab:orange")):
            xs = [r["trial"] for r in feasible if data.initial(r) == (kind == "initial")]
            ys = [r[name] for r in feasible if data.initial(r) == (kind == "initial")]
            if xs:
                ax.scatter(xs, ys, s=18, marker=marker, color=color, alpha=0.6,
                           label="initial design" if kind == "initial" else "proposed by the model / by hand")
        infeasible = [r for r in data.completed if not data.feasible(r)]
        _scatter_infeasible(ax, [r["trial"] for r in infeasible], [r[name] for r in infeasible])
        failed = [r["trial"] for r in records if r["status"] in ("failed", "abandoned")]
        if failed:
            ax.scatter(failed, [np.nanmin([v for v in values if v is not None] or [0])] * len(failed), marker="x",
                       color="tab:red", label="failed (at the bottom)")
        ax.step(numbers, _best_so_far(values, objective.goal), where="post", color="black", label="best so far")
        ax.set_xlabel("experiment number")
        ax.set_ylabel(_label(data, name))
        ax.set_title(f"{name}: best so far ({objective.goal})")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
        ax = axes[row][1]
        if t0 is not None and finished:
            seconds = [(datetime.fromisoformat(r["finished_at"]) - t0).total_seconds() for r in finished]
            unit, scale = ("s", 1.0) if seconds[-1] < 120 else ("min", 60.0) if seconds[-1] < 7200 else ("h", 3600.0)
            minutes = [t / scale for t in seconds]
            tvalues = [r[name] if r["status"] == "completed" and data.feasible(r) else None for r in finished]
            for early, color, label in ((True, "tab:blue", "initial design"), (False, "tab:orange", "later")):
                xs = [m for m, r in zip(minutes, finished) if data.initial(r) == early]
                ys = [np.nan if v is None else v for v, r in zip(tvalues, finished) if data.initial(r) == early]
                if xs:
                    ax.scatter(xs, ys, s=14, color=color, alpha=0.6, label=label)
            broken = [(m, r[name]) for m, r in zip(minutes, finished) if r["status"] == "completed"
                      and not data.feasible(r)]
            _scatter_infeasible(ax, [m for m, _ in broken], [v for _, v in broken])
            ax.step(minutes, _best_so_far(tvalues, objective.goal), where="post", color="black", label="best so far")
            ax.legend(fontsize=8)
            ax.set_xlabel(f"wall time since the campaign started [{unit}]")
        ax.set_title(f"{name}: best so far against time")
    fig.tight_layout()
    return Figure("progress", "Best so far",
                  "Best feasible value after each experiment, against the experiment number (shaded: the "
                  "initial space-filling design) and against wall time."
                  + (" Hollow grey: experiments that break an outcome constraint, not counted for the best."
                     if data.campaign.output_bounds else ""), _save(fig, outdir, "progress"))


def hypervolume_history(data: Data) -> tuple[list[int], list[float], np.ndarray]:
    """Hypervolume of the feasible experiments after each one, all above the final reference point; also that point
    (oriented). The planners' rule (:class:`ObservationLog`), so the last is :func:`hypervolume`'s: the report's own
    reference point (worst reading less a tenth of the range) differed from BoTorch's where a range was 0."""
    from closedloop.planner.observations import ObservationLog

    log = ObservationLog(data.campaign)
    log.add([_result(data, r) for r in data.completed])
    ref = log.reference_point()
    front: list[Result] = []  # dominates what every experiment so far does (all of them each time: 14 s for 300)
    numbers, volumes = [], []
    for result in log.results:
        if log.feasible(result):
            step = ObservationLog(data.campaign)
            step.add([*front, result])
            front = step.pareto_front()
            assert result.trial is not None  # every record has its trial number
            numbers.append(result.trial)
            volumes.append(step.hypervolume(ref))
    return numbers, volumes, np.array(ref)


def figure_pareto(data: Data, outdir: Path) -> list[Figure]:
    """The Pareto front of the first two objectives and the hypervolume over experiments."""
    names = list(data.campaign.objectives)
    done = [r for r in data.completed if data.feasible(r)]
    if len(names) < 2 or len(done) < 2:
        return []
    oriented = np.array([[data.oriented(n, r[n]) for n in names] for r in done])
    mask = non_dominated(oriented)
    a, b = names[0], names[1]
    fig, ax = _subplots(figsize=(6, 4.6))
    xs, ys = np.array([r[a] for r in done]), np.array([r[b] for r in done])
    order = np.array([r["trial"] for r in done])
    scatter = ax.scatter(xs[~mask], ys[~mask], c=order[~mask], cmap="viridis", s=20, alpha=0.7,
                         vmin=order.min(), vmax=order.max())
    front = np.argsort(xs[mask])
    ax.plot(xs[mask][front], ys[mask][front], "-o", color="tab:red", label=f"Pareto front ({mask.sum()} points)")
    fig.colorbar(scatter, ax=ax, label="experiment number")
    ax.set_xlabel(f"{_label(data, a)} ({data.campaign.objectives[a].goal})")
    ax.set_ylabel(f"{_label(data, b)} ({data.campaign.objectives[b].goal})")
    ax.legend(fontsize=8)
    ax.set_title("Pareto front" + (f" (of {', '.join(names)}: first two shown)" if len(names) > 2 else ""))
    fig.tight_layout()
    figures = [Figure("pareto", "Pareto front", "Feasible experiments coloured by experiment number; the red line "
                      "joins the non-dominated ones.", _save(fig, outdir, "pareto"))]
    numbers, volumes, ref = hypervolume_history(data)
    fig, ax = _subplots(figsize=(6, 3.6))
    ax.step(numbers, volumes, where="post", color="black")
    ax.set_xlabel("experiment number")
    ax.set_ylabel("hypervolume")
    ax.set_title("Hypervolume of the feasible experiments")
    fig.tight_layout()
    # in the objectives' own units: the oriented point negates minimized ones (orienting again undoes it)
    reference = ", ".join(f"{n}={data.oriented(n, float(v)):.4g}" for n, v in zip(names, ref))
    figures.append(Figure("hypervolume", "Hypervolume over experiments",
                          f"Hypervolume dominated by the experiments so far, with reference point {reference}.",
                          _save(fig, outdir, "hypervolume")))
    return figures


def _axis_values(p: Any, values: list[Any]) -> tuple[np.ndarray, list[str] | None]:
    if isinstance(p, CategoricalParameter):
        labels = [_plain(str(v)) for v in p.values]
        return np.array([p.values.index(v) if v in p.values else np.nan for v in values], dtype=float), labels
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float), None


def figure_parameters(data: Data, outdir: Path) -> Figure | None:
    """Each tunable parameter against each output."""
    done = data.completed
    tunable = list(data.campaign.tunable_parameters.items())
    outputs = data.campaign.outputs
    if not done:
        return None
    fig, axes = _subplots(len(outputs), len(tunable), figsize=(3.2 * len(tunable) + 0.6, 2.8 * len(outputs)),
                             squeeze=False)
    for i, output in enumerate(outputs):
        ys = np.array([r[output] for r in done], dtype=float)
        for j, (name, p) in enumerate(tunable):
            ax = axes[i][j]
            xs, labels = _axis_values(p, [r[name] for r in done])
            colors = ["tab:blue" if data.initial(r) else "tab:orange" for r in done]
            ax.scatter(xs, ys, s=14, c=colors, alpha=0.7)
            if labels is not None:
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            elif isinstance(p, ContinuousParameter) and p.scale == "log":
                _log_x(ax)
            ax.set_xlabel(_label(data, name))
            if j == 0:
                ax.set_ylabel(_label(data, output))
    fig.suptitle("Each parameter against each output (blue: initial design, orange: later)")
    fig.tight_layout()
    return Figure("parameters", "Parameters against outputs",
                  "Every completed experiment, one panel per parameter and output.", _save(fig, outdir, "parameters"))


# -- the model ---------------------------------------------------------------------------------------


class Encoding:
    """Parameter dicts to an ``n x d`` unit-cube tensor: numbers scaled to [0, 1] (log scale where
    declared), categories one-hot. The report's own, so it does not follow the planner's choices."""

    def __init__(self, campaign: Campaign):
        self.columns: list[tuple[str, Any, int]] = []  # name, parameter, width
        for name, p in campaign.tunable_parameters.items():
            self.columns.append((name, p, len(p.values) if isinstance(p, CategoricalParameter) else 1))
        self.dim = sum(width for _, _, width in self.columns)

    def encode_many(self, rows: list[dict[str, Any]]) -> Any:
        import torch

        x = torch.zeros(len(rows), self.dim, dtype=torch.double)
        for i, row in enumerate(rows):
            start = 0
            for name, p, width in self.columns:
                v = row[name]
                if isinstance(p, CategoricalParameter):
                    x[i, start + p.values.index(v)] = 1.0
                else:
                    lo, hi = (min(p.values), max(p.values)) if isinstance(p, DiscreteParameter) else p.bounds
                    if isinstance(p, ContinuousParameter) and p.scale == "log":
                        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
                    x[i, start] = (float(v) - lo) / (hi - lo)
                start += width
        return x


@dataclass
class Fitted:
    """A GP of one output fitted on the encoded completed experiments."""

    output: str
    model: Any
    space: Any
    train_x: Any
    train_y: Any  # n x 1, raw values
    records: list[dict[str, Any]] = field(default_factory=list)
    unit: float = 1.0  # the model sees ``train_y / unit`` (see ``closedloop.planner.models.output_scale``)

    def predict(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (raw units) of the output at parameter dicts."""
        import torch

        x = self.space.encode_many(rows)
        with torch.no_grad():
            posterior = self.model.posterior(x)
        mean = posterior.mean.squeeze(-1).numpy()
        sd = posterior.variance.clamp_min(0).sqrt().squeeze(-1).numpy()
        return mean * self.unit, sd * self.unit

    def leave_one_out(self) -> tuple[np.ndarray, np.ndarray]:
        """Closed-form leave-one-out mean and standard deviation (raw units) of each training point.

        Uses the hyperparameters fitted on all points (the usual GP LOO shortcut: ``mu_i = y_i -
        [K^-1 y]_i / [K^-1]_ii``, ``var_i = 1 / [K^-1]_ii`` with the noise on K's diagonal).
        """
        import torch

        model = self.model
        model.eval()
        with torch.no_grad():
            x = model.train_inputs[0]
            y = model.train_targets
            prior = model.forward(x)
            k = prior.covariance_matrix + model.likelihood.noise.squeeze() * torch.eye(len(x), dtype=x.dtype)
            k_inv = torch.linalg.inv(k)
            alpha = k_inv @ (y - prior.mean)
            diag = torch.diagonal(k_inv)
            mean = y - alpha / diag
            sd = (1.0 / diag).sqrt()
            transform = getattr(model, "outcome_transform", None)
            if transform is not None and hasattr(transform, "stdvs"):
                scale, shift = transform.stdvs.squeeze(), transform.means.squeeze()
                mean, sd = mean * scale + shift, sd * scale
        return mean.numpy() * self.unit, sd.numpy() * self.unit


def fit(data: Data, output: str) -> Fitted | None:
    """A GP of ``output`` on the completed experiments, or None with fewer than three distinct values.

    Above ``MAX_TRAIN`` experiments it is fitted on that many, chosen as the planner chooses its own (the best
    half and an even spread of the rest): an exact GP's cost grows with the cube of its points, and the report
    of a 2,000-experiment campaign took 171 s, one of 20,000 would have needed a 3 GB matrix.
    """
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from closedloop.planner.models import MAX_TRAIN, output_scale, training_subset

    done = [r for r in data.completed if r.get(output) is not None]
    if len(done) < 3 or len({r[output] for r in done}) < 2:
        return None
    if len(done) > MAX_TRAIN:
        scores = torch.tensor([data.oriented(output, float(r[output])) for r in done], dtype=torch.double)
        done = [done[i] for i in training_subset(scores, MAX_TRAIN).tolist()]
    space = Encoding(data.campaign)
    rows = [{n: r[n] for n in data.campaign.parameters} for r in done]
    train_x = space.encode_many(rows)
    train_y = torch.tensor([[float(r[output])] for r in done], dtype=torch.double)
    torch.manual_seed(0)
    with warnings.catch_warnings(), _one_thread():
        warnings.simplefilter("ignore")  # fitting chatter: the report shows the fit's quality instead
        unit = output_scale(train_y)
        model = SingleTaskGP(train_x, train_y / unit, outcome_transform=Standardize(m=1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    model.eval()
    return Fitted(output, model, space, train_x, train_y, done, unit)


def _best_record(data: Data, output: str, *, feasible: bool = True) -> dict[str, Any] | None:
    # issue 8: only the target source's results count (a campaign with sources)
    done = [r for r in data.completed if (data.feasible(r) or not feasible) and data.campaign.counts(r)]
    if not done:
        return None
    if output in data.campaign.objectives:
        return max(done, key=lambda r: data.oriented(output, r[output]))
    return done[-1]


def _slice_rows(p: Any, name: str, base: dict[str, Any]) -> tuple[list[dict[str, Any]], np.ndarray, list[str] | None]:
    """Parameter dicts along ``name`` with the others at ``base``; the x values to plot; tick labels."""
    if isinstance(p, CategoricalParameter):
        values: list[Any] = list(p.values)
        return [{**base, name: v} for v in values], np.arange(len(values), dtype=float), [str(v) for v in values]
    if isinstance(p, DiscreteParameter):
        values = list(p.values)
    elif isinstance(p, IntegerParameter):
        lo, hi = int(p.bounds[0]), int(p.bounds[1])
        values = (list(range(lo, hi + 1)) if hi - lo <= 200
                  else sorted({int(round(v)) for v in np.linspace(lo, hi, 200)}))
    else:
        lo, hi = p.bounds
        values = list(np.geomspace(lo, hi, 120) if p.scale == "log" else np.linspace(lo, hi, 120))
    return [{**base, name: v} for v in values], np.array(values, dtype=float), None


def figure_model(data: Data, fitted: list[Fitted], outdir: Path) -> Figure | None:
    """The model's mean and ±2 standard deviations along each parameter through the best point."""
    if not fitted:
        return None
    tunable = list(data.campaign.tunable_parameters.items())
    fig, axes = _subplots(len(fitted), len(tunable), figsize=(3.2 * len(tunable) + 0.6, 2.9 * len(fitted)),
                             squeeze=False)
    through_reading = False
    # every experiment is drawn, those the model was not fitted on too
    measured = [[r for r in data.completed if r.get(f.output) is not None] for f in fitted]
    for i, f in enumerate(fitted):
        # no experiment within the outcome constraints yet: the slices go through the best reading instead
        best = _best_record(data, f.output) or _best_record(data, f.output, feasible=False)
        assert best is not None  # fitted on completed experiments
        through_reading |= _best_record(data, f.output) is None
        base = {n: best[n] for n in data.campaign.parameters}
        for j, (name, p) in enumerate(tunable):
            ax = axes[i][j]
            rows, xs, labels = _slice_rows(p, name, base)
            mean, sd = f.predict(rows)
            if labels is None:
                ax.plot(xs, mean, color="tab:blue", label="model mean")
                ax.fill_between(xs, mean - 2 * sd, mean + 2 * sd, color="tab:blue", alpha=0.2, label="±2 sd")
                if isinstance(p, ContinuousParameter) and p.scale == "log":
                    _log_x(ax)
            else:
                ax.errorbar(xs, mean, yerr=2 * sd, fmt="o", color="tab:blue", capsize=3, label="model mean ±2 sd")
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            bx = _axis_values(p, [base[name]])[0][0]
            ax.axvline(bx, color="tab:red", lw=1, ls="--", label="best point")
            observed_x, _ = _axis_values(p, [r[name] for r in measured[i]])
            ax.scatter(observed_x, [r[f.output] for r in measured[i]], s=8, color="gray", alpha=0.4,
                       label="experiments")
            ax.set_xlabel(_label(data, name))
            if j == 0:
                ax.set_ylabel(_label(data, f.output))
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Model slices through the best point (other parameters held at the best point)")
    fig.tight_layout()
    return Figure("model", "Model along the best point's slices",
                  f"A GP fitted to {_fitted_on(fitted, measured)}; each panel varies one parameter with the others at "
                  "the best experiment's values. Grey dots are experiments (projected, so they need not lie on "
                  "the curve)." + (" No experiment meets the outcome constraints yet: the best point is the best "
                                   "reading." if through_reading else ""), _save(fig, outdir, "model"))


def _fitted_on(fitted: list[Fitted], measured: list[list[dict[str, Any]]]) -> str:
    if all(len(f.records) == len(m) for f, m in zip(fitted, measured)):
        return "all completed experiments"
    return (" and ".join(f"{len(f.records):,} of the {len(m):,} completed experiments of {f.output}"
                         for f, m in zip(fitted, measured)) + " (the best half and an even spread of the rest)")


def _magnitude(values: np.ndarray) -> float:
    """The largest absolute value, 1 for none or all zero: what to divide by before squaring."""
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    return largest if largest > 0 and math.isfinite(largest) else 1.0


def _rms(values: np.ndarray) -> float:
    """Root mean square computed in units of the largest value: squares of outputs of order 1e300
    overflow and of 1e-300 underflow (the report read "RMSE inf (nan of the data's sd)" and "RMSE 0")."""
    scale = _magnitude(values)
    return scale * float(np.sqrt(np.mean((values / scale) ** 2)))


def figure_loo(fitted: list[Fitted], outdir: Path) -> tuple[Figure | None, dict[str, dict[str, float]]]:
    """Leave-one-out predicted against observed, with RMSE and the share within two sd."""
    if not fitted:
        return None, {}
    fig, axes = _subplots(1, len(fitted), figsize=(4.4 * len(fitted), 4.2), squeeze=False)
    quality: dict[str, dict[str, float]] = {}
    for ax, f in zip(axes[0], fitted):
        observed = f.train_y.squeeze(-1).numpy()
        mean, sd = f.leave_one_out()
        rmse = _rms(mean - observed)
        within = float(np.mean(np.abs(mean - observed) <= 2 * sd))
        scale = _magnitude(observed)
        spread = _rms(observed - scale * np.mean(observed / scale)) or 1.0
        quality[f.output] = {"rmse": rmse, "rmse_over_sd": rmse / spread, "within_2sd": within, "n": len(observed)}
        ax.errorbar(observed, mean, yerr=2 * sd, fmt="o", ms=4, alpha=0.7, capsize=2, color="tab:blue")
        lo, hi = float(min(observed.min(), mean.min())), float(max(observed.max(), mean.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        ax.set_xlabel(f"observed {f.output}")
        ax.set_ylabel(f"leave-one-out predicted {f.output}")
        ax.set_title(f"{f.output}: RMSE {rmse:.3g} ({rmse / spread:.2f} sd), {within:.0%} within ±2 sd", fontsize=9)
    fig.tight_layout()
    return Figure("loo", "Model quality: leave-one-out",
                  "Each experiment predicted by the model fitted on all the others (error bars ±2 sd); the line "
                  "is perfect prediction.", _save(fig, outdir, "loo")), quality


def make_figures(store: Store, campaign: str, outdir: str | Path) -> tuple[list[Figure], dict[str, Any]]:
    """Write the report's PNG figures into ``outdir``; returns them and the model-quality numbers."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    data = load(store, campaign)
    return _figures(data, outdir)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: the report's matrices have a few hundred entries, and more threads only
    fight other processes for the cores (a GP fit took 8 s with two threads, 0.16 s with one, on two
    busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _figures(data: Data, outdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    with _one_thread():
        return _all_figures(data, outdir)


def _all_figures(data: Data, outdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    started = first = time.perf_counter()
    progress = figure_progress(data, outdir)
    figures += [progress] if progress else []
    figures += figure_pareto(data, outdir)
    parameters = figure_parameters(data, outdir)
    figures += [parameters] if parameters else []
    timings["plots_s"] = time.perf_counter() - started
    started = time.perf_counter()
    fitted = [f for f in (fit(data, output) for output in data.campaign.objectives) if f is not None]
    timings["fit_s"] = time.perf_counter() - started
    model = figure_model(data, fitted, outdir)
    figures += [model] if model else []
    loo, quality = figure_loo(fitted, outdir)
    figures += [loo] if loo else []
    timings["total_s"] = time.perf_counter() - first
    return figures, {"quality": quality, "timings": timings}


# -- HTML ------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Installed versions: the software that makes the report (the store records what made the results)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in SOFTWARE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1150px;color:#222;
     padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} tr.failed td{color:#b00}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:14px}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:13px} .summary td:first-child{font-weight:600}
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        return f'<td class="n">{value:.6g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def render_html(data: Data, figures: list[Figure], extra: dict[str, Any]) -> str:
    """The report as one HTML string with every figure embedded (base64 PNG)."""
    c = data.campaign
    counts: dict[str, int] = {}
    for r in data.records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    finished = [r for r in data.records if r["status"] in ("completed", "failed", "abandoned")]
    # a budget in cost alone sets no number of experiments: show the cost instead of an invented limit
    limit = f" of {c.budget.experiments}" if c.budget.experiments is not None else ""
    states = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    summary = [("campaign", c.name), ("description", c.description or "-"),
               ("experiments", f"{len(finished)}{limit}" + (f" ({states})" if states else " (no trial yet)"))]
    if c.budget.cost is not None:
        from closedloop.store import used_instrument

        spent = sum(c.cost_of(r) for r in finished if used_instrument(r["attempts"], r["error"]))
        summary.append(("cost", f"{spent:.4g} of {c.budget.cost:g}"))
    summary += [("planner", c.planner.backend),
               ("started", f"{data.started:%Y-%m-%d %H:%M:%S} UTC" if data.started else "-")]
    reported = extra.get("reported_best")
    for name, objective in c.objectives.items():
        best = _best_record(data, name)
        if best is None:
            counted = [r for r in data.completed if c.counts(r)]
            if counted and c.outcome_constraints:  # measured, but none within the outcome constraints
                summary.append((f"best {name} ({objective.goal})", f"no feasible experiment yet: none of the "
                                f"{len(counted)} completed meets the outcome constraints"))
            continue
        reading = _experiment_text(best[name], best["trial"], best, c.parameters)
        # under noise the planner reports the best model estimate, not the luckiest reading (docs/planner.md)
        if reported is not None and reported.values is not None and reported.trial != best["trial"]:
            chosen = _experiment_text(reported.values[name], reported.trial, reported.parameters, c.parameters)
            summary.append((f"best {name} ({objective.goal})", f"{chosen} (the best model estimate among the "
                                                               f"experiments run)"))
            summary.append((f"best single reading of {name}", f"{reading} (judged by the model a lucky reading)"))
        else:
            summary.append((f"best {name} ({objective.goal})", reading))
    for output, q in extra.get("quality", {}).items():
        summary.append((f"model quality ({output})",
                        f"leave-one-out RMSE {q['rmse']:.4g} ({q['rmse_over_sd']:.2f} of the "
                                                     f"data's sd), {q['within_2sd']:.0%} within ±2 sd, n={q['n']}"))
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(c.name)} — "
             f"closedloop report</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(c.name)}</h1><p>closedloop campaign report, made "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
             '<h2>Summary</h2><table class="summary">'
             + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary) + "</table>"]
    if not figures:
        parts.append("<p>No completed experiment yet: nothing to plot.</p>")
    for f in figures:
        encoded = base64.b64encode(f.path.read_bytes()).decode()
        parts.append(f'<h2>{html.escape(f.title)}</h2><figure><img alt="{html.escape(f.title)}" '
                     f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(f.caption)} '
                     f'(<a href="{html.escape(f.path.name)}">{html.escape(f.path.name)}</a>)</figcaption></figure>')
    columns = ["trial", "status", *c.parameters, *c.outputs, "generator", "station", "duration_s", "finished_at",
               "error"]
    shown = data.records[-TABLE_ROWS:]
    rows = "".join(
        f'<tr class="{"failed" if r["status"] in ("failed", "abandoned") else ""}">'
        + "".join(_cell(r.get(col)) for col in columns) + "</tr>"
        for r in shown
    )
    cut = (f"<p>The last {len(shown):,} of the {len(data.records):,} trials (<code>closedloop export "
           f"{html.escape(c.name)}</code> writes every one).</p>" if len(shown) < len(data.records) else "")
    parts.append(f"<h2>Experiments</h2>{cut}<table><thead><tr>"
                 f"{''.join(f'<th>{html.escape(h)}</th>' for h in columns)}</tr></thead><tbody>{rows}</tbody></table>")
    parts.append(f"<h2>Campaign file as run</h2><pre>{html.escape(data.spec_yaml)}</pre>")
    now = versions()
    ran = {k: ", ".join(v) for k, v in extra.get("ran_with", {}).items()}
    parts.append("<h2>Software</h2><table><thead><tr><th></th><th>the planner ran with (recorded)</th>"
                 "<th>this report</th></tr></thead><tbody>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(ran.get(k, ''))}</td><td>{html.escape(now.get(k, ''))}</td></tr>"
        for k in [*now, *(k for k in ran if k not in now)]) + "</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _experiment_text(value: float, trial: int, parameters: Mapping[str, Any], names: Iterable[str]) -> str:
    """One experiment for the summary: its value, number and parameters."""
    return f"{value:.6g} at experiment #{trial}: " + ", ".join(f"{n}={_fmt(parameters[n])}" for n in names)


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_report(store: Store, campaign: str, path: str | Path) -> Path:
    """Write the HTML report to ``path`` and its PNG figures into the same folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load(store, campaign)
    figures, extra = _figures(data, path.parent)
    extra["reported_best"] = (_planners_best(campaign, data.campaign, store.results(store.campaign_row(campaign).id))  # type: ignore[arg-type]
                              if len(data.campaign.objectives) == 1 else None)
    extra["ran_with"] = _ran_with(store, store.campaign_row(campaign).id)
    path.write_text(render_html(data, figures, extra), encoding="utf-8")
    log.info("campaign=%s report %s written in %.2f s (%s)", campaign, path, time.perf_counter() - started,
             ", ".join(f"{k} {v:.2f}" for k, v in extra["timings"].items()))
    return path
