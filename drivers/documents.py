"""Keep every Bluesky document of a run, and write them as JSON lines so a run can be replayed.

One line per document: ``{"name": "start", "doc": {...}}``. Event pages are stored as they came;
:meth:`DocumentCollector.events` unpacks them.

Example:
    >>> collector = DocumentCollector()
    >>> collector("start", {"uid": "u1", "time": 0.0})
    >>> collector("event", {"descriptor": "d", "data": {"y": 1.5}, "seq_num": 1})
    >>> again = DocumentCollector.from_jsonl(collector.to_jsonl())
    >>> again.start["uid"], len(again.documents)
    ('u1', 2)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from event_model import unpack_event_page


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _finite_only(value: Any) -> Any:
    """JSON has no NaN or infinity; write them as strings rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_only(v) for v in value]
    return value


def dumps_document(name: str, doc: dict[str, Any]) -> str:
    """One document as one JSON line (no newline inside)."""
    record = {"name": name, "doc": doc}
    try:
        return json.dumps(record, default=_jsonable, allow_nan=False, separators=(",", ":"))
    except ValueError:
        # a NaN or an infinity: rewritten in a plain copy, made only now, as the copy costs more than the writing
        plain = json.loads(json.dumps(record, default=_jsonable))
        return json.dumps(_finite_only(plain), allow_nan=False, separators=(",", ":"))


class DocumentCollector:
    """A RunEngine subscriber that keeps ``(name, doc)`` pairs in order.

    Pass it to ``RE(plan, collector)``; after the run, ``collector.to_jsonl()`` is the record to
    store with the trial and :meth:`events` feeds :func:`drivers.readout.outputs_from_events`.
    """

    def __init__(self) -> None:
        self.documents: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.documents.append((name, doc))

    def clear(self) -> None:
        self.documents.clear()

    def _all(self, name: str) -> list[dict[str, Any]]:
        return [doc for n, doc in self.documents if n == name]

    @property
    def start(self) -> dict[str, Any] | None:
        starts = self._all("start")
        return starts[-1] if starts else None

    @property
    def stop(self) -> dict[str, Any] | None:
        stops = self._all("stop")
        return stops[-1] if stops else None

    @property
    def run_uids(self) -> list[str]:
        return [doc["uid"] for doc in self._all("start")]

    def events(self, stream: str | None = "primary") -> list[dict[str, Any]]:
        """Event documents (pages unpacked) of the last run, of ``stream`` (``None``: every stream)."""
        start = self.start
        descriptors = {
            doc["uid"]: doc.get("name")
            for doc in self._all("descriptor")
            if start is None or doc.get("run_start") == start.get("uid")
        }
        out: list[dict[str, Any]] = []
        for name, doc in self.documents:
            if name == "event":
                pieces = [doc]
            elif name == "event_page":
                pieces = list(unpack_event_page(doc))  # type: ignore[arg-type]
            else:
                continue
            for event in pieces:
                descriptor = event.get("descriptor")
                if descriptor in descriptors and (stream is None or descriptors[descriptor] == stream):
                    out.append(event)
        return out

    def to_jsonl(self) -> str:
        """Every document, one JSON line each, in the order the RunEngine emitted them."""
        return "".join(dumps_document(name, doc) + "\n" for name, doc in self.documents)

    def write_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_jsonl())
        return path

    @classmethod
    def from_jsonl(cls, text: str) -> DocumentCollector:
        collector = cls()
        for line in text.splitlines():
            if line.strip():
                item = json.loads(line)
                collector(item["name"], item["doc"])
        return collector
