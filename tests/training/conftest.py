"""Training tests: keep the root logger as it was around each test.

The CLI's callback points logging at the stderr it is given (``basicConfig(force=True)``); under
``CliRunner`` that is a capture stream closed after the call, and later log records would fail on it.
"""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
