"""Campaign events the daemon publishes on its PUB socket, for dashboards and ``closedloop watch``.

Each event is a two-frame message ``[topic, json]``. The topic is ``campaign.<name>.<kind>`` for a
campaign's events and ``daemon.<kind>`` for the daemon's own (stations joining or lost, stopping), so
a subscriber filters by prefix: ``b"campaign.branin."`` or ``b""`` for everything. The JSON object
always has ``v`` (event format version), ``seq`` (per daemon, increasing; a gap means the subscriber
missed events: PUB/SUB drops rather than blocks), ``kind``, ``time`` (ISO 8601, UTC) and, for campaign
events, ``campaign``; the other keys depend on the kind (docs/daemon.md lists them). The same
``(kind, details)`` pairs reach the daemon's ``on_event`` callback.

Example:
    >>> topic, body = encode_event(7, "trial_completed", {"campaign": "branin", "trial": 3, "values": {"y": 1.5}})
    >>> topic
    b'campaign.branin.trial_completed'
    >>> decode_event(body)["seq"]
    7
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

EVENT_VERSION = 1

KINDS = (
    "campaign_started", "campaign_paused", "campaign_resumed", "campaign_finished", "goal_reached",
    "trial_proposed", "trial_approved", "trial_dispatched", "trial_started", "trial_completed", "trial_failed", "trial_requeued",
    "trial_abandoned", "trial_cancelled", "trial_running_long", "model_updated", "best", "station_joined", "station_lost",
    "instrument_unavailable", "daemon_stopping", "waiting_for_hand",
)


def _safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value]
    return value


def topic_for(kind: str, details: dict[str, Any]) -> bytes:
    campaign = details.get("campaign")
    return (f"campaign.{campaign}.{kind}" if campaign else f"daemon.{kind}").encode()


def encode_event(seq: int, kind: str, details: dict[str, Any]) -> tuple[bytes, bytes]:
    """The two frames of one event."""
    body = {"v": EVENT_VERSION, "seq": seq, "kind": kind,
            "time": details.get("time") or datetime.now(timezone.utc).isoformat(), **_safe(details)}
    return topic_for(kind, details), json.dumps(body, default=str, allow_nan=False).encode()


def decode_event(frame: bytes) -> dict[str, Any]:
    return json.loads(frame)
