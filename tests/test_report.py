"""The HTML report: every figure made, embedded and written beside it; model numbers that are right."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from closedloop import report
from closedloop.cli import app
from closedloop.store import Store
from tests.reportdata import mixed_campaign, mixed_store

PNG = b"\x89PNG\r\n\x1a\n"


def _image_is_not_blank(png: bytes) -> bool:
    import io

    import matplotlib.image as mpimg

    pixels = mpimg.imread(io.BytesIO(png), format="png")[::4, ::4, :3]
    # a blank page is one colour; a figure has lines, text and markers in several colours
    colours = np.unique(np.round(pixels.reshape(-1, 3) * 15), axis=0)
    return float(pixels.std()) > 0.02 and len(colours) > 10


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Store, float]:
    """The report of a two-objective mixed-space campaign with failures, made by `closedloop report`."""
    root = tmp_path_factory.mktemp("report")
    store, _ = mixed_store(root / "store.db")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["report", "mixed", "--store", str(root / "store.db"),
                                      "-o", str(root / "out" / "report.html")])
    assert result.exit_code == 0, result.output
    return root / "out" / "report.html", store, time.perf_counter() - started


def test_report_embeds_every_figure_and_writes_it_beside_the_html(mixed_report: tuple[Path, Store, float]) -> None:
    path, _, seconds = mixed_report
    text = path.read_text()
    sources = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)
    names = ["progress", "pareto", "hypervolume", "parameters", "model", "loo"]
    assert len(sources) == len(names)
    for name, encoded in zip(names, sources):
        png = base64.b64decode(encoded, validate=True)
        assert png.startswith(PNG)
        assert (path.parent / f"{name}.png").read_bytes() == png  # the same figure beside the report
        assert _image_is_not_blank(png), name
    assert seconds < 60, f"report took {seconds:.1f} s"


def test_report_lists_failures_the_campaign_file_and_versions(mixed_report: tuple[Path, Store, float]) -> None:
    text = mixed_report[0].read_text()
    assert text.count("sample holder jammed") == 2  # both failed experiments, with their error
    assert "values: [water, ethanol, toluene]" in text  # the campaign file as run
    assert re.search(r"<td>botorch</td><td>[^<]*</td><td>\d+\.\d+", text)
    assert "best yield (maximize)" in text and "model quality (cost)" in text
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched when opened


def test_leave_one_out_equals_the_model_conditioned_on_the_other_points(tmp_path: Path) -> None:
    store, _ = mixed_store(tmp_path / "s.db", n=14, fail=())
    fitted = report.fit(report.load(store, "mixed"), "yield")
    assert fitted is not None
    mean, sd = fitted.leave_one_out()
    model = fitted.model
    x, y = model.train_inputs[0].clone(), model.train_targets.clone()
    scale, shift = model.outcome_transform.stdvs.squeeze(), model.outcome_transform.means.squeeze()
    for i in (0, 5, 13):
        keep = torch.arange(len(x)) != i
        model.set_train_data(inputs=x[keep], targets=y[keep], strict=False)
        with torch.no_grad():
            predictive = model.likelihood(model(x[i : i + 1]))
        assert float(predictive.mean * scale + shift) == pytest.approx(mean[i], rel=1e-5, abs=1e-7)
        assert float(predictive.variance.sqrt() * scale) == pytest.approx(sd[i], rel=1e-5)
    model.set_train_data(inputs=x, targets=y, strict=False)


def test_the_model_of_an_output_in_tiny_units_is_the_model_of_ordinary_ones(tmp_path: Path) -> None:
    # a current in amperes: BoTorch would leave a spread of 1e-12 unstandardized, a model of noise
    ordinary, _ = mixed_store(tmp_path / "a.db", n=14, fail=())
    tiny, _ = mixed_store(tmp_path / "b.db", n=14, fail=(), unit=1e-12)
    expected, fitted = report.fit(report.load(ordinary, "mixed"), "yield"), report.fit(report.load(tiny, "mixed"), "yield")
    assert expected is not None and fitted is not None
    for got, want in zip(fitted.leave_one_out(), expected.leave_one_out()):
        np.testing.assert_allclose(got, 1e-12 * want, rtol=1e-3)
    rows = [{"temp": 50.0, "conc": 0.1, "steps": 2, "solvent": "ethanol", "pressure": 1}]
    for got, want in zip(fitted.predict(rows), expected.predict(rows)):
        np.testing.assert_allclose(got, 1e-12 * want, rtol=1e-3)


def test_hypervolume_grows_and_the_front_is_non_dominated(tmp_path: Path) -> None:
    store, _ = mixed_store(tmp_path / "s.db", n=20, fail=(3,))
    data = report.load(store, "mixed")
    _, volumes, _ = report.hypervolume_history(data)
    assert all(b >= a - 1e-12 for a, b in zip(volumes, volumes[1:])) and volumes[-1] > volumes[0]
    front = report.pareto_front(store, "mixed")
    assert front
    for p in front:
        for q in data.completed:
            assert not (q["yield"] > p.values["yield"] and q["cost"] < p.values["cost"])


def test_report_of_a_campaign_without_results_still_renders(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.open_campaign(mixed_campaign())
    path = report.write_report(store, "mixed", tmp_path / "r" / "report.html")
    assert "No completed experiment yet" in path.read_text()
    assert "<td>experiments</td><td>0 of 30 (no trial yet)</td>" in path.read_text()  # it had read "0 of 30 ()"


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_report_renders_in_headless_chromium(mixed_report: tuple[Path, Store, float], tmp_path: Path) -> None:
    html_path = mixed_report[0]
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,3000",
             "--hide-scrollbars", html_path.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert _image_is_not_blank(shot.read_bytes())
    sources = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html_path.read_text())
    assert sources
    for encoded in sources:
        import io

        import matplotlib.image as mpimg

        assert mpimg.imread(io.BytesIO(base64.b64decode(encoded, validate=True)), format="png").shape[0] > 100


def test_the_initial_design_is_marked_for_every_objective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = mixed_store(tmp_path / "s.db", n=12, fail=())
    shaded: list[int] = []
    save = report._save

    def spy(fig, outdir, name):  # type: ignore[no-untyped-def]
        shaded.extend(len(ax.patches) for ax in fig.axes if ax.get_xlabel() == "experiment number")
        return save(fig, outdir, name)

    monkeypatch.setattr(report, "_save", spy)
    report.figure_progress(report.load(store, "mixed"), tmp_path)
    assert shaded == [1, 1]  # one shaded span over experiments 1-8 in each objective's panel


NOISY_YAML = """
name: noisy
parameters:
  x: {type: continuous, bounds: [0, 1]}
objectives:
  y: {goal: minimize}
budget: {experiments: 30}
planner: {initial_experiments: 4, seed: 0}
instrument: {simulator: "simulators.surfaces:Branin"}
"""


def test_under_noise_the_report_and_best_name_the_models_best_not_the_luckiest_reading(tmp_path: Path) -> None:
    from closedloop.campaign import Campaign

    campaign = Campaign.from_yaml_text(NOISY_YAML, check_instrument=False)
    store = Store(tmp_path / "store.db")
    cid = store.open_campaign(campaign)
    xs = np.repeat(np.linspace(0, 1, 6), 4)  # repeated experiments show the noise
    readings = (xs - 0.4) ** 2 + 0.05 * np.random.default_rng(0).standard_normal(len(xs))
    lucky = int(np.argmax(xs))  # one reading at x = 1 (true value 0.36) came out best of all
    readings[lucky] = readings.min() - 0.05
    store.import_results(cid, [({"x": float(x)}, {"y": float(y)}, None) for x, y in zip(xs, readings)], "test")

    reported = report.best(store, "noisy")
    assert reported is not None and abs(reported.parameters["x"] - 0.4) < 0.01
    html = report.write_report(store, "noisy", tmp_path / "out" / "report.html").read_text()
    assert f"at experiment #{reported.trial}: x=0.4 (the best model estimate" in html
    assert f"best single reading of y</td><td>{readings[lucky]:.6g} at experiment #{lucky + 1}: x=1 " in html


@pytest.mark.parametrize("unit", [1e300, 1e-300])
def test_leave_one_out_numbers_of_outputs_near_the_float_limits_are_the_ordinary_ones_scaled(tmp_path: Path,
                                                                                             unit: float) -> None:
    # squares of 1e300 overflow and of 1e-300 underflow: the report read "RMSE inf (nan of the data's sd)"
    # and "RMSE 0 (0.00 of the data's sd)"
    ordinary, _ = mixed_store(tmp_path / "a.db", n=14, fail=())
    extreme, _ = mixed_store(tmp_path / "b.db", n=14, fail=(), unit=unit)
    fits = [report.fit(report.load(s, "mixed"), "yield") for s in (ordinary, extreme)]
    assert fits[0] is not None and fits[1] is not None
    (_, want), (_, got) = (report.figure_loo([f], tmp_path) for f in fits)
    assert got["yield"]["rmse"] == pytest.approx(unit * want["yield"]["rmse"], rel=1e-3)
    assert got["yield"]["rmse_over_sd"] == pytest.approx(want["yield"]["rmse_over_sd"], rel=1e-3)
    assert got["yield"]["within_2sd"] == want["yield"]["within_2sd"]


def test_a_campaign_whose_experiments_all_break_its_outcome_constraints_gets_a_report_that_says_so(
        tmp_path: Path) -> None:
    # the model's slices go through the best feasible experiment: with none, the report failed on an assertion
    from tests.reportdata import MIXED_YAML, fill

    from closedloop.campaign import Campaign

    text = MIXED_YAML.format(name="infeasible", experiments=30).replace(
        "budget:", 'outcome_constraints: ["cost >= 1000"]\nbudget:')
    campaign = Campaign.from_yaml_text(text, check_instrument=False)
    store = Store(tmp_path / "s.db")
    fill(store, campaign, 12)
    result = CliRunner().invoke(app, ["report", "infeasible", "--store", str(tmp_path / "s.db"),
                                      "-o", str(tmp_path / "r" / "report.html")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.html").read_text()
    assert "no feasible experiment yet" in text
    assert (tmp_path / "r" / "model.png").exists()


@pytest.mark.parametrize(("thresholds", "points"), [
    (False, [(0.1, 5.0), (0.5, 2.0), (0.9, 0.5), (0.6, 3.0), (1.5, 0.1)]),
    (False, [(0.2, 4.0), (0.6, 4.0), (0.4, 4.0), (0.9, 4.0)]),  # f2 saturated: the same reading every time
    (True, [(0.1, 5.0), (0.5, 2.0), (0.9, 0.5), (0.6, 3.0), (1.5, 0.1)]),
])
def test_the_reports_hypervolume_is_the_planners(tmp_path: Path, thresholds: bool,
                                                 points: list[tuple[float, float]]) -> None:
    """Without thresholds the report took the worst reading less a tenth of the range (or less 0.1 where the range
    was 0) as its reference point, the planners BoTorch's infer_reference_point: with f2 saturated the report's last
    hypervolume was 0.077 and closedloop.hypervolume() 7.7e-9. Both now use the planners' rule."""
    from closedloop import Campaign, hypervolume

    text = (Path(__file__).resolve().parents[1] / "campaigns" / "zdt1.yaml").read_text()
    if not thresholds:
        text = text.replace(", threshold: 1.1", "").replace(", threshold: 11", "")
    campaign = Campaign.from_yaml_text(text, check_instrument=False)
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(campaign)
    trials = store.add_trials(cid, [({f"x{i}": 0.5 for i in range(1, 7)}, {"generator": "sobol"}) for _ in points])
    for trial, (f1, f2) in zip(trials, points):
        store.record_result(trial.id, f"manual-{trial.index}", {"f1": f1, "f2": f2})
    (failed,) = store.add_trials(cid, [({f"x{i}": 0.5 for i in range(1, 7)}, {"generator": "sobol"})])
    store.record_failure(failed.id, "sample holder jammed")
    numbers, volumes, ref = report.hypervolume_history(report.load(store, campaign.name))
    assert volumes[-1] == pytest.approx(hypervolume(store, campaign.name), rel=1e-9, abs=0.0)
    assert numbers == [t.index for t in trials] and volumes == sorted(volumes)  # one point per feasible experiment
    if thresholds:
        assert list(ref) == pytest.approx([-1.1, -11.0]) and volumes[-1] == pytest.approx(
            (0.5 - 0.1) * (11 - 5.0) + (0.9 - 0.5) * (11 - 2.0) + (1.1 - 0.9) * (11 - 0.5))
    store.close()


def test_the_hypervolume_reference_point_is_shown_with_the_thresholds_signs(tmp_path: Path) -> None:
    # shown as the oriented point's absolute values: thresholds -1 and -5 read "yield=1, cost=5"
    from tests.reportdata import MIXED_YAML, fill

    from closedloop.campaign import Campaign

    text = MIXED_YAML.format(name="signs", experiments=30).replace(
        "yield: {goal: maximize}", "yield: {goal: maximize, threshold: -1}").replace(
        "cost: {goal: minimize}", "cost: {goal: minimize, threshold: -5}")
    store = Store(tmp_path / "s.db")
    fill(store, Campaign.from_yaml_text(text, check_instrument=False), 6)
    figures, _ = report.make_figures(store, "signs", tmp_path / "r")
    (caption,) = [f.caption for f in figures if f.name == "hypervolume"]
    assert "with reference point yield=-1, cost=-5." in caption


def _constrained_store(tmp_path: Path) -> Store:
    """Twelve experiments of the mixed campaign with units on its objectives, some above a cost limit."""
    from tests.reportdata import MIXED_YAML, fill

    from closedloop.campaign import Campaign

    text = MIXED_YAML.format(name="limited", experiments=30).replace(
        "budget:", 'outcome_constraints: ["cost <= 2.5"]\nbudget:').replace(
        "yield: {goal: maximize}", "yield: {goal: maximize, unit: mg}").replace(
        "cost: {goal: minimize}", "cost: {goal: minimize, unit: EUR}")
    campaign = Campaign.from_yaml_text(text, check_instrument=False)
    store = Store(tmp_path / "s.db")
    fill(store, campaign, 12)
    return store


def _spy_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    figures: dict[str, object] = {}
    save = report._save

    def spy(fig, outdir, name):  # type: ignore[no-untyped-def]
        figures[name] = [(ax.get_xlabel(), ax.get_ylabel(),
                          {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}) for ax in fig.axes]
        return save(fig, outdir, name)

    monkeypatch.setattr(report, "_save", spy)
    return figures


def test_experiments_that_break_an_outcome_constraint_are_marked_in_both_progress_panels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # they were drawn as ordinary experiments below a best-so-far line that passed them by, and the time
    # panel left them out
    store = _constrained_store(tmp_path)
    data = report.load(store, "limited")
    broken = [r for r in data.completed if not data.feasible(r)]
    assert 0 < len(broken) < len(data.completed)
    figures = _spy_figures(monkeypatch)
    report.figure_progress(data, tmp_path)
    for _, _, points in figures["progress"]:
        assert len(points[report.INFEASIBLE]) == len(broken)
        shown = sum(int(np.isfinite(o).all(axis=1).sum()) for o in points.values() if len(o))
        assert shown == len(data.completed)  # every completed experiment once, in either panel


def test_every_figure_labels_parameters_and_objectives_with_their_units(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _constrained_store(tmp_path)
    data = report.load(store, "limited")
    figures = _spy_figures(monkeypatch)
    report.figure_parameters(data, tmp_path)
    report.figure_pareto(data, tmp_path)
    report.figure_model(data, [report.fit(data, "cost")], tmp_path)
    for name in ("parameters", "model"):
        xlabels = {x for x, _, _ in figures[name]}
        ylabels = {y for _, y, _ in figures[name]} - {""}
        assert "temp [C]" in xlabels, (name, xlabels)
        assert "cost [EUR]" in ylabels, (name, ylabels)
    ((x, y, _), _colorbar) = figures["pareto"]
    assert (x, y) == ("yield [mg] (maximize)", "cost [EUR] (minimize)")


def test_making_figures_leaves_the_notebooks_matplotlib_backend_and_figures_alone(tmp_path: Path) -> None:
    # make_figures switched pyplot to Agg for the whole process: in a notebook every later plt.show() was
    # blank ("FigureCanvasAgg is non-interactive"), and a Qt session lost its windows
    import matplotlib.pyplot as plt

    before = plt.get_backend()
    plt.switch_backend("svg")  # stands in for the notebook's own (inline, Qt) backend
    try:
        mine = plt.figure()
        store, _ = mixed_store(tmp_path / "s.db", n=10, fail=())
        data = report.load(store, "mixed")  # the model's figures draw as these do, after a GP fit of seconds
        assert report.figure_progress(data, tmp_path) and report.figure_parameters(data, tmp_path)
        assert plt.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]  # none of the report's left open, nor the scientist's closed
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_the_software_table_shows_the_versions_the_campaign_ran_with_not_only_todays(tmp_path: Path) -> None:
    """A report written months later listed only the versions installed when it was written, under "the software
    that made the results": a campaign run with botorch 0.9.0 read as run with today's botorch."""
    from sqlalchemy import text as sql

    from closedloop import hitl
    from tests.conftest import branin_campaign

    store = Store(tmp_path / "s.db")
    campaign = branin_campaign("older")
    for trial in hitl.suggest(store, campaign, n=2):
        hitl.tell(store, "older", trial.index, {"y": 1.0 + trial.index})
    with store.engine.begin() as connection:  # as a campaign run with older packages recorded it
        connection.execute(sql("UPDATE provenance SET versions = :v"),
                           {"v": '{"closedloop": "0.0.9", "botorch": "0.9.0", "torch": "2.1.0", "torch_threads": "1"}'})
    page = report.write_report(store, "older", tmp_path / "report.html").read_text()
    software = page[page.index("<h2>Software</h2>"):]
    assert re.search(r"<td>botorch</td><td>0\.9\.0</td><td>\d+\.\d+", software), software
    assert "<td>torch</td><td>2.1.0</td>" in software and "torch_threads" not in software
    store.close()


def test_units_and_values_with_dollar_signs_are_drawn_as_written(tmp_path: Path) -> None:
    # matplotlib reads text between two '$' as mathtext: the unit '$/kg, $ per lot' was drawn as 'price [/kg, per
    # lot]' with '/kg, ' in math italics, and a unit such as '$_$' stopped the whole report (ValueError: mathtext)
    from matplotlib.figure import Figure

    from tests.reportdata import MIXED_YAML, fill

    text = MIXED_YAML.format(name="dollars", experiments=30).replace("unit: C", "unit: '$/kg, $ per lot'").replace(
        "yield: {goal: maximize}", "yield: {goal: maximize, threshold: 0, unit: '$_$'}").replace(
        "cost: {goal: minimize}", "cost: {goal: minimize, threshold: 5}")
    store = Store(tmp_path / "s.db")
    fill(store, report.Campaign.from_yaml_text(text, check_instrument=False), 12)
    data = report.load(store, "dollars")
    label = report._label(data, "temp")
    figure = Figure()
    figure.text(0, 0, label)
    figure.canvas.draw()
    assert figure.texts[0]._preprocess_math(label) == ("temp [$/kg, $ per lot]", False)  # plain text, as written
    result = CliRunner().invoke(app, ["report", "dollars", "--store", str(tmp_path / "s.db"), "-o",
                                      str(tmp_path / "r" / "report.html")])
    assert result.exit_code == 0, result.output


def _records(n: int) -> list[dict[str, object]]:
    """``n`` completed experiments of the mixed campaign as the report reads them from a store."""
    from tests.reportdata import mixed_outputs

    rng = np.random.default_rng(3)
    records = []
    for i in range(1, n + 1):
        p = {"temp": float(rng.uniform(20, 80)), "conc": float(10 ** rng.uniform(-2, 0)), "steps": int(rng.integers(1, 6)),
             "solvent": str(rng.choice(["water", "ethanol", "toluene"])), "pressure": 1}
        records.append({"trial": i, "status": "completed", **p, **mixed_outputs(p), "generator": "sobol"})
    return records


def test_the_model_of_a_big_campaign_is_fitted_on_a_subset_that_holds_its_best(tmp_path: Path) -> None:
    # an exact GP on every experiment: 171 s for the report of 2,000, a 3 GB matrix for 20,000
    from closedloop.planner.models import MAX_TRAIN

    records = _records(MAX_TRAIN + 50)
    data = report.Data(mixed_campaign(experiments=1000), records, "", None)
    fitted = report.fit(data, "yield")
    assert fitted is not None
    assert fitted.train_x.shape[0] == len(fitted.records) == MAX_TRAIN
    assert max(records, key=lambda r: r["yield"])["trial"] in {r["trial"] for r in fitted.records}
    figure = report.figure_model(data, [fitted], tmp_path)
    assert figure is not None and f"{MAX_TRAIN:,} of the {MAX_TRAIN + 50:,} completed experiments" in figure.caption


def test_the_experiments_table_of_a_big_campaign_holds_the_last_trials_and_says_so() -> None:
    records = _records(report.TABLE_ROWS + 5)
    text = report.render_html(report.Data(mixed_campaign(experiments=5000), records, "", None), [], {})
    table = text.split("<h2>Experiments</h2>")[1].split("</table>")[0]
    assert table.count("<tr class=") == report.TABLE_ROWS
    assert f'<tr class=""><td class="n">{len(records)}</td>' in table and '<tr class=""><td class="n">5</td>' not in table
    assert f"The last {report.TABLE_ROWS:,} of the {len(records):,} trials" in text


def test_best_reads_the_results_once_and_no_orm_object(tmp_path: Path) -> None:
    # best() loaded every trial as a table record, then again as results for the planner: 35 s at 50,000 trials
    from sqlalchemy import event

    from closedloop.store import ObservationRow, TrialRow

    store, _ = mixed_store(tmp_path / "s.db", n=12)
    selects: list[str] = []
    loaded: list[object] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM trial" in statement:
            selects.append(statement)

    def count(target: object, _context: object) -> None:
        loaded.append(target)

    event.listen(store.engine, "before_cursor_execute", seen)
    for table in (TrialRow, ObservationRow):
        event.listen(table, "load", count)
    try:
        found = report.best(store, "mixed")
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
        for table in (TrialRow, ObservationRow):
            event.remove(table, "load", count)
    assert found is not None and found.trial in range(1, 13)
    assert len(selects) == 1 and loaded == [], selects
