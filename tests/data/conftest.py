from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own ULTRAMESH_CACHE, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("ULTRAMESH_CACHE", str(tmp_path / "cache"))
