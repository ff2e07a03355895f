"""Logging set-up: readable text by default, one JSON object per line with `--log-format json`.

Two guarantees hold for every logger, whatever a call site passes:

- **One record, one line.** Messages carry text from requests (alert labels, fingerprints, peer
  addresses, parse errors), so the text format escapes every character that is not printable
  (newline, CR, ESC, NUL, the other C0 and C1 controls, Unicode line and paragraph separators,
  bidi overrides, lone surrogates) the way Python's `repr` does: `\\n`, `\\x1b`, `\\u2028`. A sender
  cannot start a line of its own, with a timestamp and level of its choosing, or send escape
  sequences to a terminal. A traceback (our own bug) keeps its lines, each indented, so no line of
  it can pass for a record either. JSON escapes all of that by itself (`ensure_ascii`).
- **Bounded repeats.** `LogThrottle` lets one line per cause and source through per window and
  counts the rest; the webhook and the HTTP server use it for what a sender can repeat at will.
"""

import json
import logging
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and is structured context.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped as in a Python string literal."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, plus any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)  # ensure_ascii: control characters come out escaped


class TextFormatter(logging.Formatter):
    """`2026-11-22 07:40:01 INFO  message` — what a person reads while a defrag runs.

    The message is escaped into one line (see the module docstring); a traceback follows on lines
    that start with whitespace, so a line that starts with a timestamp always starts a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(message)s", "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + one_line(line) for line in text.splitlines())


def configure(*, fmt: str = "text", level: str = "INFO", stream: Any = None) -> None:
    """Route every logger to one handler on stderr (or `stream`) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is per request; keep it out of INFO noise unless debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING if level != "DEBUG" else level)


# --- repeats ---------------------------------------------------------------------------------------

REPEAT_WINDOW_SECONDS = 60.0
# Distinct (cause, source) pairs a throttle logs per window: a sender with many addresses (or an
# alert storm with many label values) still writes a bounded number of lines, and the memory the
# throttle keeps is bounded too.
MAX_KEYS_PER_WINDOW = 64


@dataclass
class _Seen:
    logged_at: float
    held: int = 0


class LogThrottle:
    """Which repeated lines to write: the first per key (cause, source) in each window.

    Pure bookkeeping with `now` passed in; the caller logs and counts. A held line is still counted
    by the caller's metric; the next line written for that key says how many were held.
    """

    def __init__(
        self, *, window_seconds: float = REPEAT_WINDOW_SECONDS, max_keys: int | None = MAX_KEYS_PER_WINDOW
    ) -> None:
        """`max_keys` None: no bound, only for keys that come from the configuration."""
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self._seen: dict[Hashable, _Seen] = {}
        self.held_over_capacity = 0  # lines held because max_keys keys were already logged

    def admit(self, key: Hashable, now: float) -> int | None:
        """None: hold this line. Else write it, noting the returned count of held repeats."""
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.window_seconds:
            seen.held += 1
            return None
        if seen is None and self.max_keys is not None and len(self._seen) >= self.max_keys:
            self._forget_before(now - self.window_seconds)
            if len(self._seen) >= self.max_keys:
                self.held_over_capacity += 1
                return None
        held = seen.held if seen is not None else 0
        self._seen[key] = _Seen(now)
        return held

    def _forget_before(self, cutoff: float) -> None:
        for key in [k for k, seen in self._seen.items() if seen.logged_at <= cutoff]:
            del self._seen[key]


def held_note(held: int) -> str:
    """The suffix of a line that stands for repeats held back since the last one."""
    return f" (and {held} more like it since the last such line)" if held else ""
