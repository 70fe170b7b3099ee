"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test with ``HF_HUB_OFFLINE=1``, as a user without network sets it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def lazystream_cache(tmp_path_factory: pytest.TempPathFactory):
    """Probe results and calibrations go to a temporary folder, not the user's cache."""
    import os

    previous = os.environ.get("LAZYSTREAM_CACHE")
    os.environ["LAZYSTREAM_CACHE"] = str(tmp_path_factory.mktemp("lazystream-cache"))
    yield
    if previous is None:
        del os.environ["LAZYSTREAM_CACHE"]
    else:
        os.environ["LAZYSTREAM_CACHE"] = previous
