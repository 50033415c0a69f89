"""Messages between the daemon and station workers: versioned pydantic models, JSON on the wire.

Topology: the daemon binds a ROUTER socket; each station connects a DEALER socket whose routing id is
the station's name. A message is one frame of UTF-8 JSON (the ROUTER adds the identity frame). Every
message carries ``v`` (the protocol version) and a ``msg_id``; a peer speaking another version gets a
``refused`` naming both versions, and both sides log it.

| message    | direction          | meaning                                                          |
|------------|--------------------|------------------------------------------------------------------|
| hello      | station -> daemon  | I am STATION: these instruments/campaigns, N at once, these trials still with me |
| welcome    | daemon -> station  | registered for session S; heartbeat every H seconds              |
| refused    | daemon -> station  | not registered (wrong protocol version, unregistered, ...)       |
| heartbeat  | both ways          | still alive; (station) these trials are running                  |
| assign     | daemon -> station  | run this trial (setpoints, instrument, timeout) in session S     |
| started    | station -> daemon  | the trial's run has started                                      |
| result     | station -> daemon  | the trial's measured values, noise, run uid and timing           |
| failure    | station -> daemon  | the trial failed, with the device error                          |
| ack        | daemon -> station  | the result or failure of a trial is stored; forget it            |
| cancel     | daemon -> station  | stop the trial (timeout, operator); ``unstarted_only``: drop it if not started |
| control    | daemon -> station  | pause the RunEngine at its next checkpoint, or resume it         |

Exactly-once rests on three rules: the daemon stores a trial as dispatched before the ``assign``
leaves; a station keeps each ``result``/``failure`` in its on-disk outbox until the ``ack``; the
daemon stores a result before acknowledging it and ignores duplicates by trial id and run uid.
"""

from __future__ import annotations

import json
import math
import re
import socket
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator

from closedloop.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
# a daemon's or station's loop that missed this long (its host too busy to run it, or frozen) does not count the
# time against its peer's silence: the peer had no chance to be heard, and was likely held up with it
HELD_UP_S = 0.5


def heard_allowing_for(held_up: float, last_heard: float, now: float) -> float:
    """When a peer was last heard, for judging its silence, after this side's loop missed ``held_up`` seconds: moved
    on by that time if it is more than ``HELD_UP_S`` (no later than ``now``)."""
    return min(now, last_heard + held_up) if held_up > HELD_UP_S else last_heard

_TCP_ENDPOINT = re.compile(r"tcp://(?P<host>\S+):(?P<port>\d+|\*)")
_HOST_PORT = re.compile(r"(?:[a-z]+://)?(?P<host>[^\s/]+):(?P<port>\d+)", re.IGNORECASE)


def endpoint_problem(value: str, *, listen: bool = False) -> str | None:
    """What is wrong with a ZeroMQ endpoint, or None; ``listen``: one to bind, whose host must be this machine's.

    Checked before anything starts, by the command line and by :class:`closedloop.daemon.Daemon` alike: ZeroMQ's own
    answer, "Invalid argument (addr='127.0.0.1:5701')", came after a daemon had opened its store, a daemon first said
    that such an address was "reachable from other machines", and it listened on 'tcp://127.0.0.1:99999' at port
    34463.

    >>> endpoint_problem("127.0.0.1:5701")
    'an endpoint is tcp://HOST:PORT or ipc://PATH (did you mean tcp://127.0.0.1:5701?)'
    """
    if value.startswith(("ipc://", "inproc://")) and value.partition("://")[2].strip():
        return None
    match = _TCP_ENDPOINT.fullmatch(value)
    if match and match["host"].count(":") > 0 and not match["host"].startswith("["):
        # 'tcp://::1:5709' passed: the daemon said it listened there, and its stations heard nothing
        return f"an IPv6 address in an endpoint is written in brackets (did you mean tcp://[{match['host']}]:{match['port']}?)"
    if match and (match["port"] == "*" or int(match["port"]) <= 65535):
        return _not_this_machine(match["host"]) if listen else None
    guess = _HOST_PORT.fullmatch(value.strip())
    if value.strip().isdigit():
        hint = f" (did you mean tcp://127.0.0.1:{value.strip()}?)"
    elif guess and int(guess["port"]) <= 65535:
        hint = f" (did you mean tcp://{guess['host']}:{guess['port']}?)"
    elif match:
        hint = " (a port is at most 65535)"
    else:
        hint = ""
    return f"an endpoint is tcp://HOST:PORT or ipc://PATH{hint}"


def _not_this_machine(host: str) -> str | None:
    """Why ZeroMQ cannot listen on ``host`` (its 'No such device'), or None: '*', an interface or a name that resolves.
    A name of another machine passes here, and ZeroMQ says it cannot assign that address."""
    if host == "*" or host in {name for _, name in socket.if_nameindex()}:
        return None
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (socket.gaierror, UnicodeError):
        return (f"{host!r} is neither an address, a host name nor a network interface of this machine "
                "(listen on tcp://*:PORT, or on one of its addresses)")
    return None


def wants_ipv6(endpoint: str) -> bool:
    """Whether a socket needs ZeroMQ's IPV6 option to bind or connect ``endpoint``: set it on every socket made for one.

    Without it ZeroMQ cannot bind an IPv6 address ('No such device') and connects to one never, saying nothing. True
    for an IPv6 address (``tcp://[::1]:5701``, ``tcp://[fe80::1%eth0]:5701``), for a name with IPv6 addresses alone
    (an IPv6-only lab's) and for '*' (every interface of both families; IPv4 peers come in as ::ffff:a.b.c.d). A name
    with an IPv4 address keeps to IPv4, as before: with the option ZeroMQ takes a name's IPv6 address alone, and a
    daemon on 'localhost' (127.0.0.1 and ::1) would have listened where its IPv4 stations do not connect. An interface
    name also keeps to its IPv4 address.

    >>> wants_ipv6("tcp://[::1]:5701"), wants_ipv6("tcp://127.0.0.1:5701"), wants_ipv6("ipc:///run/closedloop")
    (True, False, False)
    """
    match = _TCP_ENDPOINT.fullmatch(endpoint)
    if not match:
        return False
    host = match["host"]
    if host == "*" or ":" in host:
        return True
    if host in {name for _, name in socket.if_nameindex()}:
        return False
    try:
        families = {info[0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False  # ZeroMQ says what it makes of it
    return families == {socket.AF_INET6}


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version; ``peer_version`` is what it sent."""

    def __init__(self, peer_version: Any, message: str):
        super().__init__(message)
        self.peer_version = peer_version


class UnknownField(ProtocolError):
    """A message of this version with a field this release does not know: fields are added within a version, so
    the peer is likely of a later release."""


#: a trial's id, as the store keeps it: SQLite's INTEGER is 64-bit, and a larger id (10**26) raised OverflowError
#: in the daemon's lookup instead of being dropped as malformed
TrialId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def _msg_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = PROTOCOL_VERSION
    msg_id: str = Field(default_factory=_msg_id, max_length=64)


# characters that act on a terminal rather than show (C0 and C1 controls: escape sequences, carriage returns) or that
# reorder the text around them on a page (bidirectional overrides and isolates); tab and newline show as themselves
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def shown_safely(text: str) -> str:
    """``text`` with each character that would act on a terminal or reorder a page written as its escape (``\\x1b``).

    A station's text reaches the operator's terminal (``closedloop run``, ``status``, ``show``, ``explain``) and the
    dashboard: an instrument's error holding ``ESC]0;...`` retitled the terminal and ``ESC[2J`` cleared it, and a
    right-to-left override reversed the error column. Written out, nothing of the message is lost.
    """
    return _UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def station_name_problem(name: str) -> str | None:
    """What is wrong with a station's name, or None: it names the station in logs, tables and the dashboard."""
    if not name or len(name) > 128:
        return f"a station's name has 1 to 128 characters, not {len(name)}"
    if shown_safely(name) != name:
        return f"a station's name is shown on terminals and pages: {shown_safely(name)!r} holds control characters"
    return None


def _station_name(name: str) -> str:
    problem = station_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


ShownText = Annotated[str, AfterValidator(shown_safely)]


class Hello(_Message):
    """A station registers: its capabilities and the trials it still holds (running or unacknowledged)."""

    type: Literal["hello"] = "hello"
    station: Annotated[str, AfterValidator(_station_name)]
    instruments: list[ShownText] = Field(default_factory=lambda: ["*"], max_length=256)
    campaigns: list[ShownText] = Field(default_factory=lambda: ["*"], max_length=256)
    # a campaign's sources (issue 8) this station serves: a simulation station, a robot station
    sources: list[ShownText] = Field(default_factory=lambda: ["*"], max_length=256)
    capacity: int = Field(default=1, ge=1, le=1024)
    outstanding: list[TrialId] = Field(default_factory=list, max_length=100_000)
    software: ShownText = Field(default="", max_length=256)
    # a station repeats an unanswered hello; these tell a repeat from a new registration: a random id of
    # the station process, and how many welcomes that process had received when it sent this hello
    instance: str = Field(default="", max_length=64)
    welcomed: int = Field(default=0, ge=0)


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    heartbeat_s: float = Field(gt=0)
    session: int = 0


class Refused(_Message):
    type: Literal["refused"] = "refused"
    reason: str = Field(max_length=4096)


class Heartbeat(_Message):
    """Both ways. A station's says what it runs and holds; the daemon's answer is the mark ``seen`` names."""

    type: Literal["heartbeat"] = "heartbeat"
    running: list[TrialId] = Field(default_factory=list, max_length=100_000)
    # every trial the station holds (queued, running, answer not acknowledged), as in its hello, listed after
    # it had read the daemon's heartbeat ``seen`` (a msg_id): whatever the daemon assigned before sending that
    # one and is not listed never reached the station
    holds: list[TrialId] | None = Field(default=None, max_length=100_000)
    seen: str | None = Field(default=None, max_length=64)


class InstrumentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(max_length=512)
    options: dict[str, Any] = Field(default_factory=dict)


class Assign(_Message):
    type: Literal["assign"] = "assign"
    campaign: str = Field(max_length=256)
    trial_id: TrialId
    trial_index: int
    setpoints: dict[str, Any]
    outputs: list[str]
    instrument: InstrumentSpec
    timeout_s: float | None = None
    session: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


#: the ``msg_id`` of the assign a station's started, result or failure message answers: a trial may be
#: assigned to one station more than once (a retry), and an aborted attempt's failure is not the next one's
AssignmentId = Annotated[str | None, Field(max_length=64)]


class Started(_Message):
    type: Literal["started"] = "started"
    trial_id: TrialId
    assignment: AssignmentId = None


#: a measured value: a JSON number, not text or a boolean (lax parsing took "12.5" and true as 12.5 and 1.0)
Measurement = Annotated[float, Strict()]


def _finite_values(values: dict[str, float] | None) -> dict[str, float] | None:
    for key, value in (values or {}).items():
        if not math.isfinite(value):
            raise ValueError(f"value {key}={value} is not finite")
    return values


class ResultMessage(_Message):
    """A measured trial: outputs, their noise (standard deviation) where the instrument knows it, timing."""

    type: Literal["result"] = "result"
    trial_id: TrialId
    assignment: AssignmentId = None
    run_uid: str = Field(min_length=1, max_length=128)
    values: dict[str, Measurement] = Field(max_length=1024)
    noise: dict[str, Measurement] | None = None
    duration_s: float | None = Field(default=None, ge=0)
    started_at: float | None = None  # unix seconds on the station's clock
    finished_at: float | None = None
    documents: str | None = Field(default=None, max_length=MAX_MESSAGE_BYTES // 2)  # the run's JSON lines

    _finite = field_validator("values", "noise")(_finite_values)


class Failure(_Message):
    """A trial that gave no result: the error, and the run it opened (with its documents) if it got that far."""

    type: Literal["failure"] = "failure"
    trial_id: TrialId
    assignment: AssignmentId = None
    error: ShownText = Field(max_length=16_384)
    run_uid: str | None = Field(default=None, max_length=128)
    duration_s: float | None = None
    documents: str | None = Field(default=None, max_length=MAX_MESSAGE_BYTES // 2)  # the failed run's JSON lines
    # the station could not reach the instrument: nothing ran, the trial waits for it rather than failing
    unavailable: bool = False


class Ack(_Message):
    type: Literal["ack"] = "ack"
    trial_id: TrialId
    # the assignment the stored answer named: a late ack of an earlier attempt's failure must not delete
    # the retry's answer, which the station keeps under the same trial
    assignment: AssignmentId = None


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    trial_id: TrialId
    reason: str = Field(default="", max_length=4096)
    # a stopping daemon takes back a trial sent ahead: the station drops it only if it has not started it (a run in
    # progress goes on and is delivered, as one experiment must neither run twice nor be lost), and its holdings
    # then say which. None (left out on the wire) for an ordinary cancel, which ends a run in progress too
    unstarted_only: bool | None = None


class Control(_Message):
    """Operator pause or resume of a campaign, carried to the RunEngine of a station running its trial."""

    type: Literal["control"] = "control"
    action: Literal["pause", "resume"]
    reason: str = Field(default="", max_length=4096)


class Finished(_Message):
    """A campaign the station names in its hello has finished: none of its trials will come (sent at the finish, and
    at a later hello). A station serving any campaign (``*``) is not told."""

    type: Literal["finished"] = "finished"
    campaign: str = Field(max_length=256)


Message = Annotated[
    Union[Hello, Welcome, Refused, Heartbeat, Assign, Started, ResultMessage, Failure, Ack, Cancel, Control, Finished],
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(Message)


def encode(message: _Message) -> bytes:
    """One message as JSON bytes.

    Unset fields (every one that may be None defaults to None) are left out: a field added within version 1 is then
    absent where it has nothing to say, and a peer of a release from before it, which refuses unknown fields, still
    reads the message (an ack's ``assignment`` for an older station's result).
    """
    return message.model_dump_json(exclude_none=True).encode()


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    # a literal beyond float's range (1e999) parses as infinity: a duration of inf went into the store and made
    # `closedloop export -f json` write Infinity, which is not JSON
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not finite (beyond a float's range)")
    return value


def decode(frame: bytes) -> Any:
    """The message in one frame.

    Raises:
        VersionMismatch: the frame is a message of another protocol version.
        ProtocolError: anything malformed, oversize, non-finite or of an unknown type.
    """
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        raw = json.loads(frame, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a JSON object")
    version = raw.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        shown = repr(version)[:40]
        reason = raw.get("reason") if raw.get("type") == "refused" else None
        detail = f"; the peer says: {str(reason)[:500]}" if reason else ""
        raise VersionMismatch(version, f"protocol version {shown} is not supported (this side speaks "
                                       f"{PROTOCOL_VERSION}){detail}")
    try:
        # strict: the id of trial "3" or true, a capacity of "2", were taken as 3, 1 and 2, where a peer that sends
        # text or a boolean for a number is one whose other fields cannot be trusted either
        return _adapter.validate_python(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        error = UnknownField if first["type"] == "extra_forbidden" else ProtocolError
        raise error(f"invalid {str(raw.get('type'))[:40]!r} message: {where}: {first['msg']}") from None


def refusal_for(exc: VersionMismatch) -> bytes:
    """A ``refused`` a peer of any version can read: it names both versions."""
    return encode(Refused(reason=f"protocol version {exc.peer_version!r} refused: this daemon speaks version "
                                 f"{PROTOCOL_VERSION}; upgrade the station or the daemon so they match"))
