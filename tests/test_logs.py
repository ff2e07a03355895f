"""Log formats: readable text by default, one JSON object per line on request."""

import io
import json
import logging

import pytest

from exporter import logs


@pytest.fixture(autouse=True)
def restore_root_logger():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_structured_context() -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", level="INFO", stream=stream)
    logging.getLogger("exporter.defrag.engine").info("%s: defragmented", "m1", extra={"etcd_cluster": "a"})
    logging.getLogger("exporter.defrag.engine").debug("not shown at INFO")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "m1: defragmented"
    assert record["level"] == "info"
    assert record["logger"] == "exporter.defrag.engine"
    assert record["etcd_cluster"] == "a"
    assert record["time"].endswith("Z")


def test_text_is_one_readable_line() -> None:
    stream = io.StringIO()
    logs.configure(fmt="text", level="DEBUG", stream=stream)
    logging.getLogger("x").warning("quota unknown")
    line = stream.getvalue().strip()
    assert line.endswith("WARNING quota unknown")
    assert line[:4].isdigit()


# --- one record, one line (issue 18) ---------------------------------------------------------------

# What a sender might put in any field: line breaks of every kind Python's splitlines() knows,
# a forged record after a newline, terminal escapes, NUL, C1 controls, a bidi override, and a lone
# surrogate (aiohttp decodes header bytes with surrogateescape).
HOSTILE = [
    "\n2026-01-01 00:00:00 ERROR forged",
    "\r2026-01-01 00:00:00 ERROR forged",
    "\r\n",
    "\x1b[2J\x1b[31mred",
    "\x00nul",
    "\x0b\x0c\x1c\x1d\x1e",
    "\x85next-line\x9b",
    "\u2028line-sep\u2029para-sep",
    "\u202eevil-bidi",
    "\udcffsurrogate",
    "\x7fdel\ttab",
]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_record_is_one_line_whatever_its_arguments(fmt: str) -> None:
    stream = io.StringIO()
    logs.configure(fmt=fmt, level="DEBUG", stream=stream)
    log = logging.getLogger("exporter.service.webhook")
    for value in HOSTILE:
        log.warning("alert %s (%s): skip_unrouted: labels {%s}", value, value, value)
        log.info(value)  # the message itself, not only an argument
    lines = stream.getvalue().split("\n")
    assert lines.pop() == ""  # the last record's end
    assert len(lines) == 2 * len(HOSTILE)
    assert len(stream.getvalue().splitlines()) == 2 * len(HOSTILE)  # no other line break either
    stream.getvalue().encode("utf-8")  # nothing a UTF-8 log file cannot hold (the lone surrogate)
    for line in lines:
        assert line.isprintable()
        if fmt == "json":
            json.loads(line)
        else:
            assert line[:4].isdigit()
            assert "ERROR forged" not in line.split(" ", 3)[2]  # the level is ours
    if fmt == "text":
        text = stream.getvalue()
        assert "\\n2026-01-01 00:00:00 ERROR forged" in text
        assert "\\x1b[2J\\x1b[31mred" in text
        assert "\\x00nul" in text
        assert "\\u2028line-sep\\u2029para-sep" in text
        assert "\\udcff" in text


def test_a_traceback_keeps_its_lines_indented_and_escaped() -> None:
    stream = io.StringIO()
    logs.configure(fmt="text", level="INFO", stream=stream)
    try:
        raise ValueError("bad\n2026-01-01 00:00:00 ERROR forged\x1b[0m")
    except ValueError:
        logging.getLogger("x").exception("handler failed for %s", "a\nb")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR handler failed for a\\nb")
    assert rest
    assert all(line.startswith("    ") for line in rest)  # only records start a line
    assert rest[-1] == "    2026-01-01 00:00:00 ERROR forged\\x1b[0m"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain text, é and 中", "plain text, é and 中"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x1b\x7f\x85\xa0", "\\x00\\x1b\\x7f\\x85\\xa0"),
        ("\u2028\u202e\ufeff", "\\u2028\\u202e\\ufeff"),
        ("\U000e0001", "\\U000e0001"),
    ],
)
def test_one_line_escapes_what_is_not_printable(text: str, escaped: str) -> None:
    assert logs.one_line(text) == escaped


# --- bounded repeats ------------------------------------------------------------------------------


def test_throttle_logs_the_first_per_key_and_window_and_counts_the_rest() -> None:
    throttle = logs.LogThrottle(window_seconds=60, max_keys=10)
    assert throttle.admit(("401", "10.0.0.1"), now=0) == 0
    assert [throttle.admit(("401", "10.0.0.1"), now=t) for t in (1, 30, 59.9)] == [None, None, None]
    assert throttle.admit(("400", "10.0.0.1"), now=2) == 0  # another cause
    assert throttle.admit(("401", "10.0.0.2"), now=3) == 0  # another source
    assert throttle.admit(("401", "10.0.0.1"), now=60) == 3  # a new window says how many were held
    assert throttle.admit(("401", "10.0.0.1"), now=61) is None
    assert logs.held_note(3) == " (and 3 more like it since the last such line)"
    assert logs.held_note(0) == ""


def test_throttle_bounds_the_sources_it_logs_and_remembers() -> None:
    throttle = logs.LogThrottle(window_seconds=60, max_keys=3)
    assert [throttle.admit(("401", f"10.0.0.{i}"), now=0) for i in range(5)] == [0, 0, 0, None, None]
    assert throttle.held_over_capacity == 2
    assert len(throttle._seen) == 3
    # Once the window has passed, old sources are forgotten and new ones logged again.
    assert throttle.admit(("401", "10.0.0.9"), now=60) == 0
    assert len(throttle._seen) == 1
    unbounded = logs.LogThrottle(max_keys=None)  # keys from the configuration only
    assert all(unbounded.admit(("skip", f"c{i}"), now=0) == 0 for i in range(500))
