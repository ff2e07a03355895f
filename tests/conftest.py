"""Shared fixtures: real etcd clusters on loopback (tests/etcd_harness.py), a fake Kubernetes API, and a
real Kubernetes control plane (tests/kube_control_plane.py).

Every test that uses etcd (through `etcd_build`, which every cluster fixture depends on) runs once per
release named in ETCD_VERSIONS, e.g. `ETCD_VERSIONS=3.4,3.5,3.6` (ids `[etcd3.4]`, ...). Unset, it
runs once against the installed etcd, with ids carrying no version.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from etcd_harness import (
    VERSIONS_ENV,
    EtcdBuild,
    EtcdCluster,
    EtcdHarnessError,
    builds_from_env,
    installed_build,
    start_cluster,
)
from fake_kube import FakeKube
from kube_control_plane import ControlPlane, ControlPlaneError, StandInKubelet, binary_dir, unavailable_reason
from kubernetes_asyncio.client import ApiClient
from reliability_counts import COUNTS, Counts

from exporter.defrag.lock import PREFIX as LOCK_PREFIX
from exporter.etcd.client import prefix_end
from exporter.kubernetes.api import kube_api_client

# The builds ETCD_VERSIONS names, resolved once at start-up (None: the variable is unset).
_ETCD_BUILDS = pytest.StashKey[list[EtcdBuild] | None]()


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.stash[_ETCD_BUILDS] = builds_from_env(os.environ.get(VERSIONS_ENV))
    except EtcdHarnessError as error:
        # A version asked for but not built: stop before running anything, without a traceback.
        raise pytest.UsageError(str(error)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    builds = metafunc.config.stash[_ETCD_BUILDS]
    if builds is not None and "etcd_build" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("kube") is not None:
            # The control plane is one per session and keeps its objects: its tests run once, on the
            # first release named (its own etcd is the installed one anyway).
            builds = builds[:1]
        # Session scope: pytest groups the tests by release, so each shared cluster starts once per release.
        ids = [build.test_id for build in builds]
        metafunc.parametrize("etcd_build", builds, ids=ids, indirect=True, scope="session")


@pytest.fixture(scope="session")
def etcd_build(request: pytest.FixtureRequest) -> EtcdBuild:
    """The etcd release the test runs against: one of ETCD_VERSIONS, else the installed etcd."""
    if (build := getattr(request, "param", None)) is not None:
        assert isinstance(build, EtcdBuild)
        return build
    try:
        return installed_build()
    except EtcdHarnessError as error:
        pytest.fail(str(error), pytrace=False)


def _start(tmp_root: Path, build: EtcdBuild, **options: bool) -> EtcdCluster:
    try:
        return start_cluster(tmp_root, build=build, **options)
    except EtcdHarnessError as error:
        # Missing binaries or a cluster that would not come up: fail loudly, never skip.
        pytest.fail(str(error), pytrace=False)


def _damage(cluster: EtcdCluster) -> list[str]:
    """What a test left broken in a cluster other tests share."""
    stopped = [member.name for member in cluster.members if not member.running]
    problems = [f"members stopped: {stopped}"] if stopped else []
    if not stopped and (alarms := cluster.alarms()):
        problems.append(f"alarms raised: {alarms}")
    return problems


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory, etcd_build: EtcdBuild) -> Iterator[EtcdCluster]:
    """One healthy 3-member plain-HTTP cluster (32 MiB quota) per release; use via `etcd`."""
    cluster = _start(tmp_path_factory.mktemp("etcd-shared"), etcd_build)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster, checked healthy before the test and intact after it.

    Tests that stop members or fill the quota must use `fresh_etcd_cluster` instead; one that damages
    the shared cluster anyway fails at teardown, and stopped members are restarted so that the
    following tests are not blamed for it.
    """
    if problems := _damage(etcd_cluster):
        pytest.fail(f"shared etcd cluster is damaged: {'; '.join(problems)}", pytrace=False)
    etcd_cluster.wait_healthy()
    yield etcd_cluster
    # A run stopped while a member's defragment went unanswered keeps its lock until the lease expires
    # (or until broken, under NOSPACE), by design (exporter.defrag.lock); the next test must not
    # inherit it, nor the NOSPACE tokens a run wrote.
    with contextlib.suppress(EtcdHarnessError):
        etcd_cluster.request(
            "/v3/kv/deleterange",
            {
                "key": base64.b64encode(LOCK_PREFIX).decode(),
                "range_end": base64.b64encode(prefix_end(LOCK_PREFIX)).decode(),
            },
        )
    if problems := _damage(etcd_cluster):
        etcd_cluster.start()
        pytest.fail(
            f"test damaged the shared etcd cluster ({'; '.join(problems)}); "
            "use the fresh_etcd_cluster fixture for that",
            pytrace=False,
        )


@pytest.fixture
def fresh_etcd_cluster(
    tmp_path_factory: pytest.TempPathFactory, etcd_build: EtcdBuild
) -> Iterator[EtcdCluster]:
    """A new 3-member cluster (32 MiB quota) the test may stop, kill or fill."""
    cluster = _start(tmp_path_factory.mktemp("etcd-fresh"), etcd_build)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tls_etcd_cluster(
    tmp_path_factory: pytest.TempPathFactory, etcd_build: EtcdBuild
) -> Iterator[EtcdCluster]:
    """A 3-member cluster whose clients must present a certificate (`cluster.tls`)."""
    cluster = _start(tmp_path_factory.mktemp("etcd-tls"), etcd_build, tls=True)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def fake_kube() -> AsyncIterator[FakeKube]:
    """A fake Kubernetes API on loopback (tests/fake_kube.py); fails a test that asked anything unexpected."""
    fake = FakeKube()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
    assert not fake.unexpected, f"unexpected Kubernetes API calls: {fake.unexpected}"


@pytest.fixture
async def kube_api(fake_kube: FakeKube) -> AsyncIterator[ApiClient]:
    """A real kubernetes_asyncio client talking to `fake_kube`."""
    async with await kube_api_client(host=fake_kube.url) as api:
        yield api


# --- a real control plane (tests/kube_control_plane.py) --------------------------------------------

_control_planes: list[ControlPlane] = []


@pytest.fixture(scope="session")
def kube_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager for the session; skipped where not built."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    plane = ControlPlane(tmp_path_factory.mktemp("kube"), binary_dir())
    try:
        plane.start()
    except ControlPlaneError as error:
        pytest.fail(str(error), pytrace=False)
    _control_planes.append(plane)
    try:
        yield plane
    finally:
        _control_planes.remove(plane)
        plane.stop()


@pytest.fixture
def kubelet(kube_control_plane: ControlPlane) -> StandInKubelet:
    """The test acting as scheduler and kubelet for Job Pods."""
    return StandInKubelet(kube_control_plane)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the control plane's log tails to a failing test that used it."""
    report = yield
    if report.failed and _control_planes and "kube_control_plane" in getattr(item, "fixturenames", ()):
        report.sections.append(("kube control plane logs", _control_planes[-1].log_tails()))
    return report


# --- the reliability suite's tally (tests/reliability_counts.py) ----------------------------------


@pytest.fixture(scope="session")
def reliability_counts() -> Counts:
    """The session-wide tally the reliability tests add to; written and printed at the end."""
    return COUNTS


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not COUNTS.empty():
        COUNTS.write(Path(session.config.rootpath) / "build" / "reliability-counts.json")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS.empty():
        terminalreporter.section("reliability counts (build/reliability-counts.json)")
        for line in COUNTS.lines():
            terminalreporter.write_line(line)
