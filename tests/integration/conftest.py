"""Integration tests run against this run's own databases, built once from schema.sql (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def databases(test_databases: str) -> str:
    return test_databases
