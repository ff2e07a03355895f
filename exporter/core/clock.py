"""The one source of wall-clock and monotonic time, so tests can pin it."""

import time
from datetime import UTC, datetime


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(UTC)


def monotonic() -> float:
    """Seconds on a clock that never goes backwards (for durations and deadlines)."""
    return time.monotonic()
