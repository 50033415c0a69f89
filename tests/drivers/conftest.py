"""Fixtures for driver tests: a real RunEngine (off the main thread's signal handlers) and a document collector."""

from __future__ import annotations

import pytest
from bluesky import RunEngine

from drivers.documents import DocumentCollector


@pytest.fixture
def RE():  # noqa: N802 - bluesky's name for it
    engine = RunEngine({}, context_managers=[])
    yield engine
    if engine.state != "idle":
        engine.halt()


@pytest.fixture
def docs() -> DocumentCollector:
    return DocumentCollector()
