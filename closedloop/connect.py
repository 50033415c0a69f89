"""Reaching a campaign's hardware before a run: ``closedloop validate --connect``.

Each driver's binding is built as a station builds it (:func:`drivers.binding.load_binding`, after a
RunEngine exists) and its devices are connected, all within a time limit, so that the campaign can be
compared with the instrument as it is: the data keys its detectors read, an EPICS motor's limits as the
IOC holds them. Nothing is moved, set or written.

    >>> from closedloop.campaign import load_campaign
    >>> live = LiveInstruments(timeout=10)
    >>> campaign = load_campaign("campaigns/branin.yaml", connect=live)   # a simulator: nothing to reach
    >>> live.unreachable
    []
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Any

from closedloop.campaign import Instrument
from closedloop.errors import InstrumentUnavailable
from drivers.binding import InstrumentBinding, load_binding

#: PVs named in a line that says which did not connect; the rest are counted
SHOWN_PVS = 8


class LiveInstruments:
    """A :data:`closedloop.campaign.Connector`: builds and connects each driver given to it within ``timeout``
    seconds. One it cannot reach in time is not a problem of the campaign file: it returns None and keeps a
    line for it in :attr:`unreachable` ("could not connect to drivers.epics_motor:Stage within 10 s: ...")."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.unreachable: list[str] = []
        self._engine: Any = None

    def __call__(self, instrument: Instrument) -> InstrumentBinding | None:
        if self._engine is None:
            from bluesky import RunEngine

            # ophyd-async devices connect on the RunEngine's event loop: a station makes its RunEngine first too
            self._engine = RunEngine({}, context_managers=[])
        deadline = time.monotonic() + self.timeout
        built: queue.Queue[tuple[InstrumentBinding | None, BaseException | None]] = queue.Queue()

        def build() -> None:
            try:
                built.put((load_binding(instrument.target, instrument.options), None))
            except BaseException as exc:  # handed to the caller's thread, which decides
                built.put((None, exc))

        # A factory waits for its devices as long as it likes (the EPICS stage: 10 s, twice); the scientist
        # waits no longer than asked. A factory still waiting is left behind in its daemon thread
        threading.Thread(target=build, name=f"closedloop-connect-{instrument.target}", daemon=True).start()
        try:
            binding, error = built.get(timeout=self.timeout)
        except queue.Empty:
            pvs = _unconnected_pvs()
            return self._unreachable(instrument, _named_pvs(pvs) if pvs else "its factory had not returned")
        if isinstance(error, InstrumentUnavailable):
            return self._unreachable(instrument, str(error))
        if error is not None:
            raise error
        assert binding is not None
        # a factory need not wait for its devices itself (ophyd's connect in the background)
        devices = {id(d): d for d in [*binding.settable.values(), *binding.readables()]}
        waited: list[str] = []
        for device in devices.values():
            wait = getattr(device, "wait_for_connection", None)
            if wait is None:  # ophyd-async devices were connected by the factory (init_devices)
                continue
            try:
                # never 0: ophyd's Device.wait_for_connection(timeout=0) raises without looking
                wait(timeout=max(deadline - time.monotonic(), 0.1))
            except TimeoutError as exc:
                waited.append(f"{getattr(device, 'name', device)}: {exc}")
        if waited:
            return self._unreachable(instrument, "; ".join(waited))
        return binding

    def _unreachable(self, instrument: Instrument, reason: str) -> None:
        self.unreachable.append(f"could not connect to {instrument.target} within {self.timeout:g} s: {reason}")
        return None


def _named_pvs(pvs: list[str]) -> str:
    more = f" and {len(pvs) - SHOWN_PVS} more" if len(pvs) > SHOWN_PVS else ""
    return f"PVs not connected: {', '.join(pvs[:SHOWN_PVS])}{more}"


def _unconnected_pvs() -> list[str]:
    """The Channel Access PVs this process asked for that have not connected (no IOC answered their search, or
    its circuit is not up), where ophyd talks Channel Access through caproto; empty otherwise."""
    compat = sys.modules.get("caproto.threading.pyepics_compat")
    if compat is None or compat._make_context.cache_info().currsize == 0:  # no PV made: nothing to ask about
        return []
    try:
        pvs = list(compat._make_context().pvs.items())
        return sorted({name for (name, _priority), pv in pvs if not pv.connected})
    except Exception:  # caproto's internals: naming the PVs is a courtesy, the line says the rest
        return []
