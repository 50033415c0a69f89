"""The library benchmark: a pool campaign over a generated candidate table, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from closedloop.bench.library import write_library
from closedloop.campaign import load_campaign
from closedloop.cli import app


def test_the_generated_library_is_a_valid_pool_campaign(tmp_path: Path) -> None:
    campaign = load_campaign(write_library(tmp_path, 50, 3), check_instrument=False)
    rows = campaign.candidate_table()
    assert len(rows) == 50 and set(rows[0]) == {"x0", "x1", "x2"}
    assert all(0.0 <= v <= 1.0 for row in rows for v in row.values())


def test_the_command_times_each_size_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "library.json"
    result = CliRunner().invoke(app, ["bench", "library", "--rows", "120", "--rows", "300", "--columns", "2",
                                      "--results", "6", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "300 rows x 2" in result.output
    figures = json.loads(out.read_text())
    assert [f["rows"] for f in figures] == [120, 300]
    for f in figures:
        assert f["batch4_rows"] == 4 and len(f["suggest_samples"]) == 3
        assert all(f[k] > 0 for k in ("load_s", "planner_s", "suggest_s", "batch4_s"))
