"""The ``closedloop`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from closedloop.campaign import Campaign, CampaignFileError, load_campaign
from closedloop.errors import ClosedLoopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Closed-loop autonomous experimentation engine.")
console = Console()
errors = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = 1) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(path: Path) -> Campaign:
    try:
        return load_campaign(path)
    except CampaignFileError as exc:
        for problem in exc.problems:
            errors.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _default_store(campaign: Campaign) -> Path:
    return Path("results") / f"{campaign.name}.db"


def _setup_logging(verbose: bool, logfile: Path | None = None) -> None:
    handlers: list[logging.Handler] = []
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", handlers=handlers
                        or [logging.NullHandler()], force=True)


def _format_values(values: dict[str, Any] | None) -> str:
    if not values:
        return "-"
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class ProgressView:
    """Live progress: a bar over the budget and the best so far on a terminal; one line per event otherwise."""

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.best = "-"

    def __enter__(self) -> ProgressView:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("best {task.fields[best]}"), console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.campaign.name, total=self.campaign.budget.experiments, best="-")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, kind: str, details: dict[str, Any]) -> None:
        if kind in ("trial_completed", "trial_failed"):
            best = details.get("best")
            if best:
                self.best = f"{_format_values(best['values'])} (#{best['trial']})"
            if self.progress is not None:
                self.progress.update(self.task, completed=details["finished"], best=self.best)
                line = (f"  #{details['trial']:>3} {_format_values(details.get('values'))}"
                        if kind == "trial_completed" else f"  #{details['trial']:>3} failed: {details['error']}")
                self.progress.console.print(line, highlight=False)
            else:
                total = self.campaign.budget.experiments
                outcome = _format_values(details.get("values")) if kind == "trial_completed" else f"failed: {details['error']}"
                console.print(f"[{details['finished']}/{total}] experiment {details['trial']}: {outcome}; best {self.best}",
                              highlight=False)
        elif kind == "campaign_started" and details.get("finished"):
            console.print(f"resuming {details['campaign']}: {details['finished']} experiments already done", highlight=False)
            if self.progress is not None:
                self.progress.update(self.task, completed=details["finished"])
        elif kind == "goal_reached":
            console.print(f"goal reached: {details['rule']}", highlight=False)


def _summary(campaign: Campaign, store_path: Path, run: Any, seconds: float) -> None:
    counts = run.store.counts(run.id)
    best = run.planner.best()
    console.print(f"\n[bold]{campaign.name}[/]: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed "
                  f"in {seconds:.1f} s")
    if best is None:
        console.print("no experiment completed")
    else:
        console.print(f"best experiment: #{best.trial}  {_format_values(best.values)}")
        console.print(f"  parameters: {_format_values(best.parameters)}", highlight=False)
    console.print(f"results stored in {store_path}")


@app.command()
def run(
    campaign_file: Path = typer.Argument(..., help="campaign YAML file"),
    store: Optional[Path] = typer.Option(None, help="SQLite file of results (default results/NAME.db)"),
    seed: Optional[int] = typer.Option(None, help="override the planner's seed"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every transition to stderr"),
) -> None:
    """Run a campaign here: the daemon and one station worker on loopback."""
    campaign = _load(campaign_file)
    if seed is not None:
        campaign = campaign.model_copy(update={"planner": campaign.planner.model_copy(update={"seed": seed})})
    _setup_logging(verbose)
    from closedloop.daemon import run_embedded
    from closedloop.store import Store

    store_path = store or _default_store(campaign)
    started = time.monotonic()
    try:
        the_store = Store(store_path)
        with ProgressView(campaign) as view:
            result = run_embedded(campaign, the_store, outbox=str(store_path) + ".outbox", on_event=view)
    except ClosedLoopError as exc:
        _fail(str(exc))
    _summary(campaign, store_path, result, time.monotonic() - started)


@app.command()
def daemon(
    campaign_files: list[Path] = typer.Argument(..., help="campaign YAML files to run"),
    bind: str = typer.Option("tcp://127.0.0.1:5701", help="ROUTER endpoint stations connect to"),
    store: Optional[Path] = typer.Option(None, help="store file or URL (default results/NAME.db of the first campaign)"),
    logfile: Optional[Path] = typer.Option(None, help="log file"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run campaigns as a daemon serving station workers."""
    campaigns = [_load(path) for path in campaign_files]
    _setup_logging(verbose, logfile)
    from closedloop.daemon import Daemon
    from closedloop.store import Store

    store_path = store or _default_store(campaigns[0])
    started = time.monotonic()
    try:
        the_daemon = Daemon(Store(store_path), campaigns, bind=bind)
    except ClosedLoopError as exc:
        _fail(str(exc))
    console.print(f"daemon listening on {the_daemon.endpoint}; store {store_path}", highlight=False)
    with ProgressView(campaigns[0]) as view:
        the_daemon.on_event = view
        try:
            the_daemon.serve()
        finally:
            the_daemon.close()
    for run_state in the_daemon.runs.values():
        _summary(run_state.campaign, store_path, run_state, time.monotonic() - started)


@app.command()
def worker(
    connect: str = typer.Option("tcp://127.0.0.1:5701", help="the daemon's endpoint"),
    name: Optional[str] = typer.Option(None, help="station name (default HOST-PID)"),
    instrument: Optional[list[str]] = typer.Option(None, help="instrument import paths this station drives (default any)"),
    outbox: Optional[Path] = typer.Option(None, help="outbox file of unacknowledged results"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a station worker that executes trials for a daemon."""
    _setup_logging(verbose)
    from closedloop.worker import StationWorker

    station = StationWorker(connect, name=name, instruments=instrument or None, outbox=outbox)
    console.print(f"station {station.name} connecting to {connect}", highlight=False)
    try:
        station.run()
    except KeyboardInterrupt:
        station.stop()


@app.command()
def validate(campaign_files: list[Path] = typer.Argument(..., help="campaign YAML files")) -> None:
    """Check campaign files and summarize each valid one."""
    bad = False
    for path in campaign_files:
        try:
            campaign = load_campaign(path)
        except CampaignFileError as exc:
            bad = True
            for problem in exc.problems:
                errors.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
            continue
        objectives = ", ".join(f"{goal.goal} {name}" for name, goal in campaign.objectives.items())
        console.print(f"[green]ok[/] {path}: {campaign.name}", highlight=False)
        for name, parameter in campaign.parameters.items():
            detail = parameter.model_dump(exclude={"type"}, exclude_none=True)
            console.print(f"    {name}: {parameter.type} {json.dumps(detail)}", highlight=False)
        console.print(f"    objectives: {objectives}; budget: {campaign.budget.experiments} experiments", highlight=False)
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
