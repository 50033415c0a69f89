"""Messages between the daemon and station workers: versioned pydantic models, JSON on the wire.

Topology: the daemon binds a ROUTER socket; each station connects a DEALER socket whose routing id is
the station's name. A message is one frame of UTF-8 JSON (the ROUTER adds the identity frame).

| message    | direction          | meaning                                                        |
|------------|--------------------|----------------------------------------------------------------|
| hello      | station -> daemon  | I am STATION, I drive these instruments, N experiments at once |
| welcome    | daemon -> station  | registered; heartbeat every S seconds                          |
| refused    | daemon -> station  | not registered (wrong protocol version, unknown station, ...)  |
| heartbeat  | station -> daemon  | still alive; these trials are running                          |
| assign     | daemon -> station  | run this trial (setpoints, instrument, timeout)                |
| started    | station -> daemon  | the trial's run has started                                    |
| result     | station -> daemon  | the trial's measured outputs and run uid                       |
| failure    | station -> daemon  | the trial failed, with the device error                        |
| ack        | daemon -> station  | the result or failure of a trial is stored; forget it          |
| cancel     | daemon -> station  | stop the trial (timeout, operator)                             |
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from closedloop.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20


def _msg_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = PROTOCOL_VERSION
    msg_id: str = Field(default_factory=_msg_id, max_length=64)


class Hello(_Message):
    type: Literal["hello"] = "hello"
    station: str = Field(min_length=1, max_length=128)
    instruments: list[str] = Field(default_factory=lambda: ["*"], max_length=256)
    capacity: int = Field(default=1, ge=1, le=1024)
    outstanding: list[int] = Field(default_factory=list, max_length=100_000)


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    heartbeat_s: float = Field(gt=0)


class Refused(_Message):
    type: Literal["refused"] = "refused"
    reason: str = Field(max_length=4096)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    running: list[int] = Field(default_factory=list, max_length=100_000)


class InstrumentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(max_length=512)
    options: dict[str, Any] = Field(default_factory=dict)


class Assign(_Message):
    type: Literal["assign"] = "assign"
    campaign: str = Field(max_length=256)
    trial_id: int
    trial_index: int
    setpoints: dict[str, Any]
    outputs: list[str]
    instrument: InstrumentSpec
    timeout_s: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Started(_Message):
    type: Literal["started"] = "started"
    trial_id: int


def _finite_values(values: dict[str, float]) -> dict[str, float]:
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"value {key}={value} is not finite")
    return values


class ResultMessage(_Message):
    type: Literal["result"] = "result"
    trial_id: int
    run_uid: str = Field(min_length=1, max_length=128)
    values: dict[str, float] = Field(max_length=1024)
    noise: dict[str, float] | None = None
    duration_s: float | None = None

    _finite = field_validator("values")(_finite_values)


class Failure(_Message):
    type: Literal["failure"] = "failure"
    trial_id: int
    error: str = Field(max_length=16_384)
    run_uid: str | None = Field(default=None, max_length=128)


class Ack(_Message):
    type: Literal["ack"] = "ack"
    trial_id: int


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    trial_id: int
    reason: str = Field(default="", max_length=4096)


Message = Annotated[
    Union[Hello, Welcome, Refused, Heartbeat, Assign, Started, ResultMessage, Failure, Ack, Cancel],
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(Message)


def encode(message: _Message) -> bytes:
    """One message as JSON bytes."""
    return message.model_dump_json().encode()


def decode(frame: bytes) -> Any:
    """The message in one frame; raises ProtocolError for anything malformed, oversize or foreign."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        raw = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a JSON object")
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {raw.get('type')!r} message: {where}: {first['msg']}") from None
