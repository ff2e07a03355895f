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
    logging.getLogger("exporter.engine").info("%s: defragmented", "m1", extra={"etcd_cluster": "a"})
    logging.getLogger("exporter.engine").debug("not shown at INFO")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "m1: defragmented"
    assert record["level"] == "info"
    assert record["logger"] == "exporter.engine"
    assert record["etcd_cluster"] == "a"
    assert record["time"].endswith("Z")


def test_text_is_one_readable_line() -> None:
    stream = io.StringIO()
    logs.configure(fmt="text", level="DEBUG", stream=stream)
    logging.getLogger("x").warning("quota unknown")
    line = stream.getvalue().strip()
    assert line.endswith("WARNING quota unknown")
    assert line[:4].isdigit()
