"""``closedloop bench planner``: our planner against Ax, BayBE, Xopt, Optuna TPE and Sobol.

Example:
    >>> from closedloop.bench import planner_benchmark
    >>> report = planner_benchmark(problems=["branin"], peers=["sobol"], seeds=1, budget_scale=0.2,
    ...                            speed_sizes=())
    >>> report["summary"]["branin"]["sobol"]["seeds"]
    1
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from closedloop.bench.peers import PEERS
from closedloop.bench.problems import PROBLEMS
from closedloop.bench.runner import (
    SPEED_CAP_SECONDS,
    SPEED_REPEATS,
    environment,
    plan,
    run_many,
    speed_plan,
    speed_table,
    summarize,
)

__all__ = ["PEERS", "PROBLEMS", "ResumeError", "planner_benchmark", "read_report", "render", "to_markdown"]


def planner_benchmark(problems: list[str] | None = None, peers: list[str] | None = None, seeds: int = 10,
                      budget_scale: float = 1.0, jobs: int = 1, speed_sizes: tuple[int, ...] = (10, 50, 200, 500, 1000),
                      speed_cap: float = SPEED_CAP_SECONDS, json_path: Path | None = None, command: str = "",
                      progress: Callable[[dict[str, Any]], None] | None = None,
                      resume: Path | None = None, stations: int = 1) -> dict[str, Any]:
    """Runs the planner benchmark and returns (and, with ``json_path``, keeps writing) its report.

    The JSON is rewritten after every finished run, so a benchmark cut short keeps what it measured.
    With ``resume`` (an earlier report), its finished runs of the same (problem, planner, seed, budget)
    are taken over instead of run again, each marked ``reused_from`` with that report's start time: a
    suite of many CPU-hours can be completed in several sittings. The speed test is always measured anew,
    so its ratios come from one run, and first, alone: nothing else runs while a suggestion is timed.
    ``stations`` runs every campaign with that many experiments in flight (see
    :func:`closedloop.bench.runner.run_one`); only runs made with as many are taken over.
    """
    problems = list(problems or PROBLEMS)
    peers = list(peers or PEERS)
    unknown = [p for p in problems if p not in PROBLEMS] + [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown problem or peer: {', '.join(unknown)}; problems: {', '.join(PROBLEMS)}; "
                         f"peers: {', '.join(PEERS)}")
    missing = {name: reason for name in peers if (reason := PEERS[name].missing())}
    runnable = [p for p in peers if p not in missing]
    budgets = {}
    descriptions = {}
    for name in problems:
        problem = PROBLEMS[name]()
        if budget_scale != 1.0:
            problem = problem.with_budget(int(round(problem.budget * budget_scale)))
        budgets[name] = problem.budget
        descriptions[name] = problem.describe()
    report: dict[str, Any] = {
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "environment": environment(),
        "config": {"problems": problems, "peers": peers, "seeds": seeds, "budget_scale": budget_scale, "jobs": jobs,
                   "stations": stations, "speed_sizes": list(speed_sizes), "speed_cap_seconds": speed_cap},
        "missing_peers": missing,
        "problems": descriptions,
        "summary": {},
        "speed": {"problem": "hartmann6", "seconds_per_suggestion": {}},
        "runs": [],
    }
    speed_records: list[dict[str, Any]] = []
    started = time.perf_counter()

    def done(result: dict[str, Any]) -> None:
        if "speed" in result:
            speed_records.extend(result["speed"])
            report["speed"]["seconds_per_suggestion"] = speed_table(speed_records)
            report["speed"]["measurements"] = speed_records
        else:
            report["runs"].append(result)
            report["summary"] = summarize(report["runs"], budgets)
        report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        if json_path is not None:
            _write(json_path, report)
        if progress is not None:
            progress(result)

    tasks = plan(problems, runnable, seeds, budget_scale, stations)
    if resume is not None:
        earlier = read_report(Path(resume))
        report["config"]["resumed_from"] = {"path": str(resume), "started": earlier.get("started"),
                                            "environment": earlier.get("environment")}
        finished = {(r["problem"], r["peer"], r["seed"], r["budget"], r.get("stations", 1)): r
                    for r in earlier.get("runs", []) if r.get("status") in ("ok", "skipped")}
        remaining = []
        planned = set()
        for task in tasks:
            peer, problem, seed, _, _ = task[1]
            planned.add((problem, peer, seed, budgets[problem], stations))
            previous = finished.get((problem, peer, seed, budgets[problem], stations))
            # a run with the reagents' real names is not a blinded run of the same problem
            if previous is None or previous.get("blinded", False) != descriptions[problem]["blinded"]:
                remaining.append(task)
            else:
                report["runs"].append({**previous, "reused_from": previous.get("reused_from", earlier.get("started"))})
        tasks = remaining
        left = len(set(finished) - planned)
        if left and json_path is not None and Path(json_path).resolve() == Path(resume).resolve():
            # rewriting the report resumed from would drop them: a sitting with another -p or --budget-scale
            # had emptied the file of the earlier sittings' runs, hours of them, without a word
            raise ResumeError(f"--resume {resume} is also --json: {left} of its finished runs are not runs of this "
                             "benchmark (other problems, peers, seeds, budget or stations) and would be lost; "
                             "write the report to another --json file")
        report["summary"] = summarize(report["runs"], budgets)
    if speed_sizes:
        # alone, one suggestion at a time, whatever ``jobs`` is: beside other runs on this 2-core machine
        # ours took 0.61 s per suggestion at 200 Hartmann6 experiments, alone 0.16 s, and the peers' figures
        # moved by other factors, so ratios measured in parallel said little
        run_many(speed_plan(runnable, speed_sizes, speed_cap), 1, done)
    run_many(tasks, jobs, done)
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    if json_path is not None:
        _write(json_path, report)
    return report


class ResumeError(ValueError):
    """An earlier report that cannot be resumed from, found before anything runs or is written."""


def read_report(path: Path) -> dict[str, Any]:
    """An earlier ``--json`` report, for ``resume``; ``ResumeError`` saying what is wrong with a file that is not one.

    A truncated file (a copy cut short) had ended the command with a bare ``JSONDecodeError``, another JSON file
    with an ``AttributeError``.
    """
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResumeError(f"--resume {path} cannot be read as a planner report: {exc}") from None
    runs = report.get("runs") if isinstance(report, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ResumeError(f"--resume {path} is not a planner report of closedloop bench planner --json (no list of runs)")
    keys = ("problem", "peer", "seed", "budget")
    for number, run in enumerate(runs):
        if run.get("status") in ("ok", "skipped") and not all(k in run for k in keys):
            raise ResumeError(f"--resume {path}: run {number} lacks {', '.join(k for k in keys if k not in run)}")
    return report


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_json_default, allow_nan=False))
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# -- tables ---------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _against_ours(entry: dict[str, Any]) -> str:
    paired = entry.get("against_ours")
    if paired is None:
        return "–"
    return f"{paired['ours_better']} / {paired['ours_worse']} ({paired['p_value']:.2f})"


def _stations(report: dict[str, Any]) -> str:
    stations = report["config"].get("stations", 1)
    return f", {stations} experiments always in flight" if stations > 1 else ""


def render(report: dict[str, Any], console: Any) -> None:
    """Rich tables: one per problem (peers side by side), then seconds per suggestion on Hartmann6."""
    from rich.markup import escape
    from rich.table import Table

    # reasons and messages are text, not markup: read as markup, "pip install ... -e '.[bench]'" lost its "[bench]"
    for name, reason in report["missing_peers"].items():
        console.print(f"[yellow]peer {name} missing[/]: {escape(reason)}", highlight=False)
    peers = report["config"]["peers"]
    for problem, by_peer in report["summary"].items():
        info = report["problems"][problem]
        table = Table(title=f"{problem} ({info['dimensions']}-D, {info['budget']} experiments"
                            + (f", noise sd {info['noise_sd']:g}" if info["noise_sd"] else "")
                            + _stations(report) + ")",
                      title_justify="left")
        table.add_column("planner")
        table.add_column("log10 regret", justify="right")
        table.add_column("IQR", justify="right")
        table.add_column("to 1 %", justify="right")
        table.add_column("s/sugg.", justify="right")
        if info["noise_sd"]:
            table.add_column("reported/best", justify="right")
        table.add_column("ours better / worse (p)", justify="right")
        table.add_column("seeds", justify="right")
        for peer in peers:
            entry = by_peer.get(peer)
            if entry is None:
                continue
            label = PEERS[peer].label
            if not entry["seeds"]:
                table.add_row(label, *["–"] * (len(table.columns) - 2), "0",
                              end_section=False)
                console.print(f"  {problem} / {peer}: {'; '.join(entry.get('messages', []))[:300]}", highlight=False,
                              markup=False)
                continue
            iqr = entry["iqr_log10_regret"]
            reached = entry["median_experiments_to_1pct"]
            row = [label, _fmt(entry["median_log10_regret"]), f"{iqr[0]:.2f}…{iqr[1]:.2f}",
                   f">{entry['budget']}" if reached is None else f"{reached:g}",
                   _fmt(entry["median_seconds_per_suggestion"], ".3f")]
            if info["noise_sd"]:
                row.append(_fmt(entry["median_reported_to_true_regret"], ".2f"))
            row += [_against_ours(entry), str(entry["seeds"])]
            table.add_row(*row)
        console.print(table)
    speed = report["speed"]["seconds_per_suggestion"]
    if speed:
        sizes = [str(n) for n in report["config"]["speed_sizes"]]
        table = Table(title="seconds per suggestion on Hartmann6 after N observations", title_justify="left")
        table.add_column("planner")
        for n in sizes:
            table.add_column(f"N={n}", justify="right")
        table.add_column("batch of 4 at 200", justify="right")
        for peer in peers:
            row = speed.get(peer)
            if row is None:
                continue
            cells = [row.get(n) for n in sizes] + [row.get("batch4_at_200")]
            table.add_row(PEERS[peer].label, *[("–" if c is None else f"{c:.3f}" if isinstance(c, float) else
                                               c.split(":")[0]) for c in cells])
        console.print(table)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the command, one table per problem, the speed table, what is missing."""
    peers = report["config"]["peers"]
    lines = [
        "# Planner benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Started {report['started']}, finished {report['finished'] or '(cut short; partial results)'}, "
        f"{report.get('elapsed_seconds', 0):.0f} s. Machine: {report['environment']['cpus']} CPUs (shared). "
        "Packages: " + ", ".join(f"{k} {v}" for k, v in report["environment"]["packages"].items() if v) + ".",
        "",
        "Regret is measured on the noiseless truth from each problem's known optimum: the best feasible experiment "
        "run so far (for two objectives, the maximum hypervolume minus the hypervolume reached). log10 regret is "
        "floored at -8. *to 1 %*: median number of experiments until the regret is within 1 % of the optimum's "
        "range (`>N`: the median run did not get there within its N experiments). *s/sugg.*: median over runs of the "
        "median seconds per suggestion. *reported/best*: median ratio of the regret of the experiment the tool reports "
        "as best (ours and Ax: `best()`; the others: the best noisy reading) to the regret of the truly best experiment "
        "it ran. *ours better / worse (p)*: the seeds on which our final regret was lower / higher than this planner's "
        "(same seed: same blinding and noise; equal regrets are ties), and the two-sided Wilcoxon signed-rank p-value "
        "of the paired differences.",
        "",
    ]
    for name, reason in report["missing_peers"].items():
        lines.append(f"- peer **{name}** missing: {reason}")
    for problem, by_peer in report["summary"].items():
        info = report["problems"][problem]
        noisy = bool(info["noise_sd"])
        lines += ["", f"## {problem}", "",
                  f"{info['source']}. {info['dimensions']}-D, {info['budget']} experiments, optimum {info['optimum']:.6g}"
                  + (f", noise sd {info['noise_sd']:g}" if noisy else "") + _stations(report) + ".", ""]
        header = ["planner", "median log10 regret", "IQR", "to 1 %", "s/sugg.", *(["reported/best"] if noisy else []),
                  "ours better / worse (p)", "seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        notes = []
        for peer in peers:
            entry = by_peer.get(peer)
            if entry is None:
                continue
            if not entry["seeds"]:
                lines.append(f"| {PEERS[peer].label} | – | – | – | – |" + (" – |" if noisy else "") + " – | 0 |")
                notes += [f"- {PEERS[peer].label}: {m[:300]}" for m in entry.get("messages", [])]
                continue
            iqr = entry["iqr_log10_regret"]
            reached = entry["median_experiments_to_1pct"]
            row = [PEERS[peer].label, _fmt(entry["median_log10_regret"]), f"{iqr[0]:.2f} … {iqr[1]:.2f}",
                   f">{entry['budget']}" if reached is None else f"{reached:g}",
                   _fmt(entry["median_seconds_per_suggestion"], ".3f")]
            if noisy:
                row.append(_fmt(entry["median_reported_to_true_regret"], ".2f"))
            row += [_against_ours(entry), str(entry["seeds"])]
            lines.append("| " + " | ".join(row) + " |")
            notes += [f"- {PEERS[peer].label}: {m[:300]}" for m in entry.get("messages", [])]
        lines += [""] + notes if notes else []
    speed = report["speed"]["seconds_per_suggestion"]
    if speed:
        sizes = [str(n) for n in report["config"]["speed_sizes"]]
        lines += ["", "## Seconds per suggestion on Hartmann6", "",
                  "After N observations (N−1 Sobol points and one the planner proposed, so its model is in use); "
                  f"each figure is the median of {SPEED_REPEATS} suggestions, each after its own Sobol history; "
                  f"larger sizes are skipped for a peer once a median took over "
                  f"{report['config']['speed_cap_seconds']:g} s (never for ours).", "",
                  "| planner | " + " | ".join(f"N={n}" for n in sizes) + " | batch of 4 at 200 |",
                  "|" + "---|" * (len(sizes) + 2)]
        for peer in peers:
            row = speed.get(peer)
            if row is None:
                continue
            cells = [row.get(n) for n in sizes] + [row.get("batch4_at_200")]
            lines.append(f"| {PEERS[peer].label} | " + " | ".join(
                "–" if c is None else f"{c:.3f}" if isinstance(c, float) else c for c in cells) + " |")
    return "\n".join(lines) + "\n"
