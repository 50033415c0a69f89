"""`closedloop bench loop` runs end to end on real sockets, a real store and a real station process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path



def test_the_loop_benchmark_runs_and_prints_its_figures(tmp_path: Path) -> None:
    """Its intake run asked a campaign of 5,000 in flight, past execution.concurrency's limit (1,024) once that came in:
    the command stopped at its own campaign file, and no test ran it."""
    result = subprocess.run([sys.executable, "-m", "closedloop.cli", "bench", "loop", "--quick", "--overhead", "10",
                             "--intake", "1024"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert "loop overhead:" in out and "over 10 experiments" in out, out
    assert "(1024 results in" in out, out
