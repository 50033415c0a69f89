"""One root for every error closedloop raises, split by who must act on it."""

from __future__ import annotations


class ClosedLoopError(Exception):
    """Base of every error the engine raises on purpose."""


class CampaignError(ClosedLoopError):
    """The campaign file or object is wrong: the scientist fixes it."""


class DeviceError(ClosedLoopError):
    """An instrument refused or failed an experiment: the hardware side acts."""


class InstrumentUnavailable(DeviceError):
    """The station could not reach its instrument (no connection, powered off): nothing was moved or read,
    so the experiment says nothing about its setpoints and runs again once the instrument answers."""


class PlannerError(ClosedLoopError):
    """The planner cannot handle the campaign or failed to propose."""


class PlannerWaiting(PlannerError):
    """The planner proposes nothing more until results come in (Ax once its initial design is all in flight)."""


class SpaceExhausted(PlannerError):
    """The planner has proposed every point of a finite space and does not repeat one: the campaign is done."""


class ProtocolError(ClosedLoopError):
    """A network message is malformed, hostile or of another protocol version."""


class StoreError(ClosedLoopError):
    """The experiment store refused an operation."""


class NotAStore(StoreError):
    """The file named as a store is none, or not whole (another program's database, a truncated or overwritten
    file): bad input, like a malformed campaign file; nothing was written to it."""


class StoreUnwritable(ClosedLoopError):
    """The disk under a store refused a write (full, failing): the operator frees or fixes it and starts again. Not
    a :class:`StoreError`, which refuses one message and carries on: every later write would fail the same way."""
