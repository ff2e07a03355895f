"""exporter/kubernetes/api.py with the real kubernetes_asyncio client against a fake API on loopback."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient

from exporter.config.settings import ClusterConfig, ConfigError
from exporter.core.handoff import cluster_from_json
from exporter.core.launches import LaunchOutcome, Trigger
from exporter.core.report import MemberOutcome, MemberReport, RunOutcome, RunReport, RunResult
from exporter.kubernetes.api import (
    RBAC_RULES,
    KubeRejected,
    KubeUnavailable,
    create_job,
    discover_kamaji,
    discover_kubeadm,
    kube_api_client,
    record_event,
    watch_jobs,
)
from exporter.kubernetes.jobs import JobOutcome, RunningJob, build_job
from exporter.launch.kubernetes import KubernetesExecutor

NAMESPACE = "etcd"
TIMEOUT = 5.0


def manifest(name: str = "tenant-a", **trigger: Any) -> dict[str, Any]:
    cluster = ClusterConfig(
        name=name,
        endpoints=["https://10.0.0.1:2379"],
        kubernetes={"namespace": NAMESPACE, "variant": "talos", "tls_secret": "talos-etcd"},
    )
    return build_job(
        cluster,
        image="ghcr.io/etcd-autodefrag/etcd-autodefrag:test",
        trigger=Trigger(alertname="A", **trigger),
    )


def report_json(cluster: str = "tenant-a") -> str:
    report = RunReport(
        cluster=cluster,
        result=RunResult.SUCCESS,
        members=[
            MemberReport(
                name="m1",
                id="1",
                endpoint="e",
                leader=True,
                outcome=MemberOutcome.DEFRAGMENTED,
                reclaimed_bytes=5,
            )
        ],
    )
    return report.summary_json()


# --- create_job ---------------------------------------------------------------------------------------


async def test_create_then_409_says_running_then_cooling_down(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    job = manifest()
    first = await create_job(kube_api, job, timeout=TIMEOUT)
    assert (first.created, first.job_name, first.outcome) == (
        True,
        "etcd-autodefrag-tenant-a",
        LaunchOutcome.CREATED,
    )
    stored = fake_kube.job(NAMESPACE, "etcd-autodefrag-tenant-a")
    args = stored["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["defrag", "--cluster-json"]
    assert cluster_from_json(args[2]).name == "tenant-a"

    second = await create_job(kube_api, job, timeout=TIMEOUT)
    assert not second.created
    assert second.outcome is LaunchOutcome.ALREADY_RUNNING
    assert second.reason.startswith("already running: Job etcd-autodefrag-tenant-a (created ")

    fake_kube.start_job(NAMESPACE, "etcd-autodefrag-tenant-a")
    assert "(started " in (await create_job(kube_api, job, timeout=TIMEOUT)).reason

    fake_kube.finish_job(NAMESPACE, "etcd-autodefrag-tenant-a", message=report_json())
    cooling = await create_job(kube_api, job, timeout=TIMEOUT)
    assert not cooling.created
    assert cooling.outcome is LaunchOutcome.COOLING_DOWN
    assert "cooling down: Job etcd-autodefrag-tenant-a succeeded at " in cooling.reason
    assert "Kubernetes removes it at " in cooling.reason

    fake_kube.delete_job(NAMESPACE, "etcd-autodefrag-tenant-a")  # the TTL ran out: the cooldown is over
    assert (await create_job(kube_api, job, timeout=TIMEOUT)).created


async def test_a_job_deleted_between_create_and_read_is_created_again(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    await create_job(kube_api, manifest(), timeout=TIMEOUT)
    fake_kube.fail_next(1, 404, match="GET /apis/batch/v1/namespaces/etcd/jobs/etcd-autodefrag-tenant-a")
    result = await create_job(kube_api, manifest(), timeout=TIMEOUT)
    assert result.outcome is LaunchOutcome.ALREADY_RUNNING
    creates = [r for r in fake_kube.requests if r.method == "POST"]
    assert len(creates) == 3


async def test_dry_run_asks_the_api_server_and_stores_nothing(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    result = await create_job(kube_api, manifest(), timeout=TIMEOUT, dry_run=True)
    assert (result.created, result.outcome) == (False, LaunchOutcome.DRY_RUN)
    assert fake_kube.jobs == {}
    assert fake_kube.requests[-1].query["dryRun"] == "All"


@pytest.mark.parametrize(
    ("fault", "status", "retry_after", "exists"),
    [
        (lambda fake: fake.fail_next(1, 500), 500, None, False),
        (lambda fake: fake.fail_next(1, 503), 503, None, False),
        (lambda fake: fake.fail_next(1, 504), 504, None, False),
        (lambda fake: fake.fail_next(1, 429, retry_after="3"), 429, 3.0, False),
        (lambda fake: fake.hang_next(1), 0, None, False),
        (lambda fake: fake.fail_next(1, 500, match="GET "), 500, None, True),  # the read after a 409
        (lambda fake: fake.hang_next(1, match="GET "), 0, None, True),
    ],
)
async def test_retryable_failures_are_unavailable(
    fake_kube: FakeKube,
    kube_api: ApiClient,
    fault: Callable[[FakeKube], None],
    status: int,
    retry_after: float | None,
    exists: bool,
) -> None:
    if exists:
        await create_job(kube_api, manifest(), timeout=TIMEOUT)
    fault(fake_kube)
    with pytest.raises(KubeUnavailable) as error:
        await create_job(kube_api, manifest(), timeout=0.5)
    assert error.value.status == status
    assert error.value.retry_after_seconds == retry_after
    assert not fake_kube.faults  # the fault was hit


async def test_a_slow_answer_within_the_timeout_is_fine(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    fake_kube.delay_next(1, 0.2)
    assert (await create_job(kube_api, manifest(), timeout=2)).created


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (
            403,
            'jobs.batch is forbidden: User "system:serviceaccount:etcd:ead" cannot create resource "jobs"',
        ),
        (
            422,
            'Job.batch "etcd-autodefrag-tenant-a" is invalid: spec.template.spec.containers[0].image',
        ),
        (404, 'namespaces "etcd" not found'),
        (401, "Unauthorized"),
    ],
)
async def test_refusals_are_rejected_with_the_api_message(
    fake_kube: FakeKube, kube_api: ApiClient, status: int, message: str
) -> None:
    fake_kube.fail_next(1, status, message=message)
    with pytest.raises(KubeRejected) as error:
        await create_job(kube_api, manifest(), timeout=TIMEOUT)
    assert error.value.status == status
    assert message in str(error.value)
    assert fake_kube.jobs == {}


async def test_an_unreachable_api_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with await kube_api_client(host=f"http://127.0.0.1:{port}") as api:
        with pytest.raises(KubeUnavailable, match="unreachable"):
            await create_job(api, manifest(), timeout=TIMEOUT)


async def test_a_kubeconfig_is_used_outside_a_pod(
    fake_kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake_kube.url}"}}}}]
users: [{{name: ead, user: {{token: s3cret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: ead, namespace: etcd}}}}]
current-context: fake
"""
    )
    async with await kube_api_client(kubeconfig=kubeconfig) as api:
        assert (await create_job(api, manifest(), timeout=TIMEOUT)).created
    assert fake_kube.requests[-1].authorization == "Bearer s3cret"


async def test_no_kubernetes_configuration_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no usable Kubernetes configuration"):
        await kube_api_client(kubeconfig=tmp_path / "missing")


async def test_concurrent_creates_make_exactly_one_job_per_cluster(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    manifests = [manifest(f"cluster-{i}") for i in range(10)]
    results = await asyncio.gather(
        *(create_job(kube_api, manifests[i % 10], timeout=30) for i in range(1000))
    )
    created = [r for r in results if r.created]
    assert len(created) == 10
    assert {r.job_name for r in created} == {f"etcd-autodefrag-cluster-{i}" for i in range(10)}
    assert {r.outcome for r in results if not r.created} == {LaunchOutcome.ALREADY_RUNNING}
    assert len(fake_kube.jobs) == 10
    assert sum(r.method == "POST" for r in fake_kube.requests) == 1000


# --- watch_jobs ---------------------------------------------------------------------------------------


class Outcomes:
    """Collects what watch_jobs reports."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[JobOutcome] = asyncio.Queue()
        self.seen: list[JobOutcome] = []

    async def __call__(self, outcome: JobOutcome) -> None:
        self.seen.append(outcome)
        await self.queue.put(outcome)

    async def next(self) -> JobOutcome:
        return await asyncio.wait_for(self.queue.get(), 5)


@pytest.fixture
async def watching(kube_api: ApiClient) -> AsyncIterator[Outcomes]:
    outcomes = Outcomes()
    task = asyncio.create_task(
        watch_jobs(kube_api, NAMESPACE, outcomes, request_timeout=2, backoff_initial_seconds=0.05)
    )
    yield outcomes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def create(fake_kube: FakeKube, kube_api: ApiClient, cluster: str) -> str:
    result = await create_job(kube_api, manifest(cluster), timeout=TIMEOUT)
    assert result.created
    return result.job_name


async def test_watch_reports_each_finished_job_once_with_its_report(
    fake_kube: FakeKube, kube_api: ApiClient, watching: Outcomes
) -> None:
    a = await create(fake_kube, kube_api, "a")
    b = await create(fake_kube, kube_api, "b")
    fake_kube.start_job(NAMESPACE, a)
    fake_kube.finish_job(NAMESPACE, a, message=report_json("a"))
    done = await watching.next()
    assert (done.cluster, done.job_name, done.succeeded, done.namespace) == ("a", a, True, NAMESPACE)
    assert done.report is not None
    assert done.report["result"] == "success"
    assert done.report["reclaimed_bytes"] == 5
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.started_at <= done.finished_at

    fake_kube.finish_job(NAMESPACE, b, succeeded=False)  # killed before it could write a report
    failed = await watching.next()
    assert (failed.cluster, failed.succeeded, failed.report, failed.reason) == (
        "b",
        False,
        None,
        "BackoffLimitExceeded",
    )

    # Further changes to finished Jobs report nothing new.
    fake_kube.finish_job(NAMESPACE, a, message=report_json("a"))
    await asyncio.sleep(0.2)
    assert [o.job_name for o in watching.seen] == [a, b]


async def test_watch_reports_jobs_still_running_and_their_disappearance(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    """A restarted service must see its run in flight: the list reports running Jobs too."""
    running: asyncio.Queue[RunningJob] = asyncio.Queue()
    gone: asyncio.Queue[RunningJob] = asyncio.Queue()
    finished = Outcomes()
    a = await create(fake_kube, kube_api, "a")  # before the watch starts: only the list can see it
    fake_kube.start_job(NAMESPACE, a)
    task = asyncio.create_task(
        watch_jobs(
            kube_api,
            NAMESPACE,
            finished,
            on_running=running.put_nowait,
            on_gone=gone.put_nowait,
            request_timeout=2,
            backoff_initial_seconds=0.05,
        )
    )
    try:
        listed = await asyncio.wait_for(running.get(), 5)
        assert (listed.cluster, listed.job_name) == ("a", a)
        assert listed.started_at is not None
        b = await create(fake_kube, kube_api, "b")
        added = await asyncio.wait_for(running.get(), 5)
        assert (added.cluster, added.job_name) == ("b", b)
        fake_kube.start_job(NAMESPACE, b)  # a change of a Job already reported running: nothing new
        fake_kube.finish_job(NAMESPACE, a, message=report_json("a"))
        assert (await finished.next()).job_name == a
        fake_kube.delete_job(NAMESPACE, a)  # finished, then deleted by its TTL: not "gone"
        fake_kube.delete_job(NAMESPACE, b)  # deleted while running: gone, without an outcome
        assert (await asyncio.wait_for(gone.get(), 5)).job_name == b
        c = await create(fake_kube, kube_api, "c")
        assert (await asyncio.wait_for(running.get(), 5)).job_name == c  # events come in order
        assert running.empty()
        assert gone.empty()
        assert [o.job_name for o in finished.seen] == [a]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_restarted_executor_sees_the_job_in_flight_and_counts_its_end(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    name = await create(fake_kube, kube_api, "a")
    fake_kube.start_job(NAMESPACE, name)
    executor = KubernetesExecutor(
        api_client=kube_api, image="img", cooldown_seconds=60, timeout_seconds=2, namespaces=[NAMESPACE]
    )
    ended: asyncio.Queue[RunOutcome] = asyncio.Queue()
    await executor.start(ended.put_nowait)
    try:
        await wait_for_condition(lambda: executor.runs(["a"])["a"].running, "the Job seen running")
        fake_kube.finish_job(NAMESPACE, name, message=report_json("a"))
        outcome = await asyncio.wait_for(ended.get(), 5)
        assert (outcome.cluster, outcome.result) == ("a", "success")
        assert not executor.runs(["a"])["a"].running
    finally:
        await executor.stop()


async def wait_for_condition(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_watch_survives_410_gone_without_reporting_twice(
    fake_kube: FakeKube, kube_api: ApiClient, watching: Outcomes
) -> None:
    a = await create(fake_kube, kube_api, "a")
    fake_kube.finish_job(NAMESPACE, a, message=report_json("a"))
    await watching.next()
    lists_before = sum(
        r.method == "GET" and r.path.endswith("/jobs") and "watch" not in r.query for r in fake_kube.requests
    )

    fake_kube.expire_watches()  # the watch ends; resuming it answers 410 Gone
    b = await create(fake_kube, kube_api, "b")
    fake_kube.finish_job(NAMESPACE, b, message=report_json("b"))
    assert (await watching.next()).job_name == b
    await asyncio.sleep(0.2)
    assert [o.job_name for o in watching.seen] == [a, b]  # a, still there after the re-list: not again
    lists_after = sum(
        r.method == "GET" and r.path.endswith("/jobs") and "watch" not in r.query for r in fake_kube.requests
    )
    assert lists_after == lists_before + 1


async def test_watch_reports_jobs_that_finished_before_it_started(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    name = await create(fake_kube, kube_api, "early")
    fake_kube.finish_job(NAMESPACE, name, message=report_json("early"))
    seen: list[JobOutcome] = []
    task = asyncio.create_task(watch_jobs(kube_api, NAMESPACE, seen.append))  # a plain function is fine too
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(o.cluster, o.succeeded) for o in seen] == [("early", True)]


async def test_watch_backs_off_and_recovers_from_errors(
    fake_kube: FakeKube, kube_api: ApiClient, watching: Outcomes
) -> None:
    await asyncio.sleep(0.1)  # the watch is open
    fake_kube.fail_next(3, 500, match="GET /apis/batch/v1/namespaces/etcd/jobs")
    fake_kube.expire_watches()
    name = await create(fake_kube, kube_api, "c")
    fake_kube.fail_next(1, 503, match="GET /api/v1/namespaces/etcd/pods")
    fake_kube.finish_job(NAMESPACE, name, message=report_json("c"))
    outcome = await watching.next()
    assert outcome.report is not None
    assert outcome.report["cluster"] == "c"


async def test_a_failing_callback_does_not_stop_the_watch(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    seen: list[str] = []

    def callback(outcome: JobOutcome) -> None:
        seen.append(outcome.cluster)
        raise RuntimeError("bug in the caller")

    task = asyncio.create_task(watch_jobs(kube_api, NAMESPACE, callback))
    for cluster in ("x", "y"):
        fake_kube.finish_job(NAMESPACE, await create(fake_kube, kube_api, cluster))
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(seen) == ["x", "y"]


# --- events and discovery -------------------------------------------------------------------------------


async def test_record_event_posts_an_event_about_the_job(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    await create_job(kube_api, manifest(), timeout=TIMEOUT)
    job = fake_kube.job(NAMESPACE, "etcd-autodefrag-tenant-a")
    created = await record_event(kube_api, job, "DefragLaunched", "alert A fired", "Normal")
    (event,) = fake_kube.events
    assert created["metadata"]["name"].startswith("etcd-autodefrag-tenant-a.")
    assert event["involvedObject"]["uid"] == job["metadata"]["uid"]
    assert (event["reason"], event["message"], event["type"]) == ("DefragLaunched", "alert A fired", "Normal")
    posted = {k: v for k, v in event.items() if k != "metadata"}
    kubernetes_validate.validate(
        {**posted, "metadata": {"name": "x", "namespace": NAMESPACE}}, "1.30", strict=True
    )


async def test_record_event_failure_is_a_kube_error(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    fake_kube.fail_next(1, 403, match="/events")
    with pytest.raises(KubeRejected, match="403 Forbidden"):
        await record_event(kube_api, manifest(), "DefragLaunched", "m", "Warning")


async def test_discover_kamaji_reads_the_statefulset(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=5)
    endpoints = await discover_kamaji(kube_api, "kamaji-system", "kamaji-etcd", "kamaji-etcd")
    assert endpoints == [
        f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(5)
    ]
    with pytest.raises(KubeRejected, match=r'statefulsets\.apps "nope" not found'):
        await discover_kamaji(kube_api, "kamaji-system", "nope", "nope")


async def test_discover_kubeadm_reads_the_static_pods(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    for node, ip in (("cp-1", "10.0.0.11"), ("cp-2", "10.0.0.12")):
        fake_kube.add_pod(
            {
                "metadata": {
                    "name": f"etcd-{node}",
                    "namespace": "kube-system",
                    "labels": {"component": "etcd", "tier": "control-plane"},
                },
                "spec": {
                    "containers": [
                        {"name": "etcd", "command": ["etcd", f"--advertise-client-urls=https://{ip}:2379"]}
                    ]
                },
                "status": {"hostIP": ip},
            }
        )
    fake_kube.add_pod(
        {
            "metadata": {
                "name": "kube-apiserver-cp-1",
                "namespace": "kube-system",
                "labels": {"component": "kube-apiserver"},
            },
            "spec": {"containers": [{"name": "kube-apiserver", "command": ["kube-apiserver"]}]},
            "status": {"hostIP": "10.0.0.11"},
        }
    )
    assert await discover_kubeadm(kube_api) == ["https://10.0.0.11:2379", "https://10.0.0.12:2379"]
    assert fake_kube.requests[-1].query["labelSelector"] == "component=etcd,tier=control-plane"


# --- RBAC and the fake itself ---------------------------------------------------------------------------


async def test_every_call_is_covered_by_the_rbac_rules(
    fake_kube: FakeKube, kube_api: ApiClient, watching: Outcomes
) -> None:
    name = await create(fake_kube, kube_api, "rbac")
    await create_job(kube_api, manifest("rbac"), timeout=TIMEOUT)  # 409, then get
    fake_kube.finish_job(NAMESPACE, name, message=report_json("rbac"))
    await watching.next()  # list, watch, pods list
    await record_event(kube_api, fake_kube.job(NAMESPACE, name), "DefragFinished", "ok")
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=3)
    await discover_kamaji(kube_api, "kamaji-system", "kamaji-etcd", "kamaji-etcd")
    await discover_kubeadm(kube_api)

    allowed = {
        (group, resource, verb)
        for rule in RBAC_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    used = {r.rbac() for r in fake_kube.requests}
    assert used == allowed  # everything called is allowed, and nothing is allowed that is not called


async def test_the_fake_records_calls_it_was_not_told_to_expect(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    from kubernetes_asyncio.client import BatchV1Api

    response = await BatchV1Api(kube_api).delete_namespaced_job("x", NAMESPACE, _preload_content=False)
    body = json.loads(await response.read())
    response.release()
    assert (response.status, body["kind"], body["code"]) == (404, "Status", 404)
    assert fake_kube.unexpected == ["DELETE /apis/batch/v1/namespaces/etcd/jobs/x"]
    fake_kube.unexpected.clear()  # seen: let the fixture pass
