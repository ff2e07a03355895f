"""Fuzzing `POST /webhook/alertmanager` with hypothesis: bad input never makes a 5xx or a launch.

Part of the reliability suite (issue 7); `tests/test_reliability.py` maps every bullet of the issue
to its tests. Each test serves the real app (`create_app`: real auth, body cap, parsing, routing,
with snapshots of a real etcd) and sends hypothesis-generated requests over loopback HTTP. The
body, unless the case is about the body, is a firing `EtcdDefragRecommended` alert for a
configured, healthy cluster: if anything in the request were let through, it would launch a run.
The last step of every test sends that body correctly and sees it launch, so "zero launches" is
not an accident of the setup.

Derandomized (`reliability` profile below): CI runs the same cases every time. Sizes are chosen so
the fuzz stays well under a minute on two CPUs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from etcd_harness import EtcdCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from reliability_counts import Counts
from test_webhook import TOKEN, FakeExecutor, alert, notification

from exporter.config.settings import ClusterConfig, Settings
from exporter.service.app import create_app

pytestmark = pytest.mark.etcd

settings.register_profile(
    "reliability",
    derandomize=True,  # the same cases on every run: a CI failure reproduces locally
    database=None,
    deadline=None,  # loopback HTTP on a busy 2-CPU machine: latency is not what is tested here
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("reliability")

MAX_BODY_BYTES = 16 * 1024
BASIC_USER = "alertmanager"
BASIC_PASSWORD = "pa55-w0rd-also-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
VALID = notification(alert("c0"))
VALID_BODY = json.dumps(VALID).encode()


@dataclass
class Service:
    """The real app on loopback, driven from a synchronous hypothesis test through its own loop."""

    runner: asyncio.Runner
    client: TestClient
    executor: FakeExecutor
    statuses: dict[int, int] = field(default_factory=dict)
    sent: int = 0

    def send(self, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any]:
        """One request; the status and the decoded JSON answer (None when it has none)."""
        return self.runner.run(self._send(method, body, headers))

    async def _send(self, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.client.request(method, "/webhook/alertmanager", data=body, headers=headers) as answer:
            text = await answer.text()
            self.sent += 1
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
            assert answer.status < 500, f"{answer.status} for {method} {headers} {body!r:.300}: {text:.300}"
            data = json.loads(text) if text and answer.content_type == "application/json" else None
            return answer.status, data

    def alerts_counted(self) -> float:
        """The sum of etcd_autodefrag_alerts_total over every outcome."""
        text = self.runner.run(self._metrics())
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "etcd_autodefrag_alerts_total"
        )

    async def _metrics(self) -> str:
        async with self.client.get("/metrics") as answer:
            return await answer.text()

    def check_the_valid_request_launches(self) -> None:
        """The positive control: the body every case was built from launches when sent right."""
        before = len(self.executor.launched)
        status, data = self.send("POST", VALID_BODY, {**AUTH, **JSON})
        assert status == 200
        assert data["outcomes"]["launch"]["alerts"] == 1
        assert len(self.executor.launched) == before + 1


@pytest.fixture
def service(etcd_cluster: EtcdCluster) -> Iterator[Service]:
    """The app with a bearer token and basic auth, a 16 KiB body cap and one healthy cluster c0."""
    etcd_cluster.wait_healthy()
    configured = Settings(
        min_refresh_interval_seconds=0,
        scrape_budget_seconds=3,
        webhook={
            "token": TOKEN,
            "basic_auth_username": BASIC_USER,
            "basic_auth_password": BASIC_PASSWORD,
            "max_body_bytes": MAX_BODY_BYTES,
        },
    )
    clusters = [ClusterConfig(name="c0", endpoints=etcd_cluster.endpoints[:1])]
    executor = FakeExecutor()
    with asyncio.Runner() as runner:
        client = runner.run(_start(create_app(configured, clusters=clusters, executor=executor)))
        try:
            yield Service(runner, client, executor)
        finally:
            runner.run(client.close())


async def _start(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app))  # made inside the loop it will run on
    await client.start_server()
    return client


def finish(service: Service, counts: Counts, category: str, minimum: int) -> None:
    """Every case answered 4xx and counted, nothing launched; then the positive control."""
    assert service.sent >= minimum, f"hypothesis ran only {service.sent} cases"
    assert service.executor.launched == []
    assert all(400 <= status < 500 for status in service.statuses), service.statuses
    # Nothing silently dropped: every refused request is counted once in the metrics.
    assert service.alerts_counted() == service.sent
    counts.add_fuzz(category, cases=service.sent, statuses=service.statuses, launches=0)
    service.check_the_valid_request_launches()


# --- strategies -----------------------------------------------------------------------------------

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


malformed_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    # A valid notification cut short, or with trailing garbage.
    st.integers(0, len(VALID_BODY) - 1).map(lambda n: VALID_BODY[:n]),
    st.binary(min_size=1, max_size=20).map(lambda tail: VALID_BODY + tail),
    # Encodings JSON does not allow: Latin-1 with a stray byte, UTF-16.
    st.just(VALID_BODY.replace(b'"c0"', b'"c\xe90"')),
    st.just(json.dumps(VALID).encode("utf-16")),
).filter(_not_json)

# Fields of the notification and of its alert, each with values of a type or shape it must refuse.
_not_a_string = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.lists(json_scalars)
)
_not_a_dict = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.lists(json_scalars)
_not_a_list = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.dictionaries(st.text(), json_scalars)
)
_not_a_status = st.text(max_size=20).filter(lambda s: s not in ("firing", "resolved")) | _not_a_string
_not_a_time = st.sampled_from(["", "yesterday", "2026-13-01T00:00:00Z", "now", "T12:00", "12/01/2026"]) | (
    st.none() | st.booleans() | st.lists(json_scalars) | st.dictionaries(st.text(), json_scalars)
)
_labels_with_a_non_string = st.dictionaries(
    st.text(max_size=12), json_scalars.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3
).map(lambda extra: {**VALID["alerts"][0]["labels"], **extra})
# (where, field, strategy of a bad value, or None to drop a required field)
MUTATIONS: list[tuple[str, str, Any]] = [
    ("payload", "version", st.text(max_size=5).filter(lambda v: v != "4") | _not_a_string),
    ("payload", "version", None),
    ("payload", "groupKey", _not_a_string),
    ("payload", "groupKey", None),
    ("payload", "status", _not_a_status),
    ("payload", "status", None),
    ("payload", "receiver", _not_a_string),
    ("payload", "receiver", None),
    ("payload", "alerts", _not_a_list),
    ("payload", "alerts", None),
    ("payload", "groupLabels", _not_a_dict.filter(lambda v: v is not None)),
    ("payload", "commonLabels", _not_a_dict.filter(lambda v: v is not None)),
    (
        "payload",
        "truncatedAlerts",
        st.text(max_size=5).filter(lambda v: not v.strip().lstrip("+-").isdigit()),
    ),
    ("alert", "status", _not_a_status),
    ("alert", "status", None),
    ("alert", "labels", _not_a_dict),
    ("alert", "labels", _labels_with_a_non_string),
    ("alert", "labels", None),
    ("alert", "annotations", _not_a_dict.filter(lambda v: v is not None)),
    ("alert", "startsAt", _not_a_time),
    ("alert", "startsAt", None),
    ("alert", "fingerprint", _not_a_string.filter(lambda v: v is not None)),
    ("alert", "self", _not_a_dict),  # the alert itself replaced
]


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid notification with one to three fields dropped or given a value they must refuse."""
    body = json.loads(VALID_BODY)
    for where, name, values in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if where == "alert" and not isinstance(body.get("alerts"), list):
            continue  # an earlier mutation already replaced the alert list
        target = body if where == "payload" else body["alerts"]
        if where == "alert" and name == "self":
            target[0] = draw(values)
        elif where == "alert" and not isinstance(target[0], dict):
            continue
        elif values is None:
            (target if where == "payload" else target[0]).pop(name, None)
        else:
            (target if where == "payload" else target[0])[name] = draw(values)
    # Also a valid alert next to the broken one: one bad alert refuses the whole notification.
    if draw(st.booleans()) and isinstance(body.get("alerts"), list):
        body["alerts"].append(alert("c0"))
    return json.dumps(body).encode()


# --- the fuzz tests -------------------------------------------------------------------------------


def test_fuzz_malformed_json(service: Service, reliability_counts: Counts) -> None:
    @settings(PROFILE, max_examples=2000)
    @given(body=malformed_bodies)
    def case(body: bytes) -> None:
        status, data = service.send("POST", body, {**AUTH, **JSON})
        assert status == 400
        assert data["status"] == "error"
        assert data["error"].startswith("malformed JSON")

    case()
    finish(service, reliability_counts, "malformed JSON", 1900)


def test_fuzz_wrong_schema(service: Service, reliability_counts: Counts) -> None:
    @settings(PROFILE, max_examples=3000)
    @given(body=st.one_of(mutated_payloads(), json_values.map(lambda v: json.dumps(v).encode())))
    def case(body: bytes) -> None:
        status, data = service.send("POST", body, {**AUTH, **JSON})
        assert status == 400, data
        assert data["error"].startswith("invalid payload"), data
        assert len(data["error"]) <= 300

    case()
    finish(service, reliability_counts, "wrong schema", 2800)


@st.composite
def oversized(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A body just or far over the cap (valid JSON: padding inside), announced or chunked."""
    size = draw(st.integers(MAX_BODY_BYTES + 1, 4 * MAX_BODY_BYTES) | st.just(MAX_BODY_BYTES + 1))
    body = json.loads(VALID_BODY)
    body["alerts"][0]["annotations"]["padding"] = ""
    base = len(json.dumps(body).encode())
    body["alerts"][0]["annotations"]["padding"] = "x" * max(0, size - base)
    return json.dumps(body).encode(), draw(st.booleans())


def test_fuzz_oversized_bodies(service: Service, reliability_counts: Counts) -> None:
    @settings(PROFILE, max_examples=500)
    @given(case=oversized())
    def case(case: tuple[bytes, bool]) -> None:
        body, chunked = case
        assert len(body) > MAX_BODY_BYTES
        data: Any = body
        if chunked:  # no Content-Length: the cap must hold while reading

            async def stream() -> Any:
                for i in range(0, len(body), 4096):
                    yield body[i : i + 4096]

            data = stream()
        status, answer = service.runner.run(_post_stream(service, data))
        assert status == 413, answer
        assert f"larger than {MAX_BODY_BYTES} bytes" in answer["error"]

    case()
    finish(service, reliability_counts, "oversized bodies", 450)


async def _post_stream(service: Service, data: Any) -> tuple[int, Any]:
    async with service.client.post("/webhook/alertmanager", data=data, headers={**AUTH, **JSON}) as answer:
        service.sent += 1
        service.statuses[answer.status] = service.statuses.get(answer.status, 0) + 1
        assert answer.status < 500
        return answer.status, await answer.json()


_content_types = st.one_of(
    st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/json-patch+json",
            "application/xml",
            "text/json",
            "application/octet-stream",
            "json",
            "",
        ]
    ),
    st.from_regex(r"\A[a-z]{1,10}/[a-z0-9.+-]{1,15}\Z"),
).filter(lambda t: t.split(";")[0].strip().lower() != "application/json")


@st.composite
def wrong_method_or_type(draw: st.DrawFn) -> tuple[str, bytes | None, dict[str, str], int]:
    """The token, and another method (any body, any type) or a POST of the valid body as another type."""
    if draw(st.booleans()):
        method = draw(st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "PURGE"]))
        body = draw(st.sampled_from([VALID_BODY, None, b"", b"{}"]) | malformed_bodies)
        content_type = draw(_content_types | st.just("application/json"))
        headers = {**AUTH, "Content-Type": content_type} if content_type else dict(AUTH)
        return method, body, headers, 405
    content_type = draw(_content_types)
    headers = {**AUTH, "Content-Type": content_type} if content_type else dict(AUTH)
    return "POST", VALID_BODY, headers, 415


def test_fuzz_wrong_methods_and_content_types(service: Service, reliability_counts: Counts) -> None:
    @settings(PROFILE, max_examples=1500)
    @given(case=wrong_method_or_type())
    def case(case: tuple[str, bytes | None, dict[str, str], int]) -> None:
        method, body, headers, expected = case
        status, data = service.send(method, body, headers)
        assert status == expected, (method, headers, data)
        assert data["status"] == "error"

    case()
    finish(service, reliability_counts, "wrong methods and content types", 1400)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _near_misses(secret: str) -> st.SearchStrategy[str]:
    """The secret changed slightly: cut, extended, one character replaced, case changed."""
    return st.one_of(
        st.integers(0, len(secret) - 1).map(lambda n: secret[:n]),
        printable.filter(bool).map(lambda extra: secret + extra),
        st.tuples(st.integers(0, len(secret) - 1), st.characters(min_codepoint=0x21, max_codepoint=0x7E))
        .filter(lambda t: secret[t[0]] != t[1])
        .map(lambda t: secret[: t[0]] + t[1] + secret[t[0] + 1 :]),
        st.just(secret.upper()),
    )


authorization_headers = st.one_of(
    st.none(),
    printable,
    printable.map(lambda v: f"Bearer {v}"),
    _near_misses(TOKEN).map(lambda v: f"Bearer {v}"),
    st.sampled_from(["Token", "Bearer:", "Basic", "Digest", "bearer\t"]).map(lambda s: f"{s} {TOKEN}"),
    st.just(f"Bearer{TOKEN}"),  # no space
    _near_misses(BASIC_PASSWORD).map(lambda p: _basic(BASIC_USER, p)),
    _near_misses(BASIC_USER).map(lambda u: _basic(u, BASIC_PASSWORD)),
    st.tuples(printable, printable).map(lambda t: _basic(*t)),
    st.just(_basic(BASIC_USER, "")),
    st.just(_basic("", BASIC_PASSWORD)),
    st.just("Basic " + base64.b64encode(f"{BASIC_USER}{BASIC_PASSWORD}".encode()).decode()),  # no colon
    printable.map(lambda v: f"Basic {v}"),  # not base64
    st.just(f"Basic {TOKEN}"),  # the token as basic credentials
    st.just(_basic(TOKEN, TOKEN)),
)


def test_fuzz_missing_or_wrong_credentials(
    service: Service, reliability_counts: Counts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    @settings(PROFILE, max_examples=3000)
    @given(header=authorization_headers)
    def case(header: str | None) -> None:
        headers = dict(JSON) if header is None else {**JSON, "Authorization": header}
        status, data = service.send("POST", VALID_BODY, headers)
        assert status == 401, (header, data)
        assert data == {"status": "error", "error": "missing or wrong credentials"}

    case()
    finish(service, reliability_counts, "missing or wrong credentials", 2500)
    # No secret, and no near-miss of one, reaches the log.
    logged = caplog.text
    for secret in (TOKEN, TOKEN[:-1], BASIC_PASSWORD, BASIC_PASSWORD[:-1]):
        assert secret not in logged
    assert "401 unauthorized" in logged  # the refusals were logged, without the header
    reliability_counts.add("tokens_in_logs", 0)
