"""The wire protocol: every message round-trips; anything malformed, foreign or non-finite is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from closedloop import protocol
from closedloop.errors import ProtocolError

EXAMPLES = [
    protocol.Hello(station="s1", instruments=["simulators.surfaces:Branin"], campaigns=["a"], capacity=2,
                   outstanding=[3, 4]),
    protocol.Welcome(heartbeat_s=0.5, session=7),
    protocol.Refused(reason="unregistered: send hello"),
    protocol.Heartbeat(running=[1]),
    protocol.Assign(campaign="c", trial_id=1, trial_index=1, setpoints={"x": 1.5, "gas": "Ar"}, outputs=["y"],
                    instrument=protocol.InstrumentSpec(target="simulators.surfaces:Branin", options={"noise": 0.1}),
                    timeout_s=30.0, session=7),
    protocol.Started(trial_id=1),
    protocol.ResultMessage(trial_id=1, run_uid="abc", values={"y": 1.25}, noise={"y": 0.1}, duration_s=1.0,
                           started_at=1.0, finished_at=2.0),
    protocol.Failure(trial_id=1, error="DeviceError: x: limit"),
    protocol.Ack(trial_id=1),
    protocol.Cancel(trial_id=1, reason="timed out"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.type)
def test_every_message_round_trips(message: protocol._Message) -> None:
    assert protocol.decode(protocol.encode(message)) == message


def _raw(**changes: object) -> bytes:
    body = json.loads(protocol.encode(protocol.ResultMessage(trial_id=1, run_uid="u", values={"y": 1.0})))
    body.update(changes)
    return json.dumps(body).encode()


def test_another_version_is_refused_naming_both_versions() -> None:
    with pytest.raises(protocol.VersionMismatch) as caught:
        protocol.decode(_raw(v=2))
    assert "2" in str(caught.value) and f"speaks {protocol.PROTOCOL_VERSION}" in str(caught.value)
    refusal = json.loads(protocol.refusal_for(caught.value))
    assert refusal["type"] == "refused" and "version 2" in refusal["reason"] and "speaks version 1" in refusal["reason"]


def test_a_refusal_from_another_version_is_still_read() -> None:
    frame = json.dumps({"v": 9, "type": "refused", "reason": "this daemon speaks version 9"}).encode()
    with pytest.raises(protocol.VersionMismatch, match="speaks version 9"):
        protocol.decode(frame)


@pytest.mark.parametrize("frame, why", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (_raw(type="teleport"), "invalid"),
    (_raw(extra=1), "extra"),
    (_raw(values={"y": "1"}).replace(b'"1"', b"NaN"), "not a number"),
    (_raw(values={"y": 1e999}).replace(b"Infinity", b"1e999"), "finite"),
    (_raw(noise={"y": float("inf")}).replace(b"Infinity", b"1e999"), "finite"),
    (_raw(trial_id="one"), "trial_id"),
    # beyond SQLite's 64-bit INTEGER: the daemon's lookup raised OverflowError and its loop ended
    (_raw(trial_id=10**26), "trial_id"),
    (b"x" * (protocol.MAX_MESSAGE_BYTES + 1), "exceeds"),
    # a measurement is a number: text and booleans were taken as 12.5 and 1.0 (and a flag stored as a yield)
    (_raw(values={"y": "12.5"}), "values.y"),
    (_raw(values={"y": True}), "values.y"),
    (_raw(noise={"y": "0.1"}), "noise.y"),
    # anywhere in a message: a duration of 1e999 was stored as inf, and `export -f json` then wrote Infinity
    (_raw(duration_s=1.0).replace(b"1.0", b"1e999"), "finite"),
    # no number from text or a boolean: trial "3" and true were taken as trials 3 and 1
    (_raw(trial_id=True), "trial_id"),
    (_raw(trial_id="3"), "trial_id"),
    (_raw(v=True), "version"),
    (_raw(v=1.0), "version"),
])
def test_malformed_frames_are_refused_with_a_reason(frame: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        protocol.decode(frame)


@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_protocol_error(frame: bytes) -> None:
    try:
        protocol.decode(frame)
    except ProtocolError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                        max_size=3), max_leaves=12))
def test_random_json_never_escapes_as_anything_but_protocol_error(value: object) -> None:
    try:
        frame = json.dumps({"v": 1, "type": "result", "payload": value}).encode()
    except ValueError:
        return
    with pytest.raises(ProtocolError):
        protocol.decode(frame)


def test_an_ack_to_a_station_of_an_earlier_release_carries_only_the_fields_it_knows() -> None:
    """Fields added within version 1 are left out when unset, so a station from before them reads the message.

    A station of 2026-11-25 (its Ack below, as its protocol.py had it) under a daemon of this release dropped every
    ack ('invalid 'ack' message: ack.assignment: Extra inputs are not permitted': the daemon sent "assignment": null
    for a result that named none), so all 14 results of a campaign stayed in its outbox, sent again at each
    reconnection. A station of this release names the assignment, and its ack still carries it."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict

    class AckOf20261125(BaseModel):
        model_config = ConfigDict(extra="forbid")
        v: int
        msg_id: str
        type: Literal["ack"]
        trial_id: int

    assert AckOf20261125.model_validate_json(protocol.encode(protocol.Ack(trial_id=3))).trial_id == 3
    named = protocol.Ack(trial_id=3, assignment="a1b2")
    assert protocol.decode(protocol.encode(named)) == named


def test_a_stations_text_reaches_terminals_and_pages_with_its_control_characters_written_out() -> None:
    """An instrument's error holding a terminal's escape sequences retitled and cleared the operator's terminal
    (`closedloop run`, `show`, `explain`), and a right-to-left override reversed the dashboard's error column."""
    error = "RuntimeError: \x1b]0;HACKED\x07\x1b[2J\x1b[31mred\rover\u202egnp.exe\tcol\nline"
    frame = json.dumps({"v": protocol.PROTOCOL_VERSION, "type": "failure", "msg_id": "m", "trial_id": 1,
                        "error": error}).encode()
    decoded = protocol.decode(frame)
    assert isinstance(decoded, protocol.Failure)
    assert decoded.error == ("RuntimeError: \\x1b]0;HACKED\\x07\\x1b[2J\\x1b[31mred\\rover\\u202egnp.exe"
                             "\tcol\nline")
    hello = protocol.decode(protocol.encode(protocol.Hello(station="s1", software="v1\x1b[2J")))
    assert isinstance(hello, protocol.Hello) and hello.software == "v1\\x1b[2J"


@pytest.mark.parametrize("name", ["robot\x1b[2J", "robot\u202e", "", "r" * 129])
def test_a_station_name_that_cannot_be_shown_is_refused(name: str) -> None:
    assert protocol.station_name_problem(name) is not None
    frame = json.dumps({"v": protocol.PROTOCOL_VERSION, "type": "hello", "msg_id": "m", "station": name}).encode()
    with pytest.raises(ProtocolError, match="station"):
        protocol.decode(frame)
    assert protocol.station_name_problem("robot-1 <bay 2>") is None
