"""Helpers for tests that drive real node processes (used by tests/integration)."""
