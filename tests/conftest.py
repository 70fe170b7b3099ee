"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test with ``HF_HUB_OFFLINE=1``, as a user without network sets it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
