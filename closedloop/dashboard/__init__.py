"""The live dashboard in the browser (``closedloop dashboard``, ``closedloop daemon --dashboard PORT``).

See :mod:`closedloop.dashboard.app` and docs/dashboard.md.
"""

from __future__ import annotations

from closedloop.dashboard.app import DashboardConfig, DashboardServer, create_app, model_view

__all__ = ["DashboardConfig", "DashboardServer", "create_app", "model_view"]
