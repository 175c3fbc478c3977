"""Shared pytest configuration for the relayout tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes long (a fresh virtual environment and install); deselect with -m 'not slow'")
