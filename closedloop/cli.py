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
        _print_problems(exc)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _print_problems(exc: CampaignFileError) -> None:
    from rich.markup import escape  # problems quote values such as [0, 1], which are not markup

    for problem in exc.problems:
        errors.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True, markup=True)


def _default_store(campaign: Campaign) -> Path:
    return Path("results") / f"{campaign.name}.db"


def _setup_logging(verbose: bool, logfile: Path | None = None) -> None:
    handlers: list[logging.Handler] = []
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        from logging.handlers import RotatingFileHandler

        handlers.append(RotatingFileHandler(logfile, maxBytes=20_000_000, backupCount=5))
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
    publish: str = typer.Option("tcp://127.0.0.1:5702", help="PUB endpoint streaming campaign events ('' for none)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", help="control endpoint for pause/resume/stop/cancel/status"),
    secret_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE secret key (NAME.key_secret)"),
    allowed_keys: Optional[Path] = typer.Option(None, help="directory of station public keys allowed to connect"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback endpoint without keys"),
    heartbeat: float = typer.Option(1.0, help="station heartbeat interval in seconds"),
    drain: float = typer.Option(60.0, help="on SIGTERM/stop, seconds to wait for results in flight"),
    logfile: Optional[Path] = typer.Option(None, help="log file (rotated at 20 MB, 5 kept)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run campaigns as a daemon serving station workers (SIGTERM: stop dispatching, drain, exit)."""
    import signal

    campaigns = [_load(path) for path in campaign_files]
    _setup_logging(verbose, logfile)
    from closedloop.daemon import Daemon
    from closedloop.keys import ServerKeys
    from closedloop.store import Store

    if (secret_key is None) != (allowed_keys is None):
        _fail("give both --secret-key and --allowed-keys, or neither", EXIT_BAD_INPUT)
    store_path = store or _default_store(campaigns[0])
    started = time.monotonic()
    try:
        keys = ServerKeys(secret_key, allowed_keys) if secret_key and allowed_keys else None
        the_daemon = Daemon(Store(store_path), campaigns, bind=bind, publish=publish or None, control=control or None,
                            keys=keys, insecure=insecure, heartbeat_s=heartbeat, drain_s=drain)
    except ClosedLoopError as exc:
        _fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: the_daemon.request_stop("SIGTERM"))
    console.print(f"daemon listening on {the_daemon.endpoint}; events on {the_daemon.publish_endpoint}; "
                  f"control on {the_daemon.control_endpoint}; store {store_path}", highlight=False)
    with ProgressView(campaigns[0]) as view:
        the_daemon.on_event = view
        try:
            the_daemon.serve()
        except KeyboardInterrupt:
            pass
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
    campaign: Optional[list[str]] = typer.Option(None, help="campaigns this station serves (default any)"),
    secret_key: Optional[Path] = typer.Option(None, help="this station's CURVE secret key (NAME.key_secret)"),
    server_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE public key (daemon.key)"),
    journal: Optional[Path] = typer.Option(None, help="append the trial id and run uid of every measured trial here"),
    heartbeat: float = typer.Option(1.0, help="heartbeat interval in seconds"),
    logfile: Optional[Path] = typer.Option(None, help="log file (rotated at 20 MB, 5 kept)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a station worker that executes trials for a daemon."""
    import signal

    _setup_logging(verbose, logfile)
    from closedloop.keys import ClientKeys
    from closedloop.worker import StationWorker

    if (secret_key is None) != (server_key is None):
        _fail("give both --secret-key and --server-key, or neither", EXIT_BAD_INPUT)
    keys = ClientKeys(secret_key, server_key) if secret_key and server_key else None
    station = StationWorker(connect, name=name, instruments=instrument or None, campaigns=campaign or None,
                            outbox=outbox, keys=keys, journal=journal, heartbeat_s=heartbeat)
    signal.signal(signal.SIGTERM, lambda *_: station.stop())
    console.print(f"station {station.name} connecting to {connect}", highlight=False)
    try:
        station.run()
    except KeyboardInterrupt:
        station.stop()
    if station.refused:
        _fail(f"the daemon refused this station: {station.refused}")


@app.command()
def validate(campaign_files: list[Path] = typer.Argument(..., help="campaign YAML files")) -> None:
    """Check campaign files and summarize each valid one: parameters, objectives, budget, size of the space."""
    bad = False
    for path in campaign_files:
        try:
            campaign = load_campaign(path)
        except CampaignFileError as exc:
            bad = True
            _print_problems(exc)
            continue
        console.print(f"[green]ok[/] {path}: {campaign.name}", highlight=False)
        for line in campaign.summary():
            console.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def schema() -> None:
    """Print the JSON Schema of campaign files, for editors that check YAML as it is typed."""
    print(json.dumps(Campaign.json_schema(), indent=2))


_CONTROL_HELP = "the daemon's control endpoint"


def _control(endpoint: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    from closedloop.daemon import control_request

    reply = control_request(endpoint, method, params)
    if not reply.get("success"):
        _fail(reply.get("msg") or f"{method} failed")
    return reply


@app.command()
def pause(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default every campaign of the daemon)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", help=_CONTROL_HELP),
) -> None:
    """Dispatch nothing new; experiments in flight finish."""
    console.print(_control(control, "pause", {"campaign": campaign} if campaign else {})["msg"], highlight=False)


@app.command()
def resume(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default every campaign of the daemon)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", help=_CONTROL_HELP),
) -> None:
    """Dispatch again after a pause."""
    console.print(_control(control, "resume", {"campaign": campaign} if campaign else {})["msg"], highlight=False)


@app.command()
def stop(control: str = typer.Option("tcp://127.0.0.1:5700", help=_CONTROL_HELP)) -> None:
    """Stop the daemon gracefully: no new dispatch, wait for results in flight, exit."""
    console.print(_control(control, "stop", {})["msg"], highlight=False)


@app.command()
def cancel(
    trial: int = typer.Argument(..., help="trial number"),
    campaign: Optional[str] = typer.Option(None, help="campaign name (needed when the daemon runs several)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", help=_CONTROL_HELP),
) -> None:
    """Cancel a trial: stop its run on the station and record it failed."""
    import getpass

    params: dict[str, Any] = {"trial": trial, "by": getpass.getuser()}
    if campaign:
        params["campaign"] = campaign
    console.print(_control(control, "cancel", params)["msg"], highlight=False)


@app.command()
def health(control: str = typer.Option("tcp://127.0.0.1:5700", help=_CONTROL_HELP),
           timeout: float = typer.Option(3.0, help="seconds to wait for the answer")) -> None:
    """Exit 0 if the daemon answers from its loop, 1 if not (for monitoring)."""
    from closedloop.daemon import health as check

    reply = check(control, timeout)
    console.print(json.dumps(reply), highlight=False)
    if not reply.get("healthy"):
        raise typer.Exit(1)


keys_app = typer.Typer(help="CurveZMQ keys for the daemon and its stations (see docs/daemon.md).")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(name: str = typer.Argument(..., help="key name, e.g. daemon or station-a"),
             directory: Path = typer.Option(Path("keys"), "--dir", help="where to write NAME.key and NAME.key_secret")) -> None:
    """Make a key pair: NAME.key (public, share it) and NAME.key_secret (keep it on this machine)."""
    from closedloop.keys import new_keypair

    public, secret = new_keypair(directory, name)
    console.print(f"public key {public}\nsecret key {secret}", highlight=False)


@app.command("bench-loop")
def bench_loop(
    experiments: int = typer.Option(100, help="experiments in the utilization run"),
    stations: int = typer.Option(4, help="stations in the utilization run"),
    seconds: float = typer.Option(1.0, help="duration of one experiment in the utilization run"),
    intake: int = typer.Option(5000, help="results in the intake run"),
    overhead: int = typer.Option(200, help="experiments in the overhead run"),
    quick: bool = typer.Option(False, help="skip the utilization run (BoTorch, ~30 s)"),
) -> None:
    """Benchmark the loop: overhead per experiment, result intake, station utilization."""
    from closedloop.bench.loop import main as bench

    bench(experiments=experiments, stations=stations, seconds=seconds, intake=intake, overhead=overhead,
          utilization=not quick, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
