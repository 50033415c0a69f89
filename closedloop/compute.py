"""A compute station: runs computational experiments (a Python function or an external command) on Dask.

To the daemon it is one more station: it connects a DEALER socket, says ``hello`` with its capacity
(how many experiments it runs at once), receives ``assign`` messages and answers ``started``,
``result`` or ``failure`` (closedloop.protocol). Each result or failure goes to the same on-disk
outbox a station worker uses (:class:`closedloop.worker.Outbox`) before it is sent, and stays
there until the daemon's ``ack``, so it survives a lost connection or a crash and is offered again
after reconnecting.

It gives Dask at most ``capacity`` experiments at once; a trial the daemon sends beyond that (its
prefetch) waits here, not in Dask, and is ``started`` when a running one ends. :meth:`ComputeStation.stop`
(SIGTERM to ``closedloop compute-station``) is graceful, as for a station worker: the station tells
the daemon that it serves nothing more and holds only what it is computing (the trials waiting here
go back to the daemon's queue for other stations), delivers those experiments' answers, and returns
once they are acknowledged.

Each trial runs as one ``dask.distributed`` future: on a ``LocalCluster`` by default, or on the
scheduler named by (first match wins) the station's ``scheduler`` argument
(``closedloop compute-station --scheduler``), the campaign's ``instrument.options.scheduler``, or
Dask's own ``scheduler-address`` setting (environment ``DASK_SCHEDULER_ADDRESS``). A task whose
worker dies is not silently re-run by Dask on the local cluster (``allowed-failures`` is 0): it
becomes a ``failure`` that the daemon retries or records under the campaign's ``execution.retries``;
a task that never comes back is cancelled when the daemon's ``execution.timeout`` fires. A Python function
cannot be interrupted: on the local cluster's worker processes (the default; one experiment per process), one
cancelled that has not returned within :data:`HUNG_GRACE_S` has its worker process restarted, which frees its slot;
on thread workers, or a scheduler this station does not own, it keeps its slot until it returns (said once).

The wire ``target`` of a computational instrument is ``function:<module:name>`` or
``command:<template>`` (see :attr:`closedloop.campaign.Instrument.target`):

- a function is called as ``f(**setpoints, **options)`` and returns a mapping of outputs;
- a command template is split like a shell line (no shell runs), each ``{name}`` is filled from
  the setpoints and options, and the last line of its standard output that is a JSON object holds
  the outputs.

Example:
    >>> station = ComputeStation("tcp://127.0.0.1:5701", capacity=4)   # doctest: +SKIP
    >>> station.run()   # blocks; serves trials until stopped          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from closedloop import protocol
from closedloop.errors import ClosedLoopError, DeviceError, ProtocolError
from closedloop.worker import (Departure, Outbox, Registration, connect_station, default_station_name, finished,
                               named)

log = logging.getLogger("closedloop.compute")
# worker processes of a local cluster per core, at most (8 at least): a campaign's concurrency of 1,000 started 1,000
LOCAL_PROCESSES_PER_CORE = 2

#: options consumed by the station itself, never passed on to the function or command
RESERVED_OPTIONS = frozenset({"scheduler"})

#: time an external command may run when the campaign sets no timeout (a stuck program must end)
DEFAULT_COMMAND_TIMEOUT_S = 24 * 3600.0

#: time a cancelled (timed-out) function may still take to return before its worker process is restarted; the
#: restart itself gives it 4 s more (the nanny's graceful close) before the process is killed
HUNG_GRACE_S = 2.0


class ComputeError(DeviceError):
    """A computational experiment failed: the function raised, the command failed, or its output is unusable."""


def is_computational(target: str) -> bool:
    """True for the wire target of a function or command instrument."""
    return target.startswith(("function:", "command:"))


def split_target(target: str) -> tuple[str, str]:
    """``("function", "pkg.mod:name")`` or ``("command", template)`` from a wire target."""
    kind, _, spec = target.partition(":")
    if kind not in ("function", "command") or not spec:
        raise ComputeError(f"instrument {target!r} is not a computational experiment (function:... or command:...)")
    return kind, spec


def load_function(path: str) -> Callable[..., Any]:
    """The callable at ``package.module:name``."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # a scientist's module next to the campaign file: the console script does not put the
        # working directory on sys.path, so look there before giving up
        if os.getcwd() in sys.path:
            raise ComputeError(f"cannot import {module_name!r} for function {path!r}: {exc}") from None
        sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ComputeError(f"cannot import {module_name!r} for function {path!r}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ComputeError(f"{path!r} is not a callable (module {module_name!r} has no function {name!r})")
    return function


def command_argv(template: str, fields: Mapping[str, Any]) -> list[str]:
    """The argument vector of a command: the template split like a shell line, then each word filled.

    Splitting before filling keeps a value with spaces in one argument and never runs a shell.

    >>> command_argv("sim --x {x1} --label {name}", {"x1": 0.5, "name": "a b"})
    ['sim', '--x', '0.5', '--label', 'a b']
    """
    try:
        return [word.format_map(fields) for word in shlex.split(template)]
    except KeyError as exc:
        raise ComputeError(f"command {template!r}: no parameter or option {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ComputeError(f"command {template!r}: {exc}") from None


def parse_outputs(stdout: str, who: str = "the command") -> dict[str, Any]:
    """The last line of ``stdout`` that is a JSON object (programs may log before it); ``who`` printed it."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    tail = stdout.strip()[-300:]
    raise ComputeError(f"{who} printed no JSON object of outputs on a line of its own (output ends: {tail!r})")


def run_experiment(target: str, setpoints: dict[str, Any], options: dict[str, Any], outputs: list[str],
                   timeout_s: float | None = None) -> dict[str, Any]:
    """Run one computational experiment; this is what a Dask worker executes.

    Returns ``{"values": {output: float}, "started": t0, "finished": t1}`` (unix seconds on the
    worker, so the station can measure how busy the workers were). Raises :class:`ComputeError`
    naming what went wrong.
    """
    kind, spec = split_target(target)
    kwargs = {k: v for k, v in options.items() if k not in RESERVED_OPTIONS}
    started = time.time()
    if kind == "function":
        who = f"function {spec}"
        function = load_function(spec)
        try:
            raw = function(**setpoints, **kwargs)
        except Exception as exc:  # the scientist's code failed: say whose, not only what
            raise ComputeError(f"{who} raised {type(exc).__name__}: {exc}") from exc
        except SystemExit as exc:  # it ended the Dask worker's process, said as a lost worker, after a restart
            raise ComputeError(f"{who} called sys.exit({exc.code!r})") from None
        if not isinstance(raw, Mapping):
            raise ComputeError(f"{who} returned {type(raw).__name__}, not a mapping of outputs")
    else:
        argv = command_argv(spec, {**kwargs, **setpoints})
        who = f"command {argv[0]!r}"
        raw = parse_outputs(_run_command(argv, timeout_s or DEFAULT_COMMAND_TIMEOUT_S), who)
    values: dict[str, float] = {}
    for name in outputs:
        if name not in raw:
            raise ComputeError(f"output {name!r} missing from the outputs of {who} ({', '.join(sorted(map(str, raw)))})")
        value = raw[name]
        # numbers.Real: a simulation's numpy.float32 or numpy.int64 is a number too
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
            raise ComputeError(f"output {name}={value!r} of {who} is not a finite number")
        values[name] = float(value)
    return {"values": values, "started": started, "finished": time.time()}


def experiment_outcome(target: str, setpoints: dict[str, Any], options: dict[str, Any], outputs: list[str],
                       timeout_s: float | None = None) -> dict[str, Any]:
    """:func:`run_experiment` as a Dask task: a failed experiment is ``{"error": message}``, not an exception,
    which Dask's worker logs with its traceback at every failure (the station's terminal filled with them)."""
    try:
        return run_experiment(target, setpoints, options, outputs, timeout_s)
    except ComputeError as exc:
        return {"error": str(exc)}


def _finite(value: numbers.Real) -> bool:
    """Whether a number is a finite float; an int past float's range (an exact count, 10**400) is not one, where
    math.isfinite raises OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _run_command(argv: list[str], timeout_s: float) -> str:
    """The standard output of ``argv``; ComputeError if it cannot start, outlives ``timeout_s`` or exits non-zero.

    Whatever the command leaves running when it exits, times out or its Dask worker closes is killed with it.
    """
    # files, not pipes: a program the command left in the background inherits them, and waiting for the end of a
    # pipe waited for that program (to the timeout) though the command had exited and printed its outputs
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            # its own session: everything it starts, even what outlives it, can be killed as one group
            process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise ComputeError(f"command {argv[0]!r} not found") from None
        except OSError as exc:
            raise ComputeError(f"command {argv[0]!r} cannot start: {exc.strerror}") from None
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    process.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise ComputeError(f"command {argv[0]!r} still running after {timeout_s:g} s; killed") from None
                    if _worker_closing():
                        # the station stopped at once (Ctrl-C) or the cluster is closing: an orphaned command would
                        # run on beside the retry of its trial elsewhere
                        raise ComputeError(f"command {argv[0]!r} killed: its Dask worker is closing") from None
        except BaseException:
            _kill_tree(process.pid)  # walked before it is reaped: its pid cannot be another process's yet
            process.wait()
            raise
        _kill_group(process.pid)  # exited: what it left in the background is still in its process group
        out.seek(0)
        err.seek(0)
        # a simulation code may print Latin-1 (a degree sign) in its log lines: that must not lose the JSON line
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if process.returncode != 0:
        tail = stderr.strip()[-2000:]
        if process.returncode < 0:  # a crash (SIGSEGV) or a kill, not an exit status of -11
            try:
                how = f"was killed by {signal.Signals(-process.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-process.returncode}"
        else:
            how = f"exited with status {process.returncode}"
        raise ComputeError(f"command {argv[0]!r} {how}" + (f": {tail}" if tail else ""))
    return stdout


def _worker_closing() -> bool:
    """True when this runs on a Dask worker that is closing (its tasks are lost with it)."""
    try:
        from distributed import get_worker
        from distributed.core import Status

        return get_worker().status in (Status.closing, Status.closed)
    except (ImportError, ValueError):  # not on a Dask worker (called directly)
        return False


def _kill_group(pgid: int) -> None:
    """Kill the process group of a command started in its own session: what it started, even once orphaned."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_tree(pid: int) -> None:
    """Kill a running command (started in its own session) and every process it started.

    The whole tree: a wrapper script's simulation (``bash run.sh`` -> ``mpirun`` -> the solver) would otherwise run on
    after its experiment ended, on the CPUs of the next ones. Its process group holds what it started even once
    orphaned; walking the tree finds what it started in a session of its own.
    """
    import psutil  # a dependency of dask.distributed

    try:
        doomed = [*psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        doomed = []
    _kill_group(pid)
    for process in doomed:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class _Running:
    assignment: protocol.Assign
    future: Any
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Cancelled:
    """A trial the daemon cancelled whose experiment may still be computing: it holds its slot until this is over."""

    trial_id: int
    future: Any
    since: float = field(default_factory=time.monotonic)
    #: its worker process is being restarted: the slot is free once the new process is up, not when the future ends
    restarting: bool = False
    returned: bool = False
    #: its restart failed: not tried again, the slot is held until the function returns
    unstoppable: bool = False


class ComputeStation:
    """Runs the computational trials a daemon assigns, each as a Dask future.

    Args:
        connect: the daemon's ROUTER endpoint, e.g. ``tcp://127.0.0.1:5701``.
        name: station name (ZeroMQ routing id); unique among the daemon's stations; with keys
            by default theirs (``NAME.key_secret``), the only name the daemon admits them under.
        capacity: experiments at once; default: the Dask cluster's worker threads.
        instruments: wire targets this station accepts (``["*"]``: any; a compute station fails
            the trials of instruments that are not computational).
        sources: campaign sources this station serves (``["*"]``: any), e.g. the simulation of a
            campaign whose robot is served by a station worker.
        outbox: path of the SQLite outbox of unacknowledged results.
        scheduler: a Dask scheduler address that overrides the campaign's; None: the campaign's
            ``instrument.options.scheduler``, else ``DASK_SCHEDULER_ADDRESS``, else a LocalCluster.
        local_workers: worker processes (or threads) of the LocalCluster, when one is started; default for
            processes: ``capacity`` (one experiment per process, so a hung function's is restarted alone).
        local_threads: threads per worker of the LocalCluster (default: enough for ``capacity``).
        processes: LocalCluster workers as processes (isolation; a crash loses one worker) or threads.
        keys: CURVE keys (:class:`closedloop.keys.ClientKeys`: this station's pair and the daemon's
            public key); None for plain loopback.
    """

    def __init__(
        self,
        connect: str,
        *,
        name: str | None = None,
        capacity: int | None = None,
        instruments: list[str] | None = None,
        sources: list[str] | None = None,
        outbox: str | Path | None = None,
        scheduler: str | None = None,
        local_workers: int | None = None,
        local_threads: int | None = None,
        processes: bool = True,
        heartbeat_s: float = 1.0,
        keys: Any | None = None,
        context: zmq.Context | None = None,
    ):
        self.endpoint = connect
        self.name = name or (keys.name if keys is not None else f"compute-{default_station_name()}")
        if (problem := protocol.station_name_problem(self.name)) is not None:
            raise ClosedLoopError(problem)  # before anything starts: the daemon drops such a hello
        self.keys = keys
        self.instruments = instruments or ["*"]
        self.sources = sources or ["*"]
        self.outbox = Outbox(outbox or Path.home() / ".closedloop" / f"outbox-{self.name}.db", station=self.name)
        self.scheduler = scheduler
        self.local_workers = local_workers
        self.local_threads = local_threads
        self.processes = processes
        self.heartbeat_s = heartbeat_s
        self.context = context or zmq.Context.instance()
        self._capacity = capacity
        self._clients: dict[str | None, Any] = {}
        self._cluster: Any = None
        self._running: dict[int, _Running] = {}
        # cancelled by the daemon (a timeout) but still computing: a Python function cannot be interrupted, and its
        # Dask thread stays busy until it returns or its worker process is restarted, so it keeps its slot (by
        # future key) until then
        self._cancelled: dict[str, _Cancelled] = {}
        self._restarted: queue.Queue[tuple[str, bool]] = queue.Queue()  # (future key, restarted) as restarts end
        self._restarts: list[threading.Thread] = []
        # experiments lost with a worker process restarted for another's hung function: key -> that trial
        self._lost_with: dict[str, int] = {}
        self._said_held = False
        # assigned beyond capacity (the daemon's prefetch), in arrival order: not started, so handed back on a stop
        self._queued: dict[int, protocol.Assign] = {}
        #: why the daemon refused this station, if it did
        self.refused: str | None = None
        self._instance = uuid.uuid4().hex  # this process, in its hellos
        self._welcomed = 0
        self._registration = Registration(log, self.endpoint, self.keys, self.name)
        self._seen: str | None = None  # the daemon's last heartbeat read here
        self._done: queue.Queue[tuple[int, Any]] = queue.Queue()  # (trial, its finished future)
        self._stop = threading.Event()
        #: :meth:`abort` was called: what was computing is cancelled and handed back, not delivered
        self.aborted = False
        self.completed = 0
        self.failed = 0
        #: (worker start, worker end) unix times of each experiment that returned, for busy-time figures
        self.spans: list[tuple[float, float]] = []

    # -- Dask ---------------------------------------------------------------------------------

    def _address(self, options: Mapping[str, Any]) -> str | None:
        if self.scheduler:
            return self.scheduler
        if options.get("scheduler"):
            return str(options["scheduler"])
        import dask

        return dask.config.get("scheduler-address", None) or None

    def client(self, address: str | None = None) -> Any:
        """The Dask client for ``address`` (None: this station's LocalCluster, started on first use)."""
        if address not in self._clients:
            from distributed import Client

            if address is None:
                self._clients[None] = Client(self._local_cluster())
            else:
                log.info("connecting to the Dask scheduler at %s", address)
                self._clients[address] = Client(address, timeout="30s")
                self._say_reruns(address)
        return self._clients[address]

    def _say_reruns(self, address: str) -> None:
        """Warn where a scheduler this station does not own re-runs the experiment of a worker that dies: Dask's
        default (``allowed-failures`` 3) ran a function that crashed its worker 4 times, with ``retries: 0``."""
        def allowed(dask_scheduler: Any) -> int:
            return int(dask_scheduler.allowed_failures)

        try:
            reruns = self._clients[address].run_on_scheduler(allowed)
        except Exception as exc:  # noqa: BLE001 - a scheduler that will not say: nothing to warn about
            log.debug("could not read allowed-failures of the Dask scheduler at %s: %s", address, exc)
            return
        if reruns > 0:
            log.warning("the Dask scheduler at %s runs an experiment again, up to %d times, when the worker running "
                        "it dies (distributed.scheduler.allowed-failures), before the campaign's execution.retries "
                        "decide: start it with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 so each such loss is "
                        "a failure", address, reruns)

    def _local_cluster(self) -> Any:
        import dask
        from distributed import LocalCluster

        cores = os.cpu_count() or 1
        # processes: one experiment each, so that restarting the process of a hung function takes no other with it;
        # up to LOCAL_PROCESSES_PER_CORE a core (each is a Python process of ~100 MB): past that, experiments share them
        workers = self.local_workers or (min(self._capacity or cores, max(8, LOCAL_PROCESSES_PER_CORE * cores))
                                         if self.processes else min(self._capacity or cores, cores))
        threads = self.local_threads or max(1, math.ceil((self._capacity or workers) / workers))
        # a worker that dies takes its experiment with it: report that as a failure so the campaign's
        # retry policy decides, rather than Dask quietly running the experiment again elsewhere.
        # No statistical profiler: it calls sys._current_frames() every 10 ms, and on CPython 3.11 a garbage
        # collection inside that call which frees a threading.local deadlocks the whole process (the runtime's
        # thread-list lock is taken twice; CI hung so in a thread-worker cluster). Nobody reads the profile.
        settings = {"distributed.scheduler.allowed-failures": 0, "distributed.worker.profile.enabled": False}
        if self.processes:
            # read by the cluster's event loop when a worker leaves, so set for the process, not in the block below:
            # 15 s after a worker left the cluster closes its nanny for good if no worker of its name is up at that
            # moment, as when the worker of a hung function is restarted again 10 s after its previous restart
            # (seen: the station was left with no worker, and every later experiment timed out unrun)
            dask.config.set({"distributed.deploy.lost-worker-timeout": "365 days"})
        with dask.config.set(settings):
            # loopback only (the scheduler's HTTP routes too): the local cluster serves this station alone.
            # No Bokeh dashboard: Dask imports it while starting the scheduler, and two stations starting
            # clusters at once in one process race on that import ("module 'distributed.dashboard' has no
            # attribute 'scheduler'"), failing one of them
            where = {"host": "127.0.0.1"} if self.processes else {}
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=self.processes,
                                         dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False},
                                         **where)
        log.info("started a local Dask cluster: %d workers x %d threads (%s)", workers, threads,
                 "processes" if self.processes else "threads")
        return self._cluster

    @property
    def capacity(self) -> int:
        """Experiments this station runs at once."""
        if self._capacity is None:
            threads = self.client(self.scheduler or _env_scheduler()).nthreads()
            self._capacity = max(1, sum(threads.values()))
        return self._capacity

    def close(self) -> None:
        for restart in self._restarts:  # a cluster closed mid-restart says so in tracebacks on the terminal
            restart.join(timeout=15)
        for client in self._clients.values():
            try:
                client.close(timeout=5)
            except Exception as exc:  # closing must not hide the reason we are closing
                log.debug("closing a Dask client: %s", exc)
        self._clients.clear()
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=10)
            except Exception as exc:
                log.debug("closing the local Dask cluster: %s", exc)
            self._cluster = None

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Start nothing more: what is computing finishes and its answer is delivered before :meth:`run` returns."""
        self._stop.set()

    def abort(self) -> None:
        """Stop now (a second Ctrl-C): the experiments computing are cancelled, and their trials go back to the
        daemon's queue as never run, neither failed nor measured (a command is killed with the programs it started, a
        function's worker process is closed with the local cluster; on another's cluster it may compute on, unheard);
        :meth:`run` returns once the daemon has heard that, or a few heartbeats later. Safe in a signal handler."""
        self.aborted = True
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve trials until ``stop`` (or :meth:`stop`) is set. Blocks; this thread owns the socket."""
        if stop is not None:
            self._stop = stop
        # start (or reach) the cluster before registering: a first assignment must not stall the heartbeats
        self.client(self.scheduler or _env_scheduler())
        capacity = self.capacity
        sock = self._connect()
        self._registration.session = None
        sock.send(self._hello(capacity))
        last_sent = last_heard = last_turn = time.monotonic()
        # a stop lets the experiments computing finish: the station beats on (a silent station is lost, and its
        # trials run again elsewhere while they go on here) until their answers are acknowledged
        departure = Departure()
        told_cut = False  # the daemon was told that this station no longer holds what abort() cancelled
        try:
            while True:
                if self._stop.is_set():
                    if self.refused is not None:
                        break
                    if departure.announce():
                        # say so now, listing only what is computing: the trials waiting here go to other stations
                        self._queued.clear()
                        self._registration.session = None
                        sock.send(self._hello(capacity))
                        last_sent = time.monotonic()
                        log.info("stopping: finishing %d experiment(s) before leaving", len(self._running))
                    if self.aborted and self._running and self._registration.session is not None:
                        # after the departure's hello is welcomed: one sent before would be taken for a repeat of it
                        told_cut = True
                        self._cut_short()
                        self._registration.session = None
                        sock.send(self._hello(capacity))
                        last_sent = time.monotonic()
                    heard = not told_cut or self._registration.session is not None
                    if departure.may_leave(not self._running, self.outbox, self.heartbeat_s, heard):
                        break
                    if time.monotonic() - last_heard > 10 * self.heartbeat_s:
                        # nobody to deliver to (the daemon has ended, as when `closedloop run` is interrupted):
                        # waiting for an experiment that may take hours would hold the process for nothing
                        log.warning("stopping: no word from the daemon for %.0f s; leaving %d experiment(s) unfinished",
                                    time.monotonic() - last_heard, len(self._running))
                        break
                # short naps while experiments run: a finished future is noticed within milliseconds
                if sock.poll(3 if self._running else 20, zmq.POLLIN):
                    last_heard = time.monotonic()
                    self._on_message(sock, sock.recv())
                while True:
                    try:
                        trial_id, future = self._done.get_nowait()
                    except queue.Empty:
                        break
                    payload = self._finish(trial_id, future)
                    # let go of the future: Dask computes a finished one again, for as long as it is referenced,
                    # when the worker process holding its result dies (another experiment's crash, a node lost)
                    del future
                    if payload is not None:
                        sock.send(payload)
                        last_sent = time.monotonic()
                self._end_hung()
                while self._queued and self._busy() < capacity and not self._stop.is_set():
                    trial_id = next(iter(self._queued))
                    self._submit(sock, self._queued.pop(trial_id))
                now = time.monotonic()
                last_heard, last_turn = protocol.heard_allowing_for(now - last_turn, last_heard, now), now
                registered = self._registration.session is not None
                if now - last_sent >= self.heartbeat_s:
                    sock.send(protocol.encode(protocol.Heartbeat(running=sorted(self._running), holds=self._holdings(),
                                                                 seen=self._seen))
                              if registered else self._hello(capacity))
                    last_sent = now
                if registered and now - last_heard > 10 * self.heartbeat_s:
                    self._registration.unheard(last_heard, now)  # said once a silence
                    sock.close(linger=0)
                    sock = self._connect()
                    sock.send(self._hello(capacity))
                    self._registration.session, last_heard = None, now
                elif not registered and now - last_heard > 10 * self.heartbeat_s:
                    # the station was silent for good with a wrong key
                    self._registration.unheard(last_heard, now, "not registered; still trying")
                    last_heard = now
        finally:
            sock.close(linger=0)
            for running in self._running.values():
                running.future.cancel()
            self.close()
            self.outbox.close()

    def _cut_short(self) -> None:
        """Cancel every experiment computing; none is reported (a failure would count an attempt, and with no retries
        abandon it): the hello that follows lists none of them, and the daemon queues them again."""
        for trial_id, running in list(self._running.items()):
            running.future.cancel()
            del self._running[trial_id]
            log.warning("%s cancelled after %.1f s: it goes back to the daemon's queue, to be run again; this station "
                        "stops", named(running.assignment), time.monotonic() - running.submitted)

    # -- communication ------------------------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        return connect_station(self.context, self.endpoint, self.name, self.keys)

    def _busy(self) -> int:
        """Experiments computing on Dask: the running trials and those cancelled that have not returned yet."""
        return len(self._running) + len(self._cancelled)

    def _holdings(self) -> list[int]:
        """Trials this station holds: running, waiting for a free slot, or answered and not yet acknowledged.

        A stopping station holds no waiting trial: it will not start them, and the daemon re-queues what a station
        does not hold, for the others.
        """
        waiting = set() if self._stop.is_set() else set(self._queued)
        return sorted(set(self._running) | waiting | {trial for trial, _ in self.outbox.pending()})

    def _hello(self, capacity: int) -> bytes:
        return protocol.encode(protocol.Hello(station=self.name, instruments=self.instruments, sources=self.sources,
                                              # a stopping station serves nothing: the daemon sends it no more
                                              campaigns=[] if self._stop.is_set() else ["*"],
                                              capacity=capacity, outstanding=self._holdings(), instance=self._instance,
                                              welcomed=self._welcomed))

    def _on_message(self, sock: zmq.Socket, frame: bytes) -> None:
        try:
            message = protocol.decode(frame)
        except ProtocolError as exc:
            log.warning("dropped a message from the daemon: %s", exc)
            return
        if isinstance(message, protocol.Welcome):
            if not self._registration.welcome(message, leaving=self._stop.is_set()):
                return  # the answer to a repeat of our hello, in the session it registered
            # the daemon counts a station lost after a few of its heartbeat intervals: never beat slower than it asks
            self.heartbeat_s = min(self.heartbeat_s, message.heartbeat_s)
            self._welcomed += 1
            for _, payload in self.outbox.pending():  # the daemon may have restarted: offer what it never acked
                sock.send(payload)
        elif isinstance(message, protocol.Refused):
            self._registration.session = None
            if message.reason.startswith("unregistered"):
                sock.send(self._hello(self.capacity))
                return
            log.error("daemon refused this station: %s", message.reason)
            self.refused = message.reason
            self._stop.set()
        elif isinstance(message, protocol.Ack):
            self.outbox.remove(message.trial_id, message.assignment)
        elif isinstance(message, protocol.Heartbeat):
            self._seen = message.msg_id
        elif isinstance(message, protocol.Assign):
            self._start(sock, message)
        elif isinstance(message, protocol.Cancel):
            queued = self._queued.pop(message.trial_id, None)
            if queued is not None:
                log.info("%s %s before it started: %s", named(queued),
                         "handed back" if message.unstarted_only else "cancelled", message.reason)
            if message.unstarted_only:
                return  # a stopping daemon takes back only what has not started: what computes finishes here
            running = self._running.pop(message.trial_id, None)
            if running is not None:
                # the daemon has already recorded the timeout and applied its retry policy; a failure
                # sent now would be taken for the next attempt's, so the trial is dropped quietly. Its future is
                # not cancelled: that would free its slot while the function goes on holding the Dask thread, and the
                # next experiment would wait in Dask's queue with its timeout running, to time out unrun
                self._cancelled[running.future.key] = _Cancelled(message.trial_id, running.future)
                if self._restartable(running.future):
                    log.warning("cancelling running %s: %s (its worker process is restarted if it has not returned "
                                "within %g s)", named(running.assignment), message.reason, HUNG_GRACE_S)
                else:
                    log.warning("cancelling running %s: %s (its experiment holds a slot until it returns)",
                                named(running.assignment), message.reason)
                    self._say_held()

    # -- experiments ----------------------------------------------------------------------------

    def _start(self, sock: zmq.Socket, assignment: protocol.Assign) -> None:
        trial = assignment.trial_id
        stored = self.outbox.result(trial)
        if stored is not None:  # finished before a reconnect: send the same result, never re-run
            sock.send(stored)
            return
        if trial in self._running:
            # one experiment is one run: the one running answers the daemon's latest assignment of it
            self._running[trial].assignment = assignment
            return
        if trial in self._queued or (not self._stop.is_set() and self._busy() >= self.capacity):
            # held here, not in Dask's queue, so that a stop can hand it back unstarted
            self._queued[trial] = assignment
            return
        if self._stop.is_set():
            # sent before the daemon read that this station is leaving; it re-queues what the station does not hold
            log.info("%s not started: stopping", named(assignment))
            return
        self._submit(sock, assignment)

    def _submit(self, sock: zmq.Socket, assignment: protocol.Assign) -> None:
        trial = assignment.trial_id
        target = assignment.instrument.target
        sock.send(protocol.encode(protocol.Started(trial_id=trial, assignment=assignment.msg_id)))
        try:
            if not is_computational(target):
                raise ComputeError(f"a compute station runs functions and commands, not instrument {target!r}")
            if "*" not in self.instruments and target not in self.instruments:
                # a station started for one function ran any 'command:...' an assign named, as a program here
                raise ComputeError(f"this station runs only {', '.join(self.instruments)}, not {target!r}")
            client = self.client(self._address(assignment.instrument.options))
            future = client.submit(experiment_outcome, target, dict(assignment.setpoints),
                                   dict(assignment.instrument.options), list(assignment.outputs), assignment.timeout_s,
                                   key=f"closedloop-trial-{trial}-{uuid.uuid4().hex[:8]}", pure=False)
        except Exception as exc:  # cannot even submit: a failure of this trial, reported like any other
            log.warning("%s failed: %s", named(assignment), _describe(exc))
            payload = protocol.encode(protocol.Failure(trial_id=trial, assignment=assignment.msg_id,
                                                       error=_describe(exc)))
            self.outbox.put(trial, payload)
            sock.send(payload)
            self.failed += 1
            return
        self._running[trial] = _Running(assignment, future)
        future.add_done_callback(lambda f, trial=trial: self._done.put((trial, f)))
        log.info("%s started (Dask task %s)", named(assignment), future.key)

    # -- hung functions -------------------------------------------------------------------------

    def _restartable(self, future: Any) -> bool:
        """Whether this station may restart the worker process running ``future``: only on its own LocalCluster of
        processes (a thread cannot be stopped; another's cluster runs other people's work)."""
        local = self._clients.get(None)
        return self.processes and local is not None and future.client is local

    def _say_held(self) -> None:
        if self._said_held:
            return
        self._said_held = True
        why = ("runs on thread workers" if not self.processes
               else "runs on a Dask scheduler this station does not own, whose workers it does not restart")
        log.warning("a cancelled Python function cannot be stopped: this station %s, so each keeps its slot until it "
                    "returns; %d that never return stall the station (use process workers: the local cluster without "
                    "--scheduler)", why, self.capacity)

    def _end_hung(self) -> None:
        """Restart the worker process of each cancelled function that has not returned within the grace; free the
        slots of those restarted."""
        while True:
            try:
                key, restarted = self._restarted.get_nowait()
            except queue.Empty:
                break
            cancelled = self._cancelled.get(key)
            if cancelled is None:
                continue
            if restarted or cancelled.returned:
                del self._cancelled[key]
                log.info("trial %s: its worker process was restarted; its slot is free", cancelled.trial_id)
            else:
                cancelled.restarting, cancelled.unstoppable = False, True
                self._lost_with = {k: t for k, t in self._lost_with.items() if t != cancelled.trial_id}
        now = time.monotonic()
        due = [c for c in self._cancelled.values() if not (c.restarting or c.returned or c.unstoppable)
               and now - c.since >= HUNG_GRACE_S and self._restartable(c.future)]
        if not due:
            return
        client = self._clients[None]
        try:
            processing = client.processing()
        except Exception as exc:  # the scheduler is closing: there is nothing left to restart
            log.debug("asking the Dask scheduler what its workers run: %s", exc)
            return
        where = {key: worker for worker, keys in processing.items() for key in keys}
        for cancelled in due:
            worker = where.get(cancelled.future.key)
            if worker is None:  # between ending and its callback: look again after another grace
                cancelled.since = now
                continue
            cancelled.restarting = True
            others = [key for key in processing[worker] if key != cancelled.future.key]
            for key in others:
                self._lost_with[key] = cancelled.trial_id
            log.warning("trial %s: the cancelled function has not returned %g s after its cancel; restarting its Dask "
                        "worker process %s%s", cancelled.trial_id, HUNG_GRACE_S, worker,
                        f" (and losing the {len(others)} other experiment(s) it runs)" if others else "")
            # in a thread: the old process gets 4 s to close before it is killed, and the station beats on meanwhile
            restart = threading.Thread(target=self._restart, args=(client, worker, cancelled.future.key),
                                       name=f"closedloop-restart-{cancelled.trial_id}", daemon=True)
            self._restarts = [r for r in self._restarts if r.is_alive()] + [restart]
            restart.start()

    def _restart(self, client: Any, worker: str, key: str) -> None:
        try:
            outcome = client.restart_workers([worker], timeout=30, raise_for_error=False).get(worker)
        except Exception as exc:
            outcome = _describe(exc)
        if outcome != "OK":
            # the slot stays held until the function returns: a retry would wait in Dask's queue
            log.warning("restarting Dask worker %s failed (%s): its slot stays held until the function returns",
                        worker, outcome)
        self._restarted.put((key, outcome == "OK"))  # the slot is free once the new process is up, not before

    def _finish(self, trial_id: int, future: Any) -> bytes | None:
        """Store the outcome of a finished future in the outbox; the payload to send, or None if cancelled."""
        cancelled = self._cancelled.get(future.key)
        if cancelled is not None and cancelled.restarting:
            cancelled.returned = True  # killed with its process: the slot frees when the new process is up
        elif cancelled is not None:
            del self._cancelled[future.key]
            log.info("trial %s: the cancelled experiment has returned; its slot is free", trial_id)
        lost_with = self._lost_with.pop(future.key, None)
        running = self._running.get(trial_id)
        if running is None or running.future is not future:
            return None  # cancelled, and perhaps assigned here again since: that is another future
        del self._running[trial_id]
        if future.cancelled():
            return None
        try:
            outcome = future.result(timeout=5)
            if "error" in outcome:
                raise ComputeError(outcome["error"])
            message: protocol.ResultMessage | protocol.Failure = protocol.ResultMessage(
                trial_id=trial_id, assignment=running.assignment.msg_id, run_uid=f"dask-{future.key}",
                values=outcome["values"], duration_s=max(0.0, outcome["finished"] - outcome["started"]))
            self.spans.append((outcome["started"], outcome["finished"]))
            self.completed += 1
            log.info("%s", finished(running.assignment, message))
        except Exception as exc:  # every failure is reported with its error, never swallowed
            error = _describe(exc)
            if lost_with is not None:
                error = (f"its Dask worker process was restarted to end the hung function of timed-out trial "
                         f"{lost_with}, and this experiment, running in the same process, was lost with it ({error})")
            log.warning("%s failed after %.1f s: %s", named(running.assignment), time.monotonic() - running.submitted,
                        error)
            message = protocol.Failure(trial_id=trial_id, assignment=running.assignment.msg_id, error=error)
            self.failed += 1
        payload = protocol.encode(message)
        # persisted before it is sent: survives a crash from here on; a result is also the station's record of a run
        self.outbox.put(trial_id, payload, message.run_uid if isinstance(message, protocol.ResultMessage) else None)
        return payload


def _env_scheduler() -> str | None:
    import dask

    return dask.config.get("scheduler-address", None) or None


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return f"KilledWorker: the Dask worker running this experiment was lost ({exc})"[:16_000]
    if isinstance(exc, ClosedLoopError):
        return str(exc)[:16_000]
    return f"{name}: {exc}"[:16_000]
