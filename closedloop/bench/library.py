"""``closedloop bench library``: the cost of a pool campaign over a large candidate table.

Pool-based campaigns pick only among the rows of a table (a compound library, enumerated reaction
conditions), and libraries run to hundreds of thousands of rows. For each table size this writes a
random table of ``columns`` continuous parameters in a temporary folder and times, in this process:

- **load**: reading and checking the campaign file and its table (:func:`closedloop.campaign.load_campaign`),
  as every ``closedloop`` command that opens the campaign does;
- **planner**: building the botorch planner (typing and encoding every row);
- **suggest**: one suggestion after ``results`` results (median of three), and a batch of 4.

The objective is a smooth bowl of the parameters, so every suggestion is a model's (no ties, no noise).
Run: ``closedloop bench library`` (about half a minute for 10,000 and 100,000 rows on two cores).
"""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_library(folder: Path, rows: int, columns: int, seed: int = 0) -> Path:
    """A campaign over a random table of ``rows`` x ``columns`` values in [0, 1]; returns the campaign file."""
    table = folder / f"library_{rows}.csv"
    values = np.random.default_rng(seed).random((rows, columns)).round(6)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"x{i}" for i in range(columns)])
        writer.writerows(values.tolist())
    parameters = "\n".join(f"  x{i}: {{type: continuous, bounds: [0, 1]}}" for i in range(columns))
    campaign = folder / f"library_{rows}.yaml"
    campaign.write_text(f"name: library-{rows}\nparameters:\n{parameters}\ncandidates: {table.name}\n"
                        f"objectives:\n  y: {{goal: minimize}}\nbudget: {{experiments: {min(rows, 100)}}}\n"
                        "planner: {seed: 0}\n"
                        "instrument: {simulator: 'simulators.surfaces:Branin'}\n")
    return campaign


def bowl(parameters: dict[str, Any]) -> float:
    return float(sum((float(v) - 0.3) ** 2 for v in parameters.values()))


def measure(rows: int, columns: int = 6, results: int = 25) -> dict[str, Any]:
    from closedloop.campaign import load_campaign
    from closedloop.planner import Result, make_planner

    with tempfile.TemporaryDirectory(prefix="closedloop-library-") as tmp:
        path = write_library(Path(tmp), rows, columns)
        started = time.perf_counter()
        campaign = load_campaign(path, check_instrument=False)
        loaded = time.perf_counter()
        planner = make_planner(campaign)
        built = time.perf_counter()
        for trial in range(1, results + 1):
            proposal = planner.suggest(1)[0]
            planner.ingest([Result(proposal.parameters, {"y": bowl(proposal.parameters)}, trial)])
        single = []
        for _ in range(3):
            t = time.perf_counter()
            planner.suggest(1)
            single.append(time.perf_counter() - t)
        t = time.perf_counter()
        batch = planner.suggest(4)
        batch_s = time.perf_counter() - t
    return {"rows": rows, "columns": columns, "results": results, "load_s": loaded - started,
            "planner_s": built - loaded, "suggest_s": statistics.median(single), "suggest_samples": single,
            "batch4_s": batch_s, "batch4_rows": len(batch)}


def main(*, sizes: tuple[int, ...] = (10_000, 100_000), columns: int = 6, results: int = 25, console: Any = None,
         output: Path | None = None) -> list[dict[str, Any]]:
    import torch

    def say(line: str) -> None:
        console.print(line) if console is not None else print(line)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the planner thinks (numerics.in_planner_numerics)
    try:
        figures = []
        for rows in sizes:
            f = measure(rows, columns, results)
            figures.append(f)
            say(f"{rows:>9,} rows x {columns}: load {f['load_s']:.2f} s, planner {f['planner_s']:.2f} s, "
                f"suggestion after {results} results {f['suggest_s']:.2f} s, batch of 4 {f['batch4_s']:.2f} s")
    finally:
        torch.set_num_threads(threads)
    if output is not None:
        output.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
