"""The Python API: the README's notebook example runs as written, and the façade's names resolve."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import closedloop

ROOT = Path(__file__).resolve().parents[1]


def test_the_facade_exports_the_objects_the_cli_uses() -> None:
    from closedloop import Campaign, Planner, Store, make_planner
    from closedloop.campaign import Campaign as CampaignClass
    from closedloop.store import Store as StoreClass

    assert Campaign is CampaignClass and Store is StoreClass
    campaign = Campaign.from_yaml(ROOT / "campaigns" / "branin.yaml")
    assert isinstance(make_planner(campaign), Planner)
    assert set(closedloop.__all__) <= set(dir(closedloop))
    with pytest.raises(AttributeError):
        closedloop.nothing_here  # noqa: B018


def test_the_readme_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its Python API example"
    (tmp_path / "campaigns").mkdir()
    shutil.copy(ROOT / "campaigns" / "branin.yaml", tmp_path / "campaigns" / "branin.yaml")
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "values={'y':" in printed
    store = closedloop.Store(tmp_path / "results" / "notebook.db")
    assert store.counts(1) == {"completed": 4}
    assert all(o.run_uid.startswith("manual-") for o in store.observations(1).values())
    assert {p.name for p in (tmp_path / "reports" / "notebook").glob("*.png")} >= {"progress.png", "model.png",
                                                                                    "loo.png", "parameters.png"}
    assert (tmp_path / "reports" / "notebook" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("backend", ["ax", "sobol"])
def test_the_hypervolume_of_a_stored_campaign_is_one_call_whatever_its_backend(tmp_path: Path, backend: str) -> None:
    """The API had best() and pareto_front() of a stored campaign but no hypervolume: a notebook had to rebuild
    the planner by hand, and an ax campaign's planner had none (AttributeError, until b5d4d23)."""
    from closedloop import Campaign, Store, hypervolume, pareto_front
    from closedloop.errors import PlannerError
    from closedloop.report import hypervolume_history, load

    text = (ROOT / "campaigns" / "zdt1.yaml").read_text().replace("backend: sobol", f"backend: {backend}")
    campaign = Campaign.from_yaml_text(text, check_instrument=False)
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(campaign)
    points = [(0.1, 5.0), (0.5, 2.0), (0.9, 0.5), (0.6, 3.0), (1.5, 0.1)]  # the last is beyond f1's threshold 1.1
    trials = store.add_trials(cid, [({f"x{i}": 0.5 for i in range(1, 7)}, {"generator": "sobol"}) for _ in points])
    for trial, (f1, f2) in zip(trials, points):
        store.record_result(trial.id, f"manual-{trial.index}", {"f1": f1, "f2": f2})
    assert [r.trial for r in pareto_front(store, campaign.name)] == [1, 2, 3, 5]
    # the area the front dominates up to the reference point (1.1, 11), as the report draws it; #5 lies beyond it
    expected = (0.5 - 0.1) * (11 - 5.0) + (0.9 - 0.5) * (11 - 2.0) + (1.1 - 0.9) * (11 - 0.5)
    assert hypervolume(store, campaign.name) == pytest.approx(expected)
    assert hypervolume_history(load(store, campaign.name))[1][-1] == pytest.approx(expected)
    store.close()

    one = Store(tmp_path / "one.db")
    branin = Campaign.from_yaml(ROOT / "campaigns" / "branin.yaml")
    (trial,) = one.add_trials(one.open_campaign(branin), [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"})])
    one.record_result(trial.id, "manual-1", {"y": 3.0})
    with pytest.raises(PlannerError, match="the campaign has one objective \\('y'\\)"):
        hypervolume(one, "branin")
    one.close()


def test_every_planner_reports_a_hypervolume_or_says_why_not() -> None:
    """The multi-fidelity planner had no hypervolume() (AttributeError) where every other backend refuses one
    objective by name; the Planner protocol now names the method."""
    from closedloop import Campaign, Planner, make_planner
    from closedloop.errors import PlannerError

    planner = make_planner(Campaign.from_yaml(ROOT / "campaigns" / "branin_multifidelity.yaml"))
    assert isinstance(planner, Planner)
    with pytest.raises(PlannerError, match="one objective"):
        planner.hypervolume()
