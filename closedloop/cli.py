"""The ``closedloop`` command line."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from closedloop.campaign import Campaign, CampaignFileError, load_campaign
from closedloop.errors import CampaignError, ClosedLoopError, NotAStore
from closedloop.view import ProgressView
from closedloop.view import format_values as _format_values

# Printed text is values and messages, not markup or emoji codes: a categorical solvent '[emim][OTf]' printed as
# '[OTf]' (read as a style tag), and a failure of 'labdrv:Robot: ...' as 'labdrv🤖 ...'
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)


class _Commands(TyperGroup):
    """Every command's error becomes one line and exit code 1, or 2 (EXIT_BAD_INPUT) for a value that does not fit
    the campaign (:class:`CampaignError`: a trial number, an edit out of bounds); ``--debug`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        # typer.Exit is no click Exit, and typer (0.29) raises usage errors from its own copy of click, whose
        # exceptions derive from typer.TyperException: caught below they were "internal errors" with exit 1
        except (click.exceptions.Exit, typer.Exit, click.exceptions.Abort, typer.Abort, click.ClickException,
                typer.TyperException):
            raise
        except KeyboardInterrupt:
            errors.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # the reader went away (`closedloop show C | head`): no error of the command's, so no error line; stdout
            # goes to nowhere, or Python's flush at exit fails again. 141 as a process ended by SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            from sqlalchemy.exc import DBAPIError

            if isinstance(exc, ClosedLoopError):
                message = str(exc)
            elif isinstance(exc, DBAPIError):
                from closedloop.store import LOCKED, displayed

                # the driver's reason alone, on one line: SQLAlchemy's text adds the statement, its parameters and
                # a link, four "error:" lines for a full disk
                reason = " ".join(str(exc.orig or exc).split())
                reason = LOCKED if reason == "database is locked" else reason
                store = ctx.meta.get(_STORE_META)  # the command's context shares its meta with this one
                which = f"the database of store {displayed(store)}" if store else "the store's database"
                message = (f"{which} failed: {reason} ({type(exc.orig or exc).__name__}; "
                           "run with --debug for the traceback)")
            else:
                message = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
            from rich.markup import escape  # messages quote values such as '[bmim]PF6', which are not markup

            for line in message.splitlines() or [type(exc).__name__]:
                errors.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(EXIT_BAD_INPUT if isinstance(exc, (CampaignError, NotAStore)) else 1) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Closed-loop autonomous experimentation engine.",
                  cls=_Commands, pretty_exceptions_enable=False)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    """Closed-loop autonomous experimentation engine."""
    # library warnings (an optimizer restart, a deprecation) go to the log, not over the scientist's view
    if not debug:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addHandler(logging.NullHandler())  # never printed by logging's last resort


EXIT_BAD_INPUT = 2

#: the key, in the meta that a command's click context shares with the app's, of the store the command works on
_STORE_META = "closedloop.store"


def _name_store(ctx: typer.Context, location: Any) -> Any:
    """Note the store a command works on (its ``--store`` option's callback), for the one line of a database error,
    which is caught outside the command. Returns ``location``, as a callback must."""
    if location:
        ctx.meta[_STORE_META] = str(location)
    return location


def _endpoint(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """An endpoint option's callback: a bad endpoint is one line naming the option, and exit 2."""
    from closedloop.protocol import endpoint_problem

    # the daemon's own endpoints are listened on: their host must be this machine's, checked before its store opens
    problem = endpoint_problem(value or "", listen=ctx.info_name == "daemon")
    if problem:
        _fail(f"{param.opts[0]} {value!r}: {problem}", EXIT_BAD_INPUT)
    return value


def _station_name(value: str | None) -> str | None:
    """A station's ``--name`` callback: a name that cannot be shown (control characters, too long) is exit 2."""
    from closedloop.protocol import station_name_problem

    if value is not None and (problem := station_name_problem(value)) is not None:
        _fail(f"--name: {problem}", EXIT_BAD_INPUT)
    return value


def _endpoint_or_none(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """As :func:`_endpoint`, for the options where '' (or no value) means none."""
    return _endpoint(ctx, param, value) if value else value


def _deaf_to_stops_at_exit() -> None:
    """From the exit hooks on, SIGTERM and Ctrl-C are ignored: a long-running command's work is over, nothing is left
    to stop, and its exit code is decided. The interpreter's shutdown puts the default action back for a Python
    handler, not for SIG_IGN, and a second SIGTERM in the 0.3 s (worker) to 1.8 s (daemon) it then spent freeing
    modules killed the process (exit -15). Registered as the work ends: the exit hooks run newest first."""
    import atexit

    atexit.register(lambda: [signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)])


class StopNow(KeyboardInterrupt):
    """Ctrl-C as an operator's "now": any command's (see :func:`main`), and the second signal to a long-running one
    (exit 130). Its own class, because CPython (3.11, as measured) takes a KeyboardInterrupt of exactly that class that
    passes through an ``exec`` or ``eval`` of a string (a dataclass or namedtuple being built, an import) for
    unhandled even when it is caught, and under ``python -m closedloop.cli`` then ends the process by SIGINT (exit -2)
    instead of the code the command chose (130; 0 for ``watch`` and ``dashboard``)."""


def _ctrl_c(signum: int, frame: Any) -> None:
    raise StopNow


def _stop_on_signals(stop: Callable[[str], Any], hint: str, now: Callable[[], Any] | None = None) -> None:
    """SIGTERM and a first Ctrl-C call ``stop`` with the signal's name (a first Ctrl-C also prints ``hint``); a second
    Ctrl-C calls ``now``, or without it raises :class:`StopNow`."""
    interrupted: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            interrupted.append(signum)
            if len(interrupted) > 1 and now is not None:
                now()
                return
            if len(interrupted) > 1:
                raise StopNow
            console.print(hint, highlight=False)
        stop("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape  # messages quote what was typed ('show [emim]screen'), which is not markup

    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _station_refused(reason: str) -> None:
    """End a station the daemon refused. Every refusal that stops a station is its setup's (a key that admits
    another name, a protocol version or release the daemon does not speak): started again unchanged it is refused
    again, so it exits 2 as bad input does, not 1 as a failure that a restart may cure (a lost connection, a
    panicked RunEngine). The one refusal a retry answers, "unregistered", the station answers itself with a hello."""
    _fail(f"the daemon refused this station: {reason}", EXIT_BAD_INPUT)


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


class _LogFile(RotatingFileHandler):
    """Rotates itself, and reopens its path when something else moved or deleted the file: after logrotate's
    rename (without copytruncate) or an operator's `rm`, a daemon wrote on into the renamed or deleted file, and
    its --logfile was gone for days (until 20 MB more)."""

    _unwritable = False  # said once on stderr that the file cannot be written, until a line is written again
    _failed = False  # the line being written failed

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:
            try:
                moved = not os.path.samestat(os.stat(self.baseFilename), os.fstat(self.stream.fileno()))
            except OSError:
                moved = True
            if moved:
                self._drop_stream()
        self._failed = False
        super().emit(record)
        if not self._failed:
            self._unwritable = False

    def handleError(self, record: logging.LogRecord) -> None:
        # a full disk made logging print '--- Logging error ---' and a traceback on stderr for every line logged
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        self._failed = True
        self._drop_stream()  # the lines buffered for a write that failed are lost; a new line opens the file again
        if not self._unwritable:
            self._unwritable = True
            sys.stderr.write(f"closedloop: cannot write the log file {self.baseFilename}: "
                             f"{error.strerror or error}; its lines are lost until it can be written again "
                             "(free space there)\n")

    def _drop_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass  # what it held could not be written
            self.stream = None  # type: ignore[assignment]  # FileHandler.emit opens the path again


def _setup_logging(verbose: bool, logfile: Path | None = None, terminal: str | None = None) -> None:
    """Log to ``logfile`` and, with ``verbose``, everything to stderr. Without ``verbose``, ``terminal`` names a
    logger whose lines reach stderr all the same, with every logger's warnings: a command with no progress view of
    its own (a station) showed "connecting" and then nothing for days, whatever its experiments or daemon did."""
    handlers: list[logging.Handler] = []
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_LogFile(logfile, maxBytes=20_000_000, backupCount=5))
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    elif terminal is not None:
        shown = logging.StreamHandler(sys.stderr)
        # library warnings (py.warnings: a deprecation) stay off the terminal, as _options keeps them off every view
        shown.addFilter(lambda record: record.name == terminal or record.name.startswith(terminal + ".")
                        or (record.levelno >= logging.WARNING and record.name != "py.warnings"))
        handlers.append(shown)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", handlers=handlers
                        or [logging.NullHandler()], force=True)
    # a station's log ran days on end at four lines of the RunEngine's state per experiment, most of the file, and
    # every start logged a dozen lines of the store's migrations; their warnings still come through
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("bluesky").setLevel(logging.INFO if verbose else logging.WARNING)


def _summary(campaign: Campaign, store_path: Path | str, run: Any, seconds: float) -> None:
    from closedloop import report
    from closedloop.store import displayed

    counts = run.store.counts(run.id)
    # from the store, not the running planner, which may not have taken in the last results yet
    best = report.best(run.store, campaign.name)
    console.print(f"\n[bold]{campaign.name}[/]: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed "
                  f"in {seconds:.1f} s")
    if best is None and counts.get("completed", 0) and campaign.outcome_constraints:
        console.print(f"no feasible experiment yet: none of the {counts['completed']} completed meets the outcome "
                      "constraints", soft_wrap=True)
    elif best is None and counts.get("failed", 0):
        console.print(f"no experiment completed: all {counts['failed']} failed; `closedloop show {campaign.name}` "
                      "lists their errors", soft_wrap=True, highlight=False)
    elif best is None:
        console.print("no experiment completed")
    elif len(campaign.objectives) > 1:
        # several objectives have a front, not a best: one "best experiment" hid every trade-off found
        front = report.pareto_front(run.store, campaign.name)
        console.print(f"Pareto front of {', '.join(campaign.objectives)}: {len(front)} experiment(s)", highlight=False)
        for r in front:
            console.print(f"  #{r.trial}  {_format_values(r.values)}; {_format_values(r.parameters)}", highlight=False,
                          markup=False)
    else:
        console.print(f"best experiment: #{best.trial}  {_format_values(best.values)}")
        console.print(f"  parameters: {_format_values(best.parameters)}", highlight=False, markup=False)
    console.print(f"results stored in {displayed(store_path)}")  # a database URL without its password


@app.command()
def run(
    ctx: typer.Context,
    campaign_file: Path = typer.Argument(..., help="campaign YAML file"),
    store: Optional[Path] = typer.Option(None, help="SQLite file of results (default results/NAME.db)",
                                         callback=_name_store),
    # the campaign's own bounds (PlannerSettings.seed): model_copy below checks nothing, and a seed out of them ran
    # the whole campaign, then the store's copy of the file failed to load
    seed: Optional[int] = typer.Option(None, min=0, max=2**63 - 1, help="override the planner's seed"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every transition to stderr"),
) -> None:
    """Run a campaign here: the daemon and one station worker on loopback."""
    campaign = _load(campaign_file)
    if seed is not None:
        campaign = campaign.model_copy(update={"planner": campaign.planner.model_copy(update={"seed": seed})})
    _setup_logging(verbose)
    from closedloop.daemon import run_embedded
    from closedloop.store import Store

    store_path = _name_store(ctx, store or _default_store(campaign))
    started = time.monotonic()
    stopping: list[str] = []
    summing_up = False

    def stop(signum: int, frame: Any) -> None:
        stopping.append("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)
        # asked twice: the station's thread gets a few seconds to end its run, then the process exits; once only: a
        # third must not cut short the threads' ending that the second began
        if len(stopping) == 2:
            raise StopNow
        if len(stopping) == 1 and not summing_up:
            console.print(f"{stopping[0]}: no new experiment; waiting for those in progress to finish "
                          "(Ctrl-C again to stop sooner: an experiment cut short runs again when the campaign resumes)",
                          highlight=False)

    # Ctrl-C, or SIGTERM from a batch system, ends the experiment in progress rather than cutting it off: its
    # sample is spent, and its result is kept. Kept through the summary: with the default handler back, a second
    # SIGTERM while it rebuilt an Ax planner from every result killed the process (exit -15)
    before = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            the_store = Store(store_path)
            with ProgressView(campaign, the_store, console) as view:
                result = run_embedded(campaign, the_store, outbox=str(store_path) + ".outbox", on_event=view,
                                      should_stop=lambda: bool(stopping), drain_s=math.inf)
        except ClosedLoopError as exc:
            _fail(str(exc), EXIT_BAD_INPUT if isinstance(exc, NotAStore) else 1)
        asked = stopping[:1]  # what stopped the run; a first signal from here on stops nothing
        summing_up = True
        _summary(campaign, store_path, result, time.monotonic() - started)
        if asked and result.store.campaign_row(result.id).status != "completed":
            console.print(f"stopped by {asked[0]} before the campaign's end: run the same command again to go on",
                          highlight=False)
            if asked[0] == "Ctrl-C":
                raise typer.Exit(130)
        counts = result.store.counts(result.id)
        if counts.get("failed", 0) and not counts.get("completed", 0):
            # a batch job or script read exit 0 as a campaign run, when every experiment had failed (an instrument
            # switched off, a driver's bug): the campaign ran, but gave nothing to go on
            raise typer.Exit(1)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        _deaf_to_stops_at_exit()


@app.command()
def daemon(
    ctx: typer.Context,
    campaign_files: list[Path] = typer.Argument(..., help="campaign YAML files to run"),
    bind: str = typer.Option("tcp://127.0.0.1:5701", callback=_endpoint, help="ROUTER endpoint stations connect to"),
    # a str, not a Path: Path collapses '//' and made postgresql+psycopg://... a SQLite file under a folder of that name
    store: Optional[str] = typer.Option(None, help="store file or URL (default results/NAME.db of the first campaign)",
                                        callback=_name_store),
    publish: str = typer.Option("tcp://127.0.0.1:5702", callback=_endpoint_or_none, help="PUB endpoint streaming campaign events ('' for none)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint_or_none, help="control endpoint for pause/resume/stop/cancel/status"),
    secret_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE secret key (NAME.key_secret)"),
    allowed_keys: Optional[Path] = typer.Option(None, help="directory of station public keys allowed to connect"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback endpoint without keys"),
    heartbeat: float = typer.Option(1.0, help="station heartbeat interval in seconds"),
    drain: float = typer.Option(60.0, help="on SIGTERM/stop, seconds to wait for results in flight"),
    dashboard: Optional[int] = typer.Option(None, "--dashboard", help="serve the live dashboard on this port "
                                            "(see docs/dashboard.md)"),
    dashboard_host: str = typer.Option("127.0.0.1", help="the dashboard's interface (beyond loopback it is read-only "
                                       "without --dashboard-token)"),
    # as `closedloop dashboard --token`: beyond loopback a daemon's dashboard had no way to be given one, and its
    # refusals told the operator to start it with an option the daemon did not have
    dashboard_token: Optional[str] = typer.Option(None, envvar="CLOSEDLOOP_DASHBOARD_TOKEN", show_envvar=True,
                                                  help="secret that allows control from beyond loopback (?token=...); "
                                                  "give it in the environment, not on the command line"),
    logfile: Optional[Path] = typer.Option(None, help="log file (rotated at 20 MB, 5 kept)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run campaigns as a daemon serving station workers (SIGTERM: stop dispatching, drain, exit)."""
    campaigns = [_load(path) for path in campaign_files]
    _setup_logging(verbose, logfile)
    from closedloop.daemon import Daemon
    from closedloop.keys import ServerKeys, Unprotected
    from closedloop.store import Store

    if (secret_key is None) != (allowed_keys is None):
        _fail("give both --secret-key and --allowed-keys, or neither", EXIT_BAD_INPUT)
    store_path = _name_store(ctx, store or _default_store(campaigns[0]))
    started = time.monotonic()
    board_socket = None
    try:
        keys = ServerKeys(secret_key, allowed_keys) if secret_key and allowed_keys else None
        if dashboard is not None:
            from closedloop.dashboard.app import listening_socket

            board_socket = listening_socket(dashboard_host, dashboard)  # like the daemon's own, before any write
        the_store = Store(store_path)
        with _unless_refused(the_store):
            the_daemon = Daemon(the_store, campaigns, bind=bind, publish=publish or None, control=control or None,
                                keys=keys, insecure=insecure, heartbeat_s=heartbeat, drain_s=drain)
    except ClosedLoopError as exc:
        if board_socket is not None:
            board_socket.close()
        _fail(str(exc), EXIT_BAD_INPUT if isinstance(exc, (Unprotected, NotAStore)) else 1)
    # Ctrl-C left the serve loop at once, the experiments in flight left 'dispatched' for the next start to
    # reconcile, where SIGTERM waits for them (and Ctrl-C to a worker or `run` is that same stop)
    _stop_on_signals(the_daemon.request_stop, "Ctrl-C: no new experiment; waiting for those in flight (Ctrl-C again "
                     "to stop at once: they are reconciled at the next start)")
    # -- issue 9: the live dashboard in this process, fed by this daemon's events and control socket
    # (with keys its events go to CURVE subscribers alone, and this dashboard holds no allowed key: it polls)
    board = _start_dashboard(store_path, the_daemon.control_endpoint, None if keys else the_daemon.publish_endpoint,
                             dashboard_host, dashboard, token=dashboard_token,
                             listening=board_socket) if dashboard is not None else None
    # -- end issue 9
    console.print(f"daemon listening on {the_daemon.endpoint}; events on {the_daemon.publish_endpoint or 'no socket'}; "
                  f"control on {the_daemon.control_endpoint or 'no socket'}; store {the_store.display}", highlight=False)
    with ProgressView(campaigns, the_daemon.store, console) as view:
        the_daemon.on_event = view
        try:
            the_daemon.serve()
        finally:
            the_daemon.close()
            _deaf_to_stops_at_exit()
    if board is not None:  # issue 9
        board.stop()
    for run_state in the_daemon.runs.values():
        _summary(run_state.campaign, store_path, run_state, time.monotonic() - started)


@app.command()
def worker(
    connect: str = typer.Option("tcp://127.0.0.1:5701", callback=_endpoint, help="the daemon's endpoint"),
    name: Optional[str] = typer.Option(None, help="station name (default: the --secret-key file's name, else HOST-PID)",
                                       callback=_station_name),
    instrument: Optional[list[str]] = typer.Option(None, help="instrument import paths this station drives (default any)"),
    outbox: Optional[Path] = typer.Option(None, help="outbox file of unacknowledged results"),
    campaign: Optional[list[str]] = typer.Option(None, help="campaigns this station serves (default any)"),
    source: Optional[list[str]] = typer.Option(None, help="campaign sources this station serves, e.g. robot "
                                               "(default any; see docs/scaling.md)"),
    secret_key: Optional[Path] = typer.Option(None, help="this station's CURVE secret key (NAME.key_secret)"),
    server_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE public key (daemon.key)"),
    journal: Optional[Path] = typer.Option(None, help="append the trial id and run uid of every measured trial here"),
    heartbeat: float = typer.Option(1.0, help="heartbeat interval in seconds"),
    logfile: Optional[Path] = typer.Option(None, help="log file (rotated at 20 MB, 5 kept)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a station worker that executes trials for a daemon (SIGTERM or Ctrl-C: finish the run in progress,
    deliver it, exit; Ctrl-C again: abort that run, hand its trial back to the daemon, exit 130)."""
    _setup_logging(verbose, logfile, terminal="closedloop.worker")
    from closedloop.keys import ClientKeys
    from closedloop.worker import StationWorker

    if (secret_key is None) != (server_key is None):
        _fail("give both --secret-key and --server-key, or neither", EXIT_BAD_INPUT)
    keys = ClientKeys(secret_key, server_key) if secret_key and server_key else None
    station = StationWorker(connect, name=name, instruments=instrument or None, campaigns=campaign or None,
                            sources=source or None, outbox=outbox, keys=keys, journal=journal, heartbeat_s=heartbeat)
    # Ctrl-C raised KeyboardInterrupt in this thread, which runs the RunEngine (with no SIGINT handler of its own,
    # context_managers=[]): it panicked, and the station failed every trial sent to it until killed
    _stop_on_signals(lambda _: station.stop(), "Ctrl-C: the run in progress finishes and is delivered (Ctrl-C again "
                     "to cut it short: its trial goes back to the daemon's queue)", now=station.abort)
    console.print(f"station {station.name} connecting to {connect}", highlight=False)
    try:
        station.run()
    finally:
        _deaf_to_stops_at_exit()
    if station.refused:
        _station_refused(station.refused)
    if station.aborted:
        raise typer.Exit(130)


@app.command("compute-station")
def compute_station(
    connect: str = typer.Option("tcp://127.0.0.1:5701", callback=_endpoint, help="the daemon's endpoint"),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler address (default: the campaign's "
                                            "instrument.options.scheduler, else DASK_SCHEDULER_ADDRESS, else a local cluster)"),
    capacity: Optional[int] = typer.Option(None, min=1, help="experiments at once (default: the cluster's worker threads)"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes of the local cluster (default: one per "
                                          "experiment at once, so a hung function's can be restarted alone)"),
    name: Optional[str] = typer.Option(None, help="station name (default: the --secret-key file's name, else compute-HOST-PID)",
                                       callback=_station_name),
    instrument: Optional[list[str]] = typer.Option(None, help="instruments served, e.g. 'function:pkg.mod:f' (default any)"),
    source: Optional[list[str]] = typer.Option(None, help="campaign sources this station serves, e.g. simulation "
                                               "(default any)"),
    outbox: Optional[Path] = typer.Option(None, help="outbox file of unacknowledged results"),
    secret_key: Optional[Path] = typer.Option(None, help="this station's CURVE secret key (NAME.key_secret)"),
    server_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE public key (daemon.key)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    logfile: Optional[Path] = typer.Option(None, help="log file (rotated at 20 MB, 5 kept)"),
) -> None:
    """Run a compute station: computational experiments (functions, commands) on a Dask cluster (SIGTERM or Ctrl-C:
    finish and deliver the experiments computing, hand back the rest, exit; Ctrl-C again: cancel them, hand their
    trials back to the daemon, exit 130)."""
    _setup_logging(verbose, logfile, terminal="closedloop.compute")
    from closedloop.compute import ComputeStation
    from closedloop.keys import ClientKeys

    if (secret_key is None) != (server_key is None):
        _fail("give both --secret-key and --server-key, or neither", EXIT_BAD_INPUT)
    keys = ClientKeys(secret_key, server_key) if secret_key and server_key else None
    station = ComputeStation(connect, name=name, capacity=capacity, instruments=instrument or None,
                             sources=source or None, outbox=outbox,
                             scheduler=scheduler, local_workers=workers, keys=keys)
    # Ctrl-C cancelled the experiments computing and left without a word: the daemon declared the station lost
    # and, with no retries, abandoned them. A second Ctrl-C (an operator's "now") cancels them and says so first
    _stop_on_signals(lambda _: station.stop(),
                     "Ctrl-C: the experiments computing finish and are delivered (Ctrl-C again to cancel them: their "
                     "trials go back to the daemon's queue)", now=station.abort)
    console.print(f"compute station {station.name} connecting to {connect}", highlight=False)
    try:
        station.run()
    finally:
        _deaf_to_stops_at_exit()
    if station.refused:
        _station_refused(station.refused)
    if station.aborted:
        raise typer.Exit(130)


@app.command()
def validate(
    campaign_files: list[Path] = typer.Argument(..., help="campaign YAML files"),
    connect: bool = typer.Option(False, "--connect", help="also build each driver's binding as a station does, "
                                 "connect its devices and check the campaign against them (nothing moves)"),
    timeout: float = typer.Option(10.0, min=0.1, help="with --connect: seconds to wait for an instrument"),
) -> None:
    """Check campaign files and summarize each valid one: parameters, objectives, budget, size of the space.
    Exit 2 when a file has problems, else 1 when --connect could not reach an instrument."""
    from rich.markup import escape  # a folder such as runs[abc] is not a style tag

    live = None
    if connect:
        from closedloop.connect import LiveInstruments

        # the problems are the output: a driver's log of its tries ("trying again with new devices", from one still
        # connecting when the time is up) came after the line saying it could not connect
        _setup_logging(verbose=False)
        live = LiveInstruments(timeout)
    bad = unreachable = False
    for path in campaign_files:
        said = len(live.unreachable) if live is not None else 0
        campaign = None
        try:
            campaign = load_campaign(path, connect=live)
        except CampaignFileError as exc:
            bad = True
            _print_problems(exc)
        # an instrument out of reach is not the file's fault: its own line, and exit 1 rather than 2
        for line in live.unreachable[said:] if live is not None else []:
            unreachable = True
            errors.print(f"[bold red]error:[/] {escape(f'{path}: {line}')}", highlight=False, soft_wrap=True)
        if campaign is None or (live is not None and live.unreachable[said:]):
            continue
        console.print(f"[green]ok[/] {escape(f'{path}: {campaign.name}')}", highlight=False, soft_wrap=True)
        for line in campaign.summary():
            console.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)
    if unreachable:
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of campaign files, for editors that check YAML as it is typed."""
    print(json.dumps(Campaign.json_schema(), indent=2))


# -- what a scientist sees (issue 7): status, list, show, export, people in the loop, report ---------

_STORE_HELP = "store file or URL (default results/NAME.db, else the results/*.db that holds the campaign)"


def _find_store(campaign: str | None, store: str | None, read_only: bool = False) -> tuple[Any, str | None]:
    """The store to read and the campaign's name in it; never creates a store file by looking for one, and with
    ``read_only`` (the commands that only look) writes nothing to it."""
    from closedloop.errors import StoreError
    from closedloop.store import Store

    if store is not None:
        if "://" not in store and not Path(store).exists():
            raise StoreError(f"no store {store}")
        return Store(store, read_only=read_only), campaign
    if campaign is None:
        found = sorted(Path("results").glob("*.db"))
        if len(found) != 1:
            raise StoreError("give --store: " + (f"{len(found)} stores in results/" if found else "no results/*.db here"))
        return Store(found[0], read_only=read_only), None
    candidates = [Path("results") / f"{campaign}.db"] + sorted(Path("results").glob("*.db"))
    for path in dict.fromkeys(candidates):
        if path.exists():
            try:
                the_store = Store(path, read_only=True)
                held = any(row.name == campaign for row in the_store.campaigns())
                the_store.close()
            except StoreError:  # another program's database in results/: not where the campaign is
                continue
            if held:
                return Store(path, read_only=read_only), campaign
    raise StoreError(f"no campaign {campaign!r} in results/*.db; give --store")


def _campaign_to_start(campaign: str, store: str | None) -> tuple[Any, Any]:
    """For commands that may start a campaign: CAMPAIGN is a campaign file (its spec is returned, for the
    command to write once it has checked its request) or the name of a stored one."""
    from closedloop.store import Store

    if campaign.endswith((".yaml", ".yml")) or Path(campaign).is_file():
        spec = _load(Path(campaign))
        return Store(store or _default_store(spec)), spec
    the_store, name = _find_store(campaign, store)
    return the_store, name or campaign


@contextmanager
def _unless_refused(the_store: Any) -> Iterator[None]:
    """Run a command's request on ``the_store``; if it is refused, a store the command made for it goes (an import
    whose every row was bad left an empty store and its lock file)."""
    try:
        yield
    except BaseException:
        the_store.discard_if_unused()
        raise


def _campaign_names(the_store: Any, campaign: str | None) -> list[str]:
    return [campaign] if campaign else [row.name for row in the_store.campaigns()]


@app.command()
def status(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default every campaign in the store)"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint_or_none, help="control endpoint of a running daemon, asked for its "
                                "stations ('' not to ask)"),
) -> None:
    """Where a campaign stands: progress, experiments in flight, best so far, last results."""
    from closedloop.view import Snapshot, daemon_lines

    the_store, name = _find_store(campaign, store, read_only=True)
    names = _campaign_names(the_store, name)
    if not names:
        _fail(f"no campaign in {the_store.display}")
    idle = []
    for each in names:
        snap = Snapshot.from_store(the_store, each)
        if snap.status == "idle":
            idle.append(each)
        if console.is_terminal:
            console.print(snap)
        else:
            for line in snap.lines():  # values and error messages such as '[bmim]PF6 ...' are not markup
                console.print(line, highlight=False, soft_wrap=True, markup=False)
    for line in daemon_lines(control, names, idle=idle) if control else []:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command()
def watch(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default the only one in the store)"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
    interval: float = typer.Option(1.0, help="seconds between looks at the store"),
    timeout: Optional[float] = typer.Option(None, help="stop watching after this many seconds"),
    events: Optional[str] = typer.Option(None, callback=_endpoint_or_none, help="a daemon's PUB endpoint to follow (default: ask the daemon "
                                         "on --control; without one, read the store)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint_or_none, help="control endpoint of a running daemon"),
) -> None:
    """Follow a campaign from another terminal until it completes (Ctrl-C to stop watching)."""
    from closedloop.view import daemon_events_endpoint, watch_events
    from closedloop.view import watch as follow

    the_store, name = _find_store(campaign, store, read_only=True)
    names = _campaign_names(the_store, name)
    if len(names) != 1:
        _fail(f"name the campaign to watch: {', '.join(names) or 'none'} in {the_store.display}")
    endpoint = events or (daemon_events_endpoint(control, names[0]) if control else None)
    try:
        if endpoint:
            watch_events(the_store, names[0], console, endpoint, timeout_s=timeout, idle_check_s=interval)
        else:
            follow(the_store, names[0], console, interval_s=interval, timeout_s=timeout)
    except KeyboardInterrupt:
        pass


@app.command("list")
def list_campaigns(
    ctx: typer.Context,
    store: Optional[list[str]] = typer.Option(None, help="stores to list (default results/*.db)"),
) -> None:
    """The campaigns in the stores: status, experiments done, best so far."""
    from rich.table import Table

    from closedloop.errors import StoreError
    from closedloop.store import Store
    from closedloop.view import Snapshot

    # a store named twice is listed once (its campaigns had each taken two rows)
    locations = list(dict.fromkeys(store)) if store else [str(p) for p in sorted(Path("results").glob("*.db"))]
    if not locations:
        _fail("no stores in results/; give --store")
    table = Table(box=None, header_style="bold")
    for column in ("campaign", "status", "done", "best", "started", "store"):
        table.add_column(column)
    for location in locations:
        if "://" not in location and not Path(location).exists():
            _fail(f"no store {location}")
        _name_store(ctx, location)  # the one being read, should its database fail
        try:
            the_store = Store(location, read_only=True)
        except StoreError as exc:
            if store:
                raise
            # another program's database in results/ does not stop the listing of the stores there
            errors.print(f"skipped {location}: {exc}", highlight=False, markup=False, soft_wrap=True)
            continue
        for row in the_store.campaigns():
            snap = Snapshot.from_store(the_store, row.name, recent=0)
            if snap.front is not None:  # several objectives: a front, not a best
                best = f"{len(snap.front)} on the Pareto front" if snap.front else "-"
            else:
                best = (f"{snap.objective}={snap.best.values[snap.objective]:.6g} (#{snap.best.index})"
                        if snap.best and snap.best.values else "-")
            started = f"{snap.started.astimezone():%Y-%m-%d %H:%M}" if snap.started else "-"
            # the snapshot's status, as `status` shows it: "idle" where the row says running but no process does
            table.add_row(row.name, snap.status, snap.progress_text(), best, started, location)
    _print_table(table)


def _print_table(table: Any) -> None:
    """A table on the terminal as wide as it is; piped or redirected, at its natural width (rich would wrap and
    cut cells to 80 columns: a value printed as ``0.48…`` is digits lost to a script or a file)."""
    from rich.measure import Measurement

    lines = _plain_lines(table) if not console.is_terminal or table.row_count > PLAIN_ROWS else None
    if lines is not None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    Console(width=max(width, 1), no_color=True, highlight=False, soft_wrap=False, emoji=False).print(table)


# on a terminal, tables longer than this are printed without rich's colours, as when piped: rich took 120 s
# (95% of 'closedloop show') to lay out a campaign of 20,000 trials, which is laid out here in a second
PLAIN_ROWS = 2000


def _plain_lines(table: Any) -> list[str] | None:
    """A table without borders (``box=None``, rich's default padding) laid out as rich lays it out at its natural
    width, character for character, in linear time; None for one this does not lay out (a cell or header that is
    not plain text, or rich markup, which rich would read)."""
    from rich.cells import cell_len
    from rich.text import Text

    if (table.box is not None or tuple(table.padding) != (0, 1, 0, 1) or not table.pad_edge or table.show_lines
            or table.title_justify != "left" or any(c.justify not in ("left", "right") for c in table.columns)):
        return None
    headers = [column.header for column in table.columns]
    title = table.title or ""
    if not all(isinstance(h, str) and "[" not in h for h in [*headers, title]):
        return None
    columns = [[cell.plain if isinstance(cell, Text) else None for cell in column.cells] for column in table.columns]
    if any(cell is None or "\n" in cell for column in columns for cell in column):
        return None
    widths = [max([cell_len(h), *(cell_len(c) for c in column)]) for h, column in zip(headers, columns)]
    justify = [column.justify for column in table.columns]

    def line(cells: list[str]) -> str:
        out = []
        for cell, width, side in zip(cells, widths, justify):
            pad = " " * (width - cell_len(cell))
            out.append(f" {pad}{cell} " if side == "right" else f" {cell}{pad} ")
        return "".join(out)

    total = sum(width + 2 for width in widths)
    lines = [title + " " * max(total - cell_len(title), 0)] if title else []
    if table.show_header:
        lines.append(line(headers))
    lines.extend(line(list(row)) for row in zip(*columns))
    return lines


@app.command()
def show(
    campaign: str = typer.Argument(..., help="campaign name"),
    trial: Optional[int] = typer.Argument(None, help="a trial number: why it was run (as `closedloop explain`)"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """The campaign's trials as a table: parameters, outputs, status, station and errors; or one trial's decision."""
    from rich.table import Table
    from rich.text import Text

    from closedloop.view import trial_records

    the_store, name = _find_store(campaign, store, read_only=True)
    if trial is not None:  # issue 9: one trial's provenance
        from closedloop import provenance

        for line in provenance.explain_lines(provenance.explain(the_store, name, trial)):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    spec = the_store.campaign(name)
    records = trial_records(the_store, name)
    table = Table(title=f"{name}: {len(records)} trials", box=None, header_style="bold", title_justify="left")
    columns = ["trial", "status", *spec.parameters, *(["source"] if spec.sources else []), *spec.outputs, "station", "error"]
    for column in columns:
        table.add_column(column, justify="right" if column in spec.outputs or column == "trial" else "left")
    for record in records:
        cells = []
        for column in columns:
            value = record.get(column)
            cells.append(Text("" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)))
        table.add_row(*cells, style="red" if record["status"] in ("failed", "abandoned") else None)
    _print_table(table)


@app.command()
def export(
    campaign: str = typer.Argument(..., help="campaign name"),
    format: Optional[str] = typer.Option(None, "--format", "-f",
                                         help="csv, parquet or json (default: the --output file's suffix, else csv)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file to write (default NAME.FORMAT; - for stdout)"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Write the campaign's trials as a table (one row per trial, parameters and outputs as columns)."""
    import pandas as pd

    from closedloop.view import trial_columns, trial_records

    formats = ("csv", "parquet", "json")
    # `-o past.parquet` without --format wrote CSV text into a .parquet file, which no parquet reader (nor
    # `closedloop import`, which goes by the suffix) could read: the suffix says the format, and may not contradict it
    suffix = output.suffix.lower().lstrip(".") if output is not None and str(output) != "-" else ""
    format = format or (suffix if suffix in formats else "csv")
    if format not in formats:
        _fail(f"--format {format}: use csv, parquet or json", EXIT_BAD_INPUT)
    if suffix in formats and suffix != format:
        _fail(f"--output {output} is a .{suffix} file, but --format is {format}: name a .{format} file, or give "
              f"--format {suffix}", EXIT_BAD_INPUT)
    the_store, name = _find_store(campaign, store, read_only=True)
    records = trial_records(the_store, name)
    columns = trial_columns(the_store.campaign(name))
    frame = pd.DataFrame(records, columns=columns)
    # Python's json, not pandas': pandas writes at most 15 significant digits, and 0.9841181663796306 came back as
    # 0.984118166379631, another number than the CSV's and the store's. Names stay as written (H₂O, not H\u2082O)
    as_json = json.dumps([{c: r.get(c) for c in columns} for r in records], indent=1, ensure_ascii=False)
    target = output or Path(f"{name}.{format}")
    if format == "csv":
        from closedloop.hitl import csv_cell

        frame = frame.map(csv_cell)  # a spreadsheet opening it runs no value as a formula
    if str(target) == "-":
        if format == "parquet":
            _fail("parquet is binary: give --output FILE", EXIT_BAD_INPUT)
        sys.stdout.write(frame.to_csv(index=False) if format == "csv" else as_json + "\n")
        return
    _check_output(target, f".{format}")
    target.parent.mkdir(parents=True, exist_ok=True)  # as `report -o` does (exports/branin.csv had been an error)
    if format == "csv":
        frame.to_csv(target, index=False)
    elif format == "json":
        target.write_text(as_json + "\n", encoding="utf-8")
    else:
        # a parquet column has one type: a categorical of numbers and text (values: [10, "007"]) goes as text
        for column in frame.columns[frame.dtypes == object]:
            if len({type(v) for v in frame[column] if v is not None}) > 1:
                frame[column] = [None if v is None else str(v) for v in frame[column]]
        try:
            frame.to_parquet(target, index=False)
        except ImportError:
            _fail("parquet needs pyarrow: pip install pyarrow")
    console.print(f"wrote {len(frame)} trials to {target}", highlight=False, soft_wrap=True)


def _check_output(target: Path, *suffixes: str) -> None:
    """Refuse an output path that is a folder, or an existing file that is not an earlier output of this kind:
    `export NAME -o results/NAME.db` had overwritten the campaign's own store with a CSV file, every result lost."""
    if target.is_dir():
        _fail(f"--output {target} is a folder: name a file", EXIT_BAD_INPUT)
    if not target.exists():
        return
    with target.open("rb") as file:
        database = file.read(16) == b"SQLite format 3\x00"
    if database or target.suffix.lower() not in suffixes:
        what = "an SQLite database (a store?)" if database else f"not a {suffixes[0]} file"
        _fail(f"--output {target} exists and is {what}: it is left as it is; remove it or name another file",
              EXIT_BAD_INPUT)


def _print_trials(rows: list[Any], header: str) -> None:
    console.print(header, highlight=False, soft_wrap=True)
    for row in rows:
        console.print(f"  #{row.index:>3}  {_format_values(row.parameters)}", highlight=False, soft_wrap=True,
                      markup=False)


@app.command()
def suggest(
    campaign: str = typer.Argument(..., help="campaign file or stored campaign name"),
    n: int = typer.Option(1, "-n", help="how many experiments to propose"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Propose the next experiments to run by hand and record them as pending."""
    from closedloop import hitl

    the_store, target = _campaign_to_start(campaign, store)
    try:
        with _unless_refused(the_store):
            rows = hitl.suggest(the_store, target, n)
    except hitl.DataError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    name = target if isinstance(target, str) else target.name
    _print_trials(rows, f"{name}: {len(rows)} experiment(s) to run by hand; report results with "
                        f"`closedloop tell {name} TRIAL OUTPUT=VALUE`")


@app.command()
def tell(
    campaign: str = typer.Argument(..., help="campaign name"),
    trial: Optional[int] = typer.Argument(None, help="trial number (as shown by suggest)"),
    values: Optional[list[str]] = typer.Argument(None, help="measured outputs as OUTPUT=VALUE"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="CSV of results: a trial column and one per output"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Record results of experiments done by hand."""
    from closedloop import hitl

    the_store, name = _find_store(campaign, store)
    assert name is not None
    if csv is not None:
        if trial is not None or values:
            _fail("give either --csv or TRIAL OUTPUT=VALUE, not both", EXIT_BAD_INPUT)
        rows = hitl.tell_csv(the_store, name, csv)
        console.print(f"{name}: recorded {len(rows)} result(s) from {csv}", highlight=False, soft_wrap=True)
        return
    if trial is None or not values:
        _fail("give TRIAL OUTPUT=VALUE ... or --csv FILE", EXIT_BAD_INPUT)
    row = hitl.tell(the_store, name, trial, hitl._assignments(values or []))
    console.print(f"{name}: recorded trial #{row.index}", highlight=False, soft_wrap=True)


@app.command()
def approve(
    campaign: str = typer.Argument(..., help="campaign name"),
    trial: int = typer.Argument(..., help="trial number held for approval"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="edit a parameter within its limits: NAME=VALUE"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help="control endpoint of the daemon running the campaign"),
) -> None:
    """Let a held proposal run, as proposed or edited within the campaign's limits.

    The daemon serving the campaign does it (through its control socket) and dispatches the trial at once;
    with no daemon serving it, the store is written: a `closedloop run` of the campaign picks the trial up from
    there, or the next process run on the store dispatches it.
    """
    from closedloop import hitl

    the_store, name = _find_store(campaign, store)
    assert name is not None
    edits = hitl._assignments(set_ or [])
    reply = _review(control, "edit" if edits else "approve", name, {"trial": trial, "parameters": edits or None})
    if reply is not None:
        console.print(f"{name}: {reply['msg']}: {_exact_values(reply['parameters'])}", highlight=False, soft_wrap=True,
                      markup=False)
        return
    row = hitl.approve(the_store, name, trial, edits)
    # `closedloop run` has no control socket, and reads approvals from the store as it runs
    who = ("the process running it picks it up from there" if the_store.held(name)
           else "the next process run on this store dispatches it")
    console.print(f"{name}: trial #{row.index} approved in the store (no daemon serves {name} on {control}; {who}): "
                  f"{_exact_values(row.parameters)}", highlight=False, soft_wrap=True, markup=False)


def _exact_values(values: dict[str, Any]) -> str:
    """Every digit of what an approval sends to the instrument: rounded to six, x2=0.5000000014 read 0.5."""
    return ", ".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


@app.command()
def reject(
    campaign: str = typer.Argument(..., help="campaign name"),
    trial: int = typer.Argument(..., help="trial number held for approval"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help="control endpoint of the daemon running the campaign"),
) -> None:
    """Refuse a proposal: it is recorded as failed, and the planner steers away from it.

    Through the daemon serving the campaign when one answers on --control; otherwise in the store.
    """
    from closedloop import hitl

    the_store, name = _find_store(campaign, store)
    assert name is not None
    reply = _review(control, "reject", name, {"trial": trial})
    if reply is not None:
        console.print(f"{name}: {reply['msg']}", highlight=False, soft_wrap=True)
        return
    row = hitl.reject(the_store, name, trial)
    console.print(f"{name}: trial #{row.index} {row.error} in the store (no daemon serves {name} on {control})",
                  highlight=False, soft_wrap=True)


def _review(control: str, method: str, campaign: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """A person's decision sent to the daemon serving ``campaign`` on ``control``: its reply, or None when no
    daemon there serves the campaign (the caller then writes the store). A refusal is an error, and changes nothing."""
    from closedloop import hitl
    from closedloop.daemon import control_request
    from closedloop.errors import ProtocolError

    try:
        status = control_request(control, "status", timeout_s=1.5)
    except ProtocolError:
        return None
    if campaign not in [c.get("name") for c in status.get("campaigns", [])]:
        return None
    reply = control_request(control, method, {"campaign": campaign, "by": hitl.user(), **params})
    if not reply.get("success"):
        _refused(reply, f"{method} on {control}")
    return reply


@app.command("import")
def import_(
    campaign: str = typer.Argument(..., help="campaign file or stored campaign name"),
    results: Path = typer.Argument(..., help="CSV (or an export's .json or .parquet): one column per parameter and per output"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Seed a campaign with past experiments; nothing is written if any row is bad."""
    from closedloop import hitl

    if campaign.endswith((".yaml", ".yml")) or Path(campaign).is_file():
        from closedloop.store import Store

        spec = _load(Path(campaign))
        the_store, target = Store(store or _default_store(spec)), spec
    else:
        the_store, name = _find_store(campaign, store)
        target = the_store.campaign(name)
    try:
        with _unless_refused(the_store):
            summary = hitl.import_csv(the_store, target, results)
    except hitl.DataError as exc:
        from rich.markup import escape  # problems quote cells such as '[emim]PF6', which are not markup

        for problem in exc.problems:
            errors.print(f"[bold red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        errors.print(f"nothing imported: {len(exc.problems)} problem(s)", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    console.print(f"{target.name}: imported {len(summary.trials)} experiments from {results}"
                  + (f" (ignored columns: {', '.join(summary.ignored_columns)})" if summary.ignored_columns else ""),
                  highlight=False, soft_wrap=True)
    # imported experiments are the campaign's: a scientist importing 5 into a budget of 3 saw `run` do nothing
    from closedloop.view import Snapshot

    snap = Snapshot.from_store(the_store, target.name)
    if snap.experiments is not None:
        left = snap.experiments - snap.finished
        console.print(f"{target.name}: {snap.finished} of the budget's {snap.experiments} experiments done; "
                      + (f"{left} new ones to run" if left > 0 else
                         "none left to run: to run new ones, import into a file of a new name with a larger "
                         "budget.experiments"), highlight=False, soft_wrap=True)


@app.command()
def report(
    campaign: str = typer.Argument(..., help="campaign name"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default reports/NAME/report.html)"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Write a self-contained HTML report with its figures (PNG) beside it."""
    from closedloop.report import write_report

    if output is not None:
        _check_output(output, ".html", ".htm")
    the_store, name = _find_store(campaign, store, read_only=True)
    assert name is not None
    started = time.monotonic()
    path = write_report(the_store, name, output or Path("reports") / name / "report.html")
    console.print(f"wrote {path} in {time.monotonic() - started:.1f} s", highlight=False, soft_wrap=True)


def _not_a_store(database: Path) -> str | None:
    """What ``database`` is instead of a closedloop store (None for one), read without writing to it."""
    import sqlite3

    from closedloop.store import connect_reading

    if database.is_dir():
        return "a folder"
    if database.stat().st_size == 0:
        return "an empty file"  # SQLite would read it as an empty database, and 'copy' it
    made = [path for path in (Path(f"{database}-wal"), Path(f"{database}-shm")) if not path.exists()]
    try:
        connection = connect_reading(str(database))
        try:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            for path in made:  # reading a damaged WAL file made them, and a reader does not remove them
                path.unlink(missing_ok=True)
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_CORRUPT:
            return f"a damaged SQLite file: {exc}"  # truncated, or overwritten in part
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_NOTADB:
            raise  # unreadable (permissions, a lock held too long): said as it is
        return "not an SQLite database"
    return None if "campaign" in tables else "an SQLite database without closedloop's campaign table"


@app.command()
def backup(
    store: str = typer.Argument(..., help="the store's SQLite file (or sqlite:/// URL), in use or not"),
    dest: Path = typer.Argument(..., help="the copy to write (not there yet); its run documents go to DEST.documents"),
) -> None:
    """Copy a store consistently while a daemon writes it: the database, then its documents folder.

    A plain `cp` of the file misses what is still in its -wal file. For a PostgreSQL store use pg_dump."""
    import shutil
    import sqlite3

    from rich.markup import escape

    from closedloop.store import connect_reading, displayed

    if "://" in store and not store.startswith("sqlite:///"):
        _fail(f"{displayed(store)}: back up a database server's store with its own tool (pg_dump for PostgreSQL)",
              EXIT_BAD_INPUT)
    database = Path(store.removeprefix("sqlite:///"))
    documents, dest_documents = Path(f"{database}.documents"), Path(f"{dest}.documents")
    if not database.exists():
        _fail(f"no store {escape(str(database))}", EXIT_BAD_INPUT)
    if (what := _not_a_store(database)) is not None:
        _fail(f"{escape(str(database))} is not a closedloop store ({what})", EXIT_BAD_INPUT)
    for path in (dest, dest_documents):
        if path.exists():
            _fail(f"{path} exists: a backup is written to a new name", EXIT_BAD_INPUT)
    if not dest.parent.is_dir():
        _fail(f"no folder {dest.parent} for {dest}: make it first", EXIT_BAD_INPUT)
    try:
        source = connect_reading(str(database))  # a store in a folder this user may not write is read all the same
        target = sqlite3.connect(dest)
        try:
            # in one step, under one read transaction: the copy is the store as of one commit, and in WAL mode
            # the daemon writes on meanwhile (in steps, each of its commits would restart the copy)
            source.backup(target)
        finally:
            target.close()
            source.close()
        # after the database: a run's documents are written before its result, so every result copied has its own
        if documents.is_dir():
            shutil.copytree(documents, dest_documents)
    except BaseException:
        for leftover in (dest, Path(f"{dest}-wal"), Path(f"{dest}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(dest_documents, ignore_errors=True)
        raise
    console.print(f"{database} copied to {dest}" + (f", its run documents to {dest_documents}" if documents.is_dir()
                                                 else f" (no {documents} to copy)"), highlight=False)


_CONTROL_HELP = "the daemon's control endpoint"


def _control(endpoint: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    from closedloop.daemon import control_request

    reply = control_request(endpoint, method, params)
    if not reply.get("success"):
        _refused(reply, method)
    return reply


def _refused(reply: dict[str, Any], method: str) -> None:
    """A daemon's refusal as the command's error: exit 2 where it says the request was bad input (as the same
    request checked here would), else 1."""
    message = str(reply.get("msg") or f"{method} refused by the daemon")
    if reply.get("bad_input"):
        from closedloop.hitl import DataError

        raise DataError(message.splitlines())
    raise ClosedLoopError(message)


@app.command()
def pause(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default every campaign of the daemon)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help=_CONTROL_HELP),
) -> None:
    """Dispatch nothing new; experiments in flight finish."""
    console.print(_control(control, "pause", {"campaign": campaign} if campaign else {})["msg"], highlight=False)


@app.command()
def resume(
    campaign: Optional[str] = typer.Argument(None, help="campaign name (default every campaign of the daemon)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help=_CONTROL_HELP),
) -> None:
    """Dispatch again after a pause."""
    console.print(_control(control, "resume", {"campaign": campaign} if campaign else {})["msg"], highlight=False)


@app.command()
def stop(control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help=_CONTROL_HELP)) -> None:
    """Stop the daemon gracefully: no new dispatch, wait for results in flight, exit."""
    console.print(_control(control, "stop", {})["msg"], highlight=False)


@app.command()
def cancel(
    trial: int = typer.Argument(..., help="trial number"),
    campaign: Optional[str] = typer.Option(None, help="campaign name (needed when the daemon runs several)"),
    control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help=_CONTROL_HELP),
) -> None:
    """Cancel a trial: stop its run on the station and record it failed."""
    import getpass

    params: dict[str, Any] = {"trial": trial, "by": getpass.getuser()}
    if campaign:
        params["campaign"] = campaign
    console.print(_control(control, "cancel", params)["msg"], highlight=False)


@app.command()
def health(control: str = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint, help=_CONTROL_HELP),
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


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the engine's parts.")
app.add_typer(bench_app, name="bench")


def _output_file(path: Path | None, option: str) -> None:
    """Makes the folder of a benchmark's output file and checks that the file can be written there, before the
    benchmark runs: a folder that did not exist, a path that is a folder or under a file, had failed only once the
    figures were measured (``--markdown`` and ``--output`` at the very end), and they were lost."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _fail(f"{option} {path}: cannot make its folder {path.parent}, a file is in the way", EXIT_BAD_INPUT)
    except OSError as exc:
        _fail(f"{option} {path}: cannot make its folder {path.parent} ({exc.strerror or exc})", EXIT_BAD_INPUT)
    if path.is_dir():
        _fail(f"{option} {path} is a folder: give the name of a file", EXIT_BAD_INPUT)
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        _fail(f"{option} {path}: cannot write there", EXIT_BAD_INPUT)


@bench_app.command("loop")
def bench_loop(
    experiments: int = typer.Option(100, help="experiments in the utilization run"),
    stations: int = typer.Option(4, help="stations in the utilization run"),
    seconds: float = typer.Option(1.0, help="duration of one experiment in the utilization run"),
    # all in flight at once, in one campaign: at most execution.concurrency's limit (its 5,000 had stopped the
    # benchmark at its campaign file since that limit came in)
    intake: int = typer.Option(1000, min=1, max=1024, help="results in the intake run, all in flight at once"),
    overhead: int = typer.Option(200, help="experiments in the overhead run"),
    quick: bool = typer.Option(False, help="skip the utilization run (BoTorch, ~30 s)"),
) -> None:
    """Benchmark the loop: overhead per experiment, result intake, station utilization."""
    from closedloop.bench.loop import main as bench

    bench(experiments=experiments, stations=stations, seconds=seconds, intake=intake, overhead=overhead,
          utilization=not quick, console=console)


@bench_app.command("scale")
def bench_scale(
    experiments: int = typer.Option(1000, help="cheap computational experiments on the Dask LocalCluster"),
    workers: int = typer.Option(2, help="worker processes of the LocalCluster"),
    seconds: float = typer.Option(0.02, help="work in one computational experiment, seconds"),
    stations: list[int] = typer.Option([1, 8, 32], help="simulated station counts for the daemon overhead runs"),
    station_experiments: int = typer.Option(600, help="experiments in each daemon overhead run"),
    output: Optional[Path] = typer.Option(None, help="also write the figures to this JSON file"),
) -> None:
    """Beyond one machine: throughput and worker busy time on Dask; daemon overhead with 1 to 32 stations."""
    from closedloop.bench.scale import main as scale

    _output_file(output, "--output")
    scale(experiments=experiments, workers=workers, seconds=seconds, station_counts=tuple(stations),
          station_experiments=station_experiments, console=console, output=output)


@bench_app.command("multifidelity")
def bench_multifidelity(
    seeds: int = typer.Option(5, min=1, help="seeds per planner"),
    budget: float = typer.Option(25.0, min=1.0, help="total cost per run (the expensive source costs 1)"),
    regret: float = typer.Option(0.1, help="the target regret (best measured at the expensive source - minimum)"),
    output: Optional[Path] = typer.Option(None, help="also write the figures to this JSON file"),
) -> None:
    """A cheap biased simulation beside the real experiment: cost to a regret against the real one alone."""
    from closedloop.bench.multifidelity import main as multifidelity

    _output_file(output, "--output")
    multifidelity(seeds=seeds, budget=budget, regret=regret, console=console, output=output)


@bench_app.command("library")
def bench_library(
    rows: list[int] = typer.Option([10_000, 100_000], help="candidate table sizes (repeat)"),
    columns: int = typer.Option(6, min=1, help="continuous parameters, one column each"),
    results: int = typer.Option(25, min=2, help="results before the suggestions are timed"),
    output: Optional[Path] = typer.Option(None, help="also write the figures to this JSON file"),
) -> None:
    """Pool campaigns over large candidate tables: seconds to load, build the planner and suggest."""
    from closedloop.bench.library import main as library

    _output_file(output, "--output")
    library(sizes=tuple(rows), columns=columns, results=results, console=console, output=output)


@bench_app.command("planner")
def bench_planner(
    problem: Optional[list[str]] = typer.Option(None, "--problem", "-p", help="problems to run (default all; repeat)"),
    peer: Optional[list[str]] = typer.Option(None, "--peer", help="planners to compare (default all; repeat)"),
    seeds: int = typer.Option(10, min=1, help="seeds per problem and planner"),
    budget_scale: float = typer.Option(1.0, min=0.01, help="multiply every problem's experiment budget"),
    jobs: int = typer.Option(1, min=1, help="runs in parallel worker processes"),
    speed: Optional[list[int]] = typer.Option(None, help="observation counts for the Hartmann6 speed test "
                                                         "(default 10 50 200 500 1000; 0 skips it)"),
    speed_cap: float = typer.Option(60.0, help="skip larger speed sizes once a suggestion takes longer (s)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here (rewritten as runs end)"),
    markdown: Optional[Path] = typer.Option(None, help="write the tables as markdown here at the end"),
    resume: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                          help="take over the finished runs of an earlier --json report"),
    stations: int = typer.Option(1, min=1, help="experiments always in flight, as on a lab with this many stations "
                                                "(each asks for its next while the others run)"),
) -> None:
    """Our planner against Ax, BayBE, Xopt, Optuna TPE and Sobol over the benchmark suite."""
    from rich.markup import escape

    from closedloop.bench import PEERS, PROBLEMS, ResumeError, planner_benchmark, render, to_markdown

    unknown = [p for p in problem or [] if p not in PROBLEMS] + [p for p in peer or [] if p not in PEERS]
    if unknown:
        _fail(f"unknown problem or peer: {', '.join(unknown)}; problems: {', '.join(PROBLEMS)}; peers: {', '.join(PEERS)}",
              EXIT_BAD_INPUT)
    sizes = (10, 50, 200, 500, 1000) if speed is None else tuple(n for n in speed if n > 0)
    _output_file(json_out, "--json")
    _output_file(markdown, "--markdown")
    chosen = peer or list(PEERS)
    if all(PEERS[name].missing() for name in chosen):
        # it had run nothing, printed no table and exited 0, as if the benchmark had been made
        _fail(f"none of the planners chosen can run here ({', '.join(chosen)}): "
              f"{escape(PEERS[chosen[0]].missing() or '')}", EXIT_BAD_INPUT)
    for name in chosen:
        reason = PEERS[name].missing()
        if reason:
            # the reason is text, not markup: read as markup, its "pip install ... -e '.[bench]'" lost "[bench]"
            console.print(f"[yellow]peer {name} is missing and is left out[/]: {escape(reason)}", highlight=False)

    def progress(result: dict[str, Any]) -> None:
        if "speed" in result:
            for r in result["speed"]:
                seconds = f"{r['seconds']:.3f} s" if r["status"] == "ok" else r["status"]
                console.print(f"  speed {r['peer']} N={r['observations']} batch {r['batch']}: {seconds}", highlight=False)
        else:
            detail = (f"log10 regret {result['log10_final_regret']:.2f}" if result["status"] == "ok"
                      else f"{result['status']}: {result['message'][:120]}")
            console.print(f"  {result['problem']} {result['peer']} seed {result['seed']}: {detail}", highlight=False,
                          markup=False)

    try:
        report = planner_benchmark(problems=problem, peers=peer, seeds=seeds, budget_scale=budget_scale, jobs=jobs,
                                   speed_sizes=sizes, speed_cap=speed_cap, json_path=json_out,
                                   command="closedloop bench planner " + " ".join(sys.argv[3:]), progress=progress,
                                   resume=resume, stations=stations)
    except ResumeError as exc:  # raised before anything runs or is written
        _fail(escape(str(exc)), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        kept = (f"; the runs that ended are in {json_out}: go on with --resume {json_out}" if json_out is not None
                else " (without --json no run is kept)")
        errors.print(f"interrupted{kept}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    render(report, console)
    if json_out is not None:
        console.print(f"report written to {json_out}", highlight=False, markup=False)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(report))
        console.print(f"tables written to {markdown}", highlight=False, markup=False)


# -- issue 9: why each experiment was chosen (closedloop.provenance), the live dashboard (closedloop.dashboard) --


def _provenance_store(campaign: str, store: str | None) -> Any:
    # looked up as every command looks (results/NAME.db, then results/*.db): `show CAMPAIGN N` found a trial that
    # `explain CAMPAIGN N`, said to be the same, did not
    the_store, _ = _find_store(campaign, store, read_only=True)
    return the_store


@app.command()
def explain(
    campaign: str = typer.Argument(..., help="campaign name"),
    trial: int = typer.Argument(..., help="trial number"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
    as_json: bool = typer.Option(False, "--json", help="the whole record as JSON"),
) -> None:
    """Why a trial was run: the planner's data, model, acquisition, seed, timing, approval and run uids."""
    from closedloop import provenance

    info = provenance.explain(_provenance_store(campaign, store), campaign, trial)
    if as_json:
        print(json.dumps(info, indent=1, default=str))
        return
    for line in provenance.explain_lines(info):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def replay(
    campaign: str = typer.Argument(..., help="campaign name"),
    until: int = typer.Option(..., "--until", help="the trial whose decision is made again"),
    store: Optional[str] = typer.Option(None, help=_STORE_HELP, callback=_name_store),
) -> None:
    """Rebuild the planner as it was before a trial and show that it proposes the same experiment (exit 1 if not)."""
    from closedloop import provenance

    result = provenance.replay(_provenance_store(campaign, store), campaign, until)
    for line in result.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not result.same:
        raise typer.Exit(1)


def _start_dashboard(store: Any, control: str | None, events: str | None, host: str, port: int,
                     token: str | None = None, read_only: bool = False, listening: Any = None) -> Any:
    from closedloop.dashboard import DashboardConfig, DashboardServer

    server = DashboardServer(DashboardConfig(store=str(store), control=control, events=events, host=host, port=port,
                                             token=token, read_only=read_only), listening=listening).start()
    mode = " (read-only)" if server.config.effective_read_only else ""
    console.print(f"dashboard on {server.url}{mode}", highlight=False)
    return server


@app.command()
def dashboard(
    store: str = typer.Option(..., help="the daemon's store file or URL", callback=_name_store),  # a str: see daemon
    control: Optional[str] = typer.Option("tcp://127.0.0.1:5700", callback=_endpoint_or_none, help="the daemon's control endpoint ('' for none)"),
    events: Optional[str] = typer.Option("tcp://127.0.0.1:5702", callback=_endpoint_or_none, help="the daemon's PUB endpoint ('' for none)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (beyond loopback: read-only without --token)"),
    port: int = typer.Option(8765, help="TCP port"),
    token: Optional[str] = typer.Option(None, envvar="CLOSEDLOOP_DASHBOARD_TOKEN", show_envvar=True,
                                        help="secret that allows control from beyond loopback (?token=...); in the "
                                        "environment it stays out of the process list that every local user reads"),
    read_only: bool = typer.Option(False, "--read-only", help="refuse pause/resume/stop/approve/reject"),
    secret_key: Optional[Path] = typer.Option(None, help="a CURVE secret key the daemon allows (NAME.key_secret), for "
                                              "the events of a daemon with keys"),
    server_key: Optional[Path] = typer.Option(None, help="the daemon's CURVE public key (daemon.key)"),
) -> None:
    """Serve the live dashboard in the browser: campaigns, stations, best so far, model, trials, controls."""
    from closedloop.dashboard import DashboardConfig, DashboardServer
    from closedloop.keys import ClientKeys

    if (secret_key is None) != (server_key is None):
        _fail("give both --secret-key and --server-key, or neither", EXIT_BAD_INPUT)
    keys = ClientKeys(secret_key, server_key) if secret_key and server_key else None
    server = DashboardServer(DashboardConfig(store=str(store), control=control or None, events=events or None,
                                             host=host, port=port, token=token, read_only=read_only, keys=keys))
    console.print(f"dashboard on {server.url}" + (" (read-only)" if server.config.effective_read_only else ""),
                  highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


# -- end issue 9


def main() -> None:
    # Python's own handler raises a plain KeyboardInterrupt, which can end a command by SIGINT (see StopNow); the
    # long-running commands put theirs over this one and back
    signal.signal(signal.SIGINT, _ctrl_c)
    try:
        app()
    except KeyboardInterrupt:
        # before any command began (typer building the commands): it was a traceback and exit 1
        errors.print("interrupted", highlight=False)
        sys.exit(130)
    finally:
        # whatever ended the command (an error line, an interruption): a Ctrl-C in the exit hooks (ophyd's joins its
        # threads) printed a traceback under it
        _deaf_to_stops_at_exit()


if __name__ == "__main__":
    main()
