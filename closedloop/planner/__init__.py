"""Planners: propose the next experiments from the results so far."""

from __future__ import annotations

from closedloop.campaign import Campaign
from closedloop.errors import PlannerError
from closedloop.planner.base import Planner, Proposal, Result

__all__ = ["Planner", "Proposal", "Result", "make_planner"]


def make_planner(campaign: Campaign) -> Planner:
    """The planner the campaign's ``planner.backend`` names.

    A campaign with ``sources`` gets the botorch backend's multi-fidelity planner; the other backends
    cannot choose among sources and refuse it.
    """
    backend = campaign.planner.backend
    if campaign.sources:
        if backend != "botorch":
            raise PlannerError(f"planner.backend: the {backend} backend cannot choose among sources; use 'botorch'")
        from closedloop.planner.multifidelity import MultiFidelityPlanner

        return MultiFidelityPlanner(campaign)
    if backend == "botorch":
        from closedloop.planner.botorch_backend import BotorchPlanner

        return BotorchPlanner(campaign)
    if backend == "sobol":
        from closedloop.planner.baselines import SobolPlanner

        return SobolPlanner(campaign)
    if backend == "random":
        from closedloop.planner.baselines import RandomPlanner

        return RandomPlanner(campaign)
    if backend == "ax":
        from closedloop.planner.ax_backend import AxPlanner

        return AxPlanner(campaign)
    raise PlannerError(f"planner.backend: unknown backend {backend!r}")
