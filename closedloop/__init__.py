"""closedloop: a closed-loop autonomous experimentation engine."""

from __future__ import annotations

__version__ = "0.1.0"
