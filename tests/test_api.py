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
