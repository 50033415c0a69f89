"""The live dashboard: a Starlette app serving one page, its state as JSON, and the daemon's events.

- ``GET /`` the page (plain HTML, one vanilla JS file drawing SVG charts; nothing from the network);
- ``GET /api/state`` campaigns, stations, trials with provenance, best-so-far series, Pareto fronts:
  read from the store (only what is new or open since the last poll: :mod:`closedloop.dashboard.state`),
  with the daemon's live status from its control socket;
- ``GET /api/model?campaign=C&parameter=P`` the model's view: predicted mean and uncertainty of the
  first objective along ``P`` through the current best experiment, from a planner rebuilt from the
  store (cached per number of results);
- ``GET /api/trial?campaign=C&trial=N`` why trial N was chosen (:func:`closedloop.provenance.explain`);
- ``GET /events`` the daemon's PUB event stream as server-sent events;
- ``POST /api/control`` ``{"method": "pause"|"resume"|"stop", "campaign"?}`` and
  ``{"method": "approve"|"edit"|"reject", "campaign", "trial", "parameters"?, "by"?}``, relayed to the
  daemon's control socket exactly as the command line sends them; refused with 403 when the dashboard
  is read-only.

A dashboard is read-only unless it listens on loopback or has a token (``--token``): anyone who can
reach a non-loopback port could otherwise stop a campaign. With a token, every request must carry it
(``?token=`` on the page's address, which the page then sends as ``X-Closedloop-Token``).

Example:
    >>> server = DashboardServer(DashboardConfig(store="results/branin.db",
    ...                                          control="tcp://127.0.0.1:5700", events="tcp://127.0.0.1:5702"))  # doctest: +SKIP
    >>> server.start(); print(server.url)                                                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import zmq
import zmq.asyncio
from uvicorn.protocols.http.h11_impl import H11Protocol
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from closedloop import provenance
from closedloop.dashboard.state import CampaignView, finite
from closedloop.errors import ClosedLoopError, ProtocolError
from closedloop.protocol import wants_ipv6
from closedloop.keys import ClientKeys
from closedloop.store import Store, TrialStatus, displayed

log = logging.getLogger("closedloop.dashboard")

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# what the buttons may ask of the daemon's control socket (status and cancel are not the page's)
CONTROL_METHODS = ("pause", "resume", "stop", "approve", "edit", "reject")
# event streams served at once: each holds a SUB socket on the daemon's PUB, file descriptors of the daemon's own
# process under `daemon --dashboard`, where anyone who may read the page could otherwise open them until none are left
MAX_STREAMS = 32
# connections held at once, and how long one may go without sending a whole request: uvicorn keeps a connection that
# sends nothing (or a header a byte at a time) for good, each a file descriptor of the daemon's own process under
# `daemon --dashboard`; 300 idle connections stopped a daemon allowed 300 ('Too many open files' keeping a run's documents)
MAX_CONNECTIONS = 128
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard reads and talks to.

    Args:
        store: store file or URL (the daemon's).
        control: the daemon's control endpoint (None: no live status, no buttons).
        events: the daemon's PUB endpoint (None: the page polls the store instead).
        host: interface to listen on; anything but loopback makes the dashboard read-only without a token.
        port: TCP port (0 picks a free one).
        token: a shared secret that allows control from beyond loopback.
        read_only: refuse every control request even on loopback.
        keys: a key pair the daemon allows, and its public key: a daemon with keys publishes its events to
            CURVE subscribers only (without keys the page polls the store).
    """

    store: str
    control: str | None = None
    events: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    read_only: bool = False
    keys: ClientKeys | None = None

    @property
    def effective_read_only(self) -> bool:
        return self.read_only or (self.host not in LOOPBACK and not self.token)

    @property
    def read_only_reason(self) -> str:
        if self.read_only:
            return "this dashboard was started read-only (--read-only)"
        return (f"this dashboard listens on {self.host}, beyond loopback, without a token: it is read-only "
                "(give it a token: CLOSEDLOOP_DASHBOARD_TOKEN=SECRET, or --token / --dashboard-token; or listen on "
                "127.0.0.1)")


class _ModelCache:
    """The model's view per (campaign, results, parameter): a refit only when results arrive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one fit at a time: the machine running the loop has few cores
        self._cache: dict[tuple[str, int, str | None, str | None], dict[str, Any]] = {}

    def get(self, store: Store, campaign: str, parameter: str | None, second: str | None = None) -> dict[str, Any]:
        row = store.campaign_row(campaign)
        counts = store.counts(row.id)  # type: ignore[arg-type]
        finished = counts.get(TrialStatus.completed.value, 0) + counts.get(TrialStatus.failed.value, 0)
        # keyed by what is drawn, not by what was asked: a name per request was a GP fit (and a view kept) per request
        parameter, second = _chosen(store.campaign(row.id), parameter, second)  # type: ignore[arg-type]
        key = (campaign, finished, parameter, second)
        with self._lock:
            if key not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != campaign or k[1] == finished}
                self._cache[key] = model_view(store, campaign, parameter, second)
            return self._cache[key]


def model_view(store: Store, campaign: str, parameter: str | None = None, second: str | None = None,
               points: int = 61) -> dict[str, Any]:
    """Predicted mean and standard deviation of the first objective along ``parameter`` through the best
    experiment so far, with the observed experiments projected on that axis; with ``second``, also the
    predicted mean over the plane of both (``grid``: rows along ``second``, columns along ``parameter``).
    ``results`` counts the experiments that gave every output as a number, ``failures`` the rest the model was
    given (failed experiments, or readings that were not finite numbers).

    The campaign's planner is rebuilt from the store; a backend without a model of its own (Sobol,
    random, Ax) is shown through the BoTorch planner's GP on the same data.
    """
    from closedloop.planner import make_planner
    from closedloop.planner.botorch_backend import BotorchPlanner
    from closedloop.planner.observations import ObservationLog

    row = store.campaign_row(campaign)
    spec = store.campaign(row.id)  # type: ignore[arg-type]
    results = store.results(row.id)  # type: ignore[arg-type]
    axes = _axes(spec)
    objective = next(iter(spec.objectives))
    # counted apart, as the planner splits them (ObservationLog.usable): "14 results" had counted 4 failures, which
    # have no value; the model takes them as the worst result seen and, in its failure classifier, as where
    # experiments fail
    log = ObservationLog(spec)
    usable = sum(1 for r in results if log.usable(r))
    out: dict[str, Any] = {"available": False, "parameters": axes, "objective": objective, "results": usable,
                           "failures": len(results) - usable}
    if not axes:
        return {**out, "reason": "no numeric parameter to draw along"}
    parameter, second = _chosen(spec, parameter, second)
    out["parameter"] = parameter
    planner = make_planner(spec)
    if not hasattr(planner, "predict") or spec.planner.backend != "botorch":
        try:
            planner = BotorchPlanner(spec)
        except ClosedLoopError as exc:
            return {**out, "reason": f"no model for this campaign: {exc}"}
    planner.ingest(results)
    with provenance.planning_lock:
        best = planner.best()
    if best is None:
        # with results, it said "no completed experiment yet" as well: to a lab whose films all missed the yield
        completed = sum(1 for r in results if r.values is not None)
        counted = ("is on the Pareto front (within the objectives' thresholds and the outcome constraints)"
                   if len(spec.objectives) > 1 else "counts (within the outcome constraints, from the campaign's source)")
        return {**out, "reason": f"none of the {completed} completed experiments {counted}: no best to draw through"
                if completed else "no completed experiment yet"}
    xs, log_scale = _axis(spec.parameters[parameter], points)
    with provenance.planning_lock:
        predictions = planner.predict([{**best.parameters, parameter: x} for x in xs])
    if predictions is None:
        return {**out, "reason": "too few results for a model"}
    observed = [{"x": r.parameters.get(parameter), "y": r.values.get(objective), "trial": r.trial,
                 **({"x2": r.parameters.get(second)} if second else {})}
                for r in results if r.values is not None and objective in r.values]
    out = {**out, "available": True, "through": best.parameters, "best_trial": best.trial, "x": xs,
           "mean": [pr[objective]["mean"] for pr in predictions], "std": [pr[objective]["std"] for pr in predictions],
           "observed": observed, "log_scale": log_scale,
           "backend": spec.planner.backend if spec.planner.backend == "botorch" else "botorch (view only)"}
    if second is not None:
        gx, _ = _axis(spec.parameters[parameter], 25)
        gy, _ = _axis(spec.parameters[second], 25)
        with provenance.planning_lock:
            plane = planner.predict([{**best.parameters, parameter: x, second: y} for y in gy for x in gx]) or []
        means = [pr[objective]["mean"] for pr in plane]
        out.update(second=second, grid_x=gx, grid_y=gy, grid=[means[i * len(gx):(i + 1) * len(gx)] for i in range(len(gy))])
    return out


def _axes(spec: Any) -> list[str]:
    """The numeric parameters, which the model's view can draw along."""
    from closedloop.campaign import ContinuousParameter, IntegerParameter

    return [n for n, p in spec.parameters.items() if isinstance(p, (ContinuousParameter, IntegerParameter))]


def _chosen(spec: Any, parameter: str | None, second: str | None) -> tuple[str | None, str | None]:
    """The axes a request for ``parameter`` (and ``second``) draws: the first numeric parameter for an unknown one,
    no plane for an unknown or repeated second."""
    axes = _axes(spec)
    parameter = parameter if parameter in axes else (axes[0] if axes else None)
    return parameter, second if second in axes and second != parameter else None


def _axis(p: Any, points: int) -> tuple[list[float], bool]:
    """Evenly spread values of a numeric parameter (log-spaced on a log scale; whole numbers for integers)."""
    from closedloop.campaign import IntegerParameter

    low, high = p.bounds
    log_scale = getattr(p, "scale", None) == "log" and low > 0
    xs = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (points - 1)) if log_scale
          else low + (high - low) * i / (points - 1) for i in range(points)]
    if isinstance(p, IntegerParameter):
        xs = sorted({int(round(x)) for x in xs})
    return xs, log_scale


class Dashboard:
    """The app's state: the store, the daemon's endpoints, the model cache."""

    def __init__(self, config: DashboardConfig):
        # a daemon bound to every interface (tcp://*:5702) is reached on loopback
        config = replace(config, control=_connectable(config.control), events=_connectable(config.events))
        self.config = config
        # it only reads: a mistyped --store is refused rather than served as a new empty store
        self.store = Store(config.store, read_only=True)
        self.models = _ModelCache()
        self._views: dict[str, CampaignView] = {}  # by campaign name: what the page was last sent of each
        self._views_lock = threading.Lock()
        self.closing = False
        self._streams = 0  # /events responses being served (the event loop's thread alone counts them)
        self.app = Starlette(routes=[
            Route("/", self.index),
            Route("/api/state", self.state),
            Route("/api/model", self.model),
            Route("/api/trial", self.trial),
            Route("/api/control", self.control, methods=["POST"]),
            Route("/events", self.events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ], exception_handlers={DBAPIError: self._store_failed})

    def _store_failed(self, _request: Request, exc: Exception) -> Response:
        """A store that cannot be read (deleted or moved, a database server down): one line in the log and on the page.
        Each poll of each open page had logged a full traceback, and the page said only "dashboard unreachable"."""
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        msg = f"cannot read the store {self.store.display}: {reason}"
        log.warning("%s", msg)
        return JSONResponse({"success": False, "msg": msg}, status_code=503)

    # -- access ----------------------------------------------------------------------------------

    def _denied(self, request: Request) -> Response | None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if self.config.host in LOOPBACK and host not in LOOPBACK:
            # a loopback dashboard asked for by another name: a DNS-rebinding page, not this machine's browser
            return JSONResponse({"success": False, "msg": f"refused: Host {host!r} is not loopback"}, status_code=403)
        token = self.config.token
        if not token:
            return None
        given = request.headers.get("x-closedloop-token") or request.query_params.get("token") or ""
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        return JSONResponse({"success": False, "msg": "this dashboard needs its token (?token=...)"}, status_code=401)

    # -- pages and data --------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return self._denied(request) or FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        daemon = finite(await run_in_threadpool(self._daemon_status))
        campaigns = await run_in_threadpool(self._campaigns, daemon)
        # the campaigns are finite already: going over every point of their series again cost more than the poll
        return JSONResponse({
            "read_only": self.config.effective_read_only,
            "read_only_reason": self.config.read_only_reason if self.config.effective_read_only else None,
            "store": self.store.display, "daemon": daemon, "campaigns": campaigns, "events": bool(self.config.events),
            "time": time.time()})

    def _daemon_status(self) -> dict[str, Any] | None:
        if not self.config.control:
            return None
        from closedloop.daemon import control_request

        try:
            status = control_request(self.config.control, "status", timeout_s=1.5)
        except ProtocolError as exc:
            return {"success": False, "msg": str(exc)}
        if isinstance(status.get("store"), str):  # a daemon of an earlier version named it password and all
            status["store"] = displayed(status["store"])
        return status

    def _campaigns(self, daemon: dict[str, Any] | None) -> list[dict[str, Any]]:
        live = {c["name"]: c for c in (daemon or {}).get("campaigns", [])}
        out = []
        with self._views_lock:  # two polls at once would both bring one view up to date
            rows = self.store.campaigns()
            for row in rows:
                view = self._views.get(row.name)
                if view is None or view.key != CampaignView.key_of(row):
                    view = self._views[row.name] = CampaignView(self.store, row)
                out.append({**view.poll(self.store, row), "live": live.get(row.name)})
            for gone in self._views.keys() - {row.name for row in rows}:
                del self._views[gone]
        return out

    async def model(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        campaign = request.query_params.get("campaign", "")
        try:
            view = await run_in_threadpool(self.models.get, self.store, campaign, request.query_params.get("parameter"),
                                           request.query_params.get("second") or None)
        except ClosedLoopError as exc:
            return JSONResponse({"available": False, "reason": str(exc)}, status_code=404)
        return JSONResponse(finite(view))

    async def trial(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            info = await run_in_threadpool(provenance.explain, self.store, request.query_params.get("campaign", ""),
                                           int(request.query_params.get("trial", "0")))
        except (ClosedLoopError, ValueError) as exc:
            return JSONResponse({"success": False, "msg": str(exc)}, status_code=404)
        return JSONResponse(finite({**info, "lines": provenance.explain_lines(info)}))

    # -- control ---------------------------------------------------------------------------------

    async def control(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if self.config.effective_read_only:
            return JSONResponse({"success": False, "msg": self.config.read_only_reason}, status_code=403)
        client = request.client.host if request.client else None
        if not self.config.token and not _loopback(client):
            # the app only believes it listens on loopback (create_app served by uvicorn on 0.0.0.0): a peer from
            # beyond, naming 'Host: 127.0.0.1', passed the DNS-rebinding check and stopped the daemon with no token
            return JSONResponse({"success": False, "msg": f"refused: a control request from {client}, beyond loopback, "
                                 "needs the dashboard's token (CLOSEDLOOP_DASHBOARD_TOKEN)"}, status_code=403)
        # another site's page in the scientist's browser must not press the buttons: such a request either
        # names its origin or, to avoid a CORS preflight, cannot be sent as application/json
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse({"success": False, "msg": f"refused: a request from {origin}"}, status_code=403)
        if not (request.headers.get("content-type") or "").startswith("application/json"):
            return JSONResponse({"success": False, "msg": "send JSON (Content-Type: application/json)"}, status_code=415)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("send a JSON object")
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
            return JSONResponse({"success": False, "msg": f"bad request: {exc}"}, status_code=400)
        except ClientDisconnect:  # gone before its body was whole: nothing to act on, and no traceback in the log
            return Response(status_code=400)
        reply = await run_in_threadpool(self._control, body)
        return JSONResponse(reply, status_code=200 if reply.get("success") else 409)

    def _control(self, body: dict[str, Any]) -> dict[str, Any]:
        """Relay a button to the daemon's control socket, as the command line sends it."""
        method = body.get("method")
        if method not in CONTROL_METHODS:
            return {"success": False, "msg": f"unknown method {method!r} ({', '.join(CONTROL_METHODS)})"}
        if not self.config.control:
            return {"success": False, "msg": "no daemon control endpoint: start the dashboard with --control "
                                             "(the buttons act through a running daemon)"}
        params = {k: body[k] for k in ("campaign", "trial", "parameters", "by") if body.get(k) is not None}
        if method in ("approve", "edit", "reject"):
            params.setdefault("by", "dashboard")
        from closedloop.daemon import control_request

        try:
            return control_request(self.config.control, method, params)
        except ProtocolError as exc:  # no daemon answers
            return {"success": False, "msg": str(exc)}

    # -- live events -----------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if self._streams >= MAX_STREAMS:
            return JSONResponse({"success": False, "msg": f"{MAX_STREAMS} event streams are open already: this page "
                                 "polls instead"}, status_code=503, headers={"Retry-After": "30"})
        self._streams += 1  # here, not when the stream starts: a burst of requests must not all pass the check
        return _Counted(self._stream_ended, self._stream(request), media_type="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _stream_ended(self) -> None:
        self._streams -= 1

    async def _stream(self, request: Request) -> Any:
        yield "retry: 2000\n\n"
        if not self.config.events:
            yield 'event: info\ndata: {"msg": "no daemon event stream; polling the store"}\n\n'
            while not self.closing and not await request.is_disconnected():
                await asyncio.sleep(1.0)
            return
        if self.config.keys is None and ((await run_in_threadpool(self._daemon_status)) or {}).get("publish_keys"):
            # a plain SUB never completes a CURVE handshake: the stream would stay silent for good
            yield ('event: info\ndata: {"msg": "the daemon\'s events need a key pair it allows (closedloop dashboard '
                   '--secret-key NAME.key_secret --server-key daemon.key); polling the store"}\n\n')
            while not self.closing and not await request.is_disconnected():
                await asyncio.sleep(1.0)
            return
        context = zmq.asyncio.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.IPV6, wants_ipv6(self.config.events))
        if self.config.keys is not None:
            self.config.keys.apply(sub)
        sub.connect(self.config.events)
        last = time.monotonic()
        try:
            while not self.closing:
                if await sub.poll(500, zmq.POLLIN):
                    frames = await sub.recv_multipart()
                    if len(frames) == 2:
                        yield f"data: {frames[1].decode()}\n\n"
                        last = time.monotonic()
                        continue
                if await request.is_disconnected():
                    return
                if time.monotonic() - last > 15:
                    yield ": keep-alive\n\n"  # proxies close silent streams
                    last = time.monotonic()
        finally:
            sub.close(linger=0)


class _Guarded(H11Protocol):
    """uvicorn's HTTP/1.1 connection, answered 503 and closed beyond ``MAX_CONNECTIONS``, and closed when it has sent no
    whole request for ``REQUEST_TIMEOUT_S`` while none of its requests is being answered (an event stream is kept)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._seen: Any = None  # the request cycle the last check found
        self._check: asyncio.TimerHandle | None = None
        if len(self.connections) > MAX_CONNECTIONS:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            transport.close()
            return
        self._check = self.loop.call_later(REQUEST_TIMEOUT_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if not answering and self.cycle is self._seen:
            self.transport.close()
            return
        self._seen = self.cycle
        self._check = self.loop.call_later(REQUEST_TIMEOUT_S, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._check is not None:
            self._check.cancel()
        super().connection_lost(exc)


class _Counted(StreamingResponse):
    """An event stream that gives its place back however it ends (a client gone before the first byte too)."""

    def __init__(self, ended: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended = ended

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ended()


def _loopback(address: str | None) -> bool:
    """Whether a peer's address is this machine's loopback (127.0.0.0/8, ::1, and IPv4 loopback mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _connectable(endpoint: str | None) -> str | None:
    """A bound endpoint as a peer connects to it: ``tcp://*:5702``, ``tcp://0.0.0.0:5702`` and ``tcp://[::]:5702``
    via loopback."""
    if endpoint is None:
        return None
    for wildcard, loopback in (("tcp://*:", "127.0.0.1"), ("tcp://0.0.0.0:", "127.0.0.1"), ("tcp://[::]:", "[::1]")):
        if endpoint.startswith(wildcard):
            return f"tcp://{loopback}:" + endpoint[len(wildcard):]
    return endpoint


def create_app(config: DashboardConfig) -> Starlette:
    """The ASGI app (for ``uvicorn closedloop.dashboard:create_app --factory`` style deployments)."""
    return Dashboard(config).app


def _import_anyio_names_now() -> None:
    """Import, while this module is imported, the anyio modules that starlette would otherwise import on first use.

    anyio imports its names lazily, so the first file response imports a module inside the server's
    thread. Under pytest that import parses source into an AST (assertion rewriting covers plugin
    packages such as anyio), and CPython 3.11.7 raises SystemError ("AST constructor recursion depth
    mismatch") when two threads build ASTs at once: a page load failed in CI that way. Done when a
    server was built, it raced a daemon already serving in other threads (CI again), so it is done at import.
    """
    import anyio
    import anyio.abc

    for package in (anyio, anyio.abc):
        for name in dir(package):
            getattr(package, name)


_import_anyio_names_now()


def listening_socket(host: str, port: int) -> socket.socket:
    """The dashboard's socket, bound; a port it cannot have is a ClosedLoopError that says it is the dashboard's.

    ``closedloop daemon --dashboard`` takes it before the daemon claims or writes anything: with the port in use,
    it had written its campaign row first."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port past 65535
        listening.close()
        # said as 'OSError: [Errno 98] Address already in use', it did not say it was the dashboard's port (under
        # `daemon --dashboard` the daemon has three endpoints of its own)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        busy = (" (another dashboard or program listens there: stop it, or choose another port)"
                if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE else "")
        raise ClosedLoopError(f"the dashboard cannot listen on {host}:{port}: {why}{busy}") from None
    return listening


class DashboardServer:
    """The dashboard served by uvicorn in a background thread (``closedloop daemon --dashboard``, tests), on
    ``listening`` (see :func:`listening_socket`) or on a socket of its own for the config's host and port."""

    def __init__(self, config: DashboardConfig, listening: socket.socket | None = None):
        import uvicorn

        self._socket = listening if listening is not None else listening_socket(config.host, config.port)
        try:
            self.dashboard = Dashboard(config)
        except BaseException:
            self._socket.close()
            raise
        self.config = config
        self.port = self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.dashboard.app, log_level="warning", lifespan="off", http=_Guarded,
                                                    timeout_graceful_shutdown=2, access_log=False))
        self._thread = threading.Thread(target=self._run, name="closedloop-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        # encoded: a token of base64 (`openssl rand -base64`) has '+', which an address reads as a space, and '/' and '='
        return f"http://{host}:{self.port}/" + (f"?token={quote(self.config.token, safe='')}" if self.config.token else "")

    def _run(self) -> None:
        self.server.run(sockets=[self._socket])

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise ProtocolError(f"the dashboard did not start on {self.config.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.dashboard.closing = True
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
        self.dashboard.store.close()

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        try:
            self._run()
        finally:
            self.dashboard.closing = True
            self._socket.close()
            self.dashboard.store.close()
