"""`closedloop bench scale`'s Dask half runs through the whole loop and counts what it measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from closedloop.bench.scale import measure_dask


@pytest.mark.slow
def test_the_dask_benchmark_counts_every_experiment_through_the_loop_and_straight_on_dask(tmp_path: Path) -> None:
    figures = measure_dask(experiments=30, workers=1, seconds=0.01, directory=tmp_path)
    assert figures["experiments"] == 30
    assert 0 < figures["busy_fraction"] <= 1 and 0 < figures["dask_alone_busy_fraction"] <= 1
    assert figures["throughput_per_s"] > 0 and figures["dask_alone_per_s"] > 0
