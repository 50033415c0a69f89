"""Shared fixtures: temporary stores, campaigns on simulated instruments, free loopback ports."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from closedloop.campaign import Campaign  # noqa: E402
from closedloop.store import Store  # noqa: E402
from simulators.surfaces import branin_campaign as branin_campaign_yaml  # noqa: E402


def branin_yaml(name: str, experiments: int, *, initial: int, seed: int, noise: float, backend: str) -> str:
    return branin_campaign_yaml(name, experiments, planner={"backend": backend, "initial_experiments": initial, "seed": seed},
                           options={"noise": noise, "seed": seed})


def branin_campaign(name: str = "branin-test", experiments: int = 15, initial: int = 6, seed: int = 0,
                    noise: float = 0.01, backend: str = "botorch") -> Campaign:
    return Campaign.from_yaml_text(branin_yaml(name, experiments, initial=initial, seed=seed, noise=noise, backend=backend))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    the_store = Store(tmp_path / "store.db")
    yield the_store
    the_store.close()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def any_parameters(**parameters: object) -> dict[str, float]:
    """A computational experiment that takes whatever a campaign varies, for tests that validate a campaign file and
    never run it (a function's arguments are checked against the campaign's parameters)."""
    return {"y": 0.0}
