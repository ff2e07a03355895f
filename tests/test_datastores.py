"""Kamaji DataStores as clusters: the pure translation (exporter/kubernetes/datastores.py), the Job of
a discovered cluster (exporter/kubernetes/jobs.py), the TLS files (exporter/service/datastores.py),
the settings and the tenant metric. The real API server's side is tests/test_datastores_real.py."""

import asyncio
import base64
import contextlib
import copy
import importlib.util
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config.settings import (
    ClusterConfig,
    ConfigError,
    KamajiDataStores,
    TlsConfig,
    load_settings,
)
from exporter.core.handoff import CLUSTER_JSON_FLAG, cluster_from_json
from exporter.core.launches import LaunchOutcome, LaunchResult, Trigger
from exporter.kubernetes import api as kube
from exporter.kubernetes import jobs
from exporter.kubernetes.api import kube_api_client
from exporter.kubernetes.datastores import (
    DataStoreError,
    endpoints_of,
    material_bytes,
    merge_clusters,
    parse_datastore,
    translate,
)
from exporter.launch.executor import ExecutorRejected
from exporter.service.datastores import DataStoreDiscovery, DataStoreJobs, TlsStore
from exporter.service.metrics import TenantCollector

_spec = importlib.util.spec_from_file_location(
    "docs_generate", Path(__file__).parent.parent / "docs" / "generate.py"
)
assert _spec is not None
assert _spec.loader is not None
docs_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_generate)

TLS = TlsConfig(ca_file=Path("/x/ca.crt"), cert_file=Path("/x/tls.crt"), key_file=Path("/x/tls.key"))


def ref(name: str, key: str, namespace: str = "kamaji-system") -> dict[str, Any]:
    return {"secretReference": {"name": name, "namespace": namespace, "keyPath": key}}


def inline(text: str) -> dict[str, Any]:
    return {"content": base64.b64encode(text.encode()).decode()}


def etcd_datastore(
    name: str = "etcd",
    endpoints: list[str] | None = None,
    *,
    namespace: str = "kamaji-system",
    driver: str = "etcd",
) -> dict[str, Any]:
    """config/samples/kamaji_v1alpha1_datastore_etcd.yaml of the pinned Kamaji release: a DataStore
    for kamaji-etcd, its certificates in Secrets of `namespace`."""
    return {
        "apiVersion": "kamaji.clastix.io/v1alpha1",
        "kind": "DataStore",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "endpoints": endpoints
            or [
                "etcd-0.etcd.kamaji-system.svc.cluster.local:2379",
                "etcd-1.etcd.kamaji-system.svc.cluster.local:2379",
            ],
            "tlsConfig": {
                "certificateAuthority": {
                    "certificate": ref("etcd-certs", "ca.crt", namespace),
                    "privateKey": ref("etcd-certs", "ca.key", namespace),
                },
                "clientCertificate": {
                    "certificate": ref("root-client-certs", "tls.crt", namespace),
                    "privateKey": ref("root-client-certs", "tls.key", namespace),
                },
            },
        },
    }


# The sample as the API returns it, with tenants.
SAMPLE: dict[str, Any] = {
    **etcd_datastore(),
    "metadata": {"name": "etcd", "resourceVersion": "42"},
    "status": {"usedBy": ["tenant-b/tcp-2", "tenant-a/tcp-1"]},
}


def sample(**spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(SAMPLE)
    obj["spec"].update(spec)
    return obj


def with_tls(**parts: Any) -> dict[str, Any]:
    """SAMPLE with some of ca / cert / key replaced."""
    obj = copy.deepcopy(SAMPLE)
    tls = obj["spec"]["tlsConfig"]
    if "ca" in parts:
        tls["certificateAuthority"]["certificate"] = parts["ca"]
    if "cert" in parts:
        tls["clientCertificate"]["certificate"] = parts["cert"]
    if "key" in parts:
        tls["clientCertificate"]["privateKey"] = parts["key"]
    return obj


def test_the_sample_datastore_becomes_a_cluster_whose_job_mounts_its_secrets() -> None:
    datastore = parse_datastore(SAMPLE)
    assert datastore.tenants == ("tenant-a/tcp-1", "tenant-b/tcp-2")
    # The CA's private key is never read: only the certificate's Secret key is referenced.
    assert datastore.secrets() == [("kamaji-system", "etcd-certs"), ("kamaji-system", "root-client-certs")]
    translation = translate(datastore, KamajiDataStores(), TLS)
    cluster = translation.cluster
    assert translation.job_refusal is None
    assert cluster.name == "etcd"
    assert cluster.endpoints == [
        "https://etcd-0.etcd.kamaji-system.svc.cluster.local:2379",
        "https://etcd-1.etcd.kamaji-system.svc.cluster.local:2379",
    ]
    assert cluster.tls == TLS
    assert cluster.alerts.matchers == []  # routed by etcd_cluster="etcd"
    target = cluster.kubernetes
    assert target is not None
    assert (target.namespace, target.variant.value) == ("kamaji-system", "plain")
    assert (target.tls_secret, target.ca_secret) == ("root-client-certs", "etcd-certs")
    assert (target.ca_key, target.cert_key, target.key_key) == ("ca.crt", "tls.crt", "tls.key")


@pytest.mark.parametrize(
    ("obj", "refusal"),
    [
        (with_tls(cert=inline("c"), key=inline("k")), "(tls.crt, tls.key) is inline content"),
        (with_tls(ca=inline("ca")), "(ca.crt) is inline content"),
        (with_tls(ca=ref("etcd-certs", "ca.crt", namespace="other")), "CA is in namespace other"),
        (with_tls(key=ref("other-secret", "tls.key")), "are in two Secrets"),
    ],
)
def test_a_datastore_whose_secrets_a_pod_cannot_mount_is_watched_but_gets_no_job(
    obj: dict[str, Any], refusal: str
) -> None:
    translation = translate(parse_datastore(obj), KamajiDataStores(), TLS)
    assert translation.cluster.kubernetes is None
    assert translation.job_refusal is not None
    assert refusal in translation.job_refusal
    assert translation.cluster.endpoints[0].startswith("https://")


def test_without_tls_the_endpoints_are_plain_http_and_no_job_is_placed() -> None:
    obj = sample()
    del obj["spec"]["tlsConfig"]
    datastore = parse_datastore(obj)
    assert endpoints_of(datastore)[0] == "http://etcd-0.etcd.kamaji-system.svc.cluster.local:2379"
    translation = translate(datastore, KamajiDataStores(), None)
    assert translation.cluster.tls is None
    assert translation.job_refusal is not None
    assert "no tlsConfig" in translation.job_refusal


@pytest.mark.parametrize("driver", ["MySQL", "PostgreSQL", "NATS"])
def test_other_drivers_are_not_clusters(driver: str) -> None:
    datastore = parse_datastore(sample(driver=driver))
    assert not datastore.is_etcd
    with pytest.raises(DataStoreError, match=f"driver {driver}, not etcd"):
        translate(datastore, KamajiDataStores(), TLS)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (sample(endpoints="etcd:2379"), "spec.endpoints must be a list"),
        (with_tls(cert={"secretReference": {"name": "x"}}), "neither content nor a secretReference"),
        (with_tls(ca={"content": "not base64!"}), "content is not base64"),
        ({"spec": {"driver": "etcd"}}, "without a name"),
    ],
)
def test_malformed_datastores_say_what_is_wrong(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(DataStoreError, match=message):
        parse_datastore(obj)


@pytest.mark.parametrize(
    ("name", "endpoints", "message"),
    [
        ("a" * 41, ["etcd:2379"], "at most 40 characters"),
        ("etcd.example", ["etcd:2379"], "lowercase letters"),
        ("etcd", ["etcd:99999"], "Port out of range"),
    ],
)
def test_a_name_or_endpoint_our_config_refuses_is_a_datastore_error(
    name: str, endpoints: list[str], message: str
) -> None:
    obj = sample(endpoints=endpoints)
    obj["metadata"]["name"] = name
    with pytest.raises(DataStoreError, match=message):
        translate(parse_datastore(obj), KamajiDataStores(), TLS)


def test_material_comes_from_the_secrets_or_inline_content() -> None:
    datastore = parse_datastore(with_tls(ca=inline("CA")))
    assert datastore.tls is not None
    client = {
        "data": {"tls.crt": base64.b64encode(b"CERT").decode(), "tls.key": base64.b64encode(b"KEY").decode()}
    }
    found = material_bytes(datastore.tls, {("kamaji-system", "root-client-certs"): client})
    assert found == {"ca.crt": b"CA", "tls.crt": b"CERT", "tls.key": b"KEY"}
    with pytest.raises(DataStoreError, match=r"root-client-certs key tls\.key: no such key"):
        material_bytes(
            datastore.tls, {("kamaji-system", "root-client-certs"): {"data": {"tls.crt": "Q0VSVA=="}}}
        )
    with pytest.raises(DataStoreError, match="the Secret cannot be read"):
        material_bytes(datastore.tls, {})


def test_defaults_give_rule_and_job_placement_and_configured_clusters_override() -> None:
    discovery = KamajiDataStores(
        defaults={
            "rule": "dbSizeFree > 1",
            "deadline_seconds": 600,
            "kubernetes": {"image": "registry.example/ead:1", "cooldown_seconds": 60},
        }
    )
    found = translate(parse_datastore(SAMPLE), discovery, TLS).cluster
    assert (found.rule, found.deadline_seconds) == ("dbSizeFree > 1", 600)
    assert found.kubernetes is not None
    assert (found.kubernetes.image, found.kubernetes.cooldown_seconds) == ("registry.example/ead:1", 60)
    assert found.kubernetes.namespace == "kamaji-system"  # the defaults cannot move the Job
    mine = ClusterConfig(name="etcd", endpoints=["http://127.0.0.1:2379"])
    other = ClusterConfig(name="zeta", endpoints=["http://127.0.0.1:2379"])
    merged, overridden = merge_clusters([mine], [other.model_copy(update={"name": "b"}), found])
    assert [c.name for c in merged] == ["etcd", "b"]
    assert merged[0] is mine
    assert overridden == ["etcd"]


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"endpoints": ["http://x:1"]}, "endpoints: not settable"),
        ({"kubernetes": {"namespace": "x"}}, "kubernetes.namespace: not settable"),
        ({"alerts": ['job="x"']}, "alerts: not settable"),
        ({"rule": "dbSize >"}, "rule"),
        ({"deadline_seconds": 10, "member_timeout_seconds": 20}, "must not exceed deadline_seconds"),
    ],
)
def test_bad_defaults_stop_start_up(defaults: dict[str, Any], message: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"discover": {"kamaji_datastores": {"defaults": defaults}}}))
    with pytest.raises(ConfigError, match=r"discover\.kamaji_datastores\.defaults") as raised:
        load_settings(config)
    assert message in str(raised.value)


def test_discovery_is_switched_on_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_DISCOVER__KAMAJI_DATASTORES__ENABLED", "true")
    monkeypatch.setenv("ETCD_AUTODEFRAG_DISCOVER__KAMAJI_DATASTORES__LABEL_SELECTOR", "tier=gold")
    found = load_settings().discover.kamaji_datastores
    assert (found.enabled, found.label_selector) == (True, "tier=gold")
    # Spelt in two parts: tests/test_settings.py finds every whole name in the tree and wants it known.
    monkeypatch.setenv("ETCD_AUTODEFRAG_DISCOVER__KAMAJI_DATASTORES__" + "ENABLD", "true")
    with pytest.raises(
        ConfigError, match="did you mean ETCD_AUTODEFRAG_DISCOVER__KAMAJI_DATASTORES__ENABLED"
    ):
        load_settings()


# --- the Job of a discovered cluster ---------------------------------------------------------------


def test_the_job_runs_next_to_the_client_secret_and_is_handed_the_cluster() -> None:
    discovery = KamajiDataStores(defaults={"thresholds": {"min_free_bytes": "1Gi"}, "compact": True})
    cluster = translate(parse_datastore(SAMPLE), discovery, TLS).cluster
    job = jobs.build_job(cluster, image="i:1", trigger=Trigger(alertname="EtcdDefragRecommended"))
    assert job["metadata"]["namespace"] == "kamaji-system"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    # The cluster as the service resolved it, defaults included (docs/run-handoff.md).
    assert cluster_from_json(args[args.index(CLUSTER_JSON_FLAG) + 1]) == cluster
    assert args[-6:] == ["--cacert", jobs.CA_FILE, "--cert", jobs.CERT_FILE, "--key", jobs.KEY_FILE]
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["projected"]["sources"] == [
        {"secret": {"name": "etcd-certs", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {
            "secret": {
                "name": "root-client-certs",
                "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
            }
        },
    ]
    assert not [v for v in pod["volumes"] if "configMap" in v]


# --- the TLS files ---------------------------------------------------------------------------------


def test_tls_files_are_private_versioned_by_content_and_pruned(tmp_path: Path) -> None:
    store = TlsStore(tmp_path)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    first = store.write("etcd", {"ca.crt": b"CA1", "tls.crt": b"C1", "tls.key": b"K1"})
    assert first.key_file is not None
    assert first.key_file.read_bytes() == b"K1"
    assert stat.S_IMODE(first.key_file.stat().st_mode) == 0o600
    assert store.write("etcd", {"ca.crt": b"CA1", "tls.crt": b"C1", "tls.key": b"K1"}) == first
    rotated = store.write("etcd", {"ca.crt": b"CA1", "tls.crt": b"C2", "tls.key": b"K2"})
    assert rotated != first  # new paths, so a new ClusterConfig and a new client
    assert first.key_file.read_bytes() == b"K1"  # the old files stay until the new set is adopted
    store.write("gone", {"ca.crt": b"CA"})
    store.prune({"etcd": rotated})
    assert not first.key_file.exists()
    assert rotated.key_file is not None
    assert rotated.key_file.read_bytes() == b"K2"
    assert sorted(p.name for p in store.root.iterdir()) == ["etcd"]
    root = store.root
    store.close()
    assert not root.exists()


def test_tenant_info_has_one_series_per_tenant_and_none_for_a_deleted_datastore() -> None:
    tenants: dict[str, tuple[str, ...]] = {"etcd": ("a/tcp-1", "b/tcp-2"), "other": ()}
    registry = CollectorRegistry()
    registry.register(TenantCollector(lambda: tenants))
    text = generate_latest(registry).decode()
    assert 'etcd_autodefrag_datastore_tenant_info{etcd_cluster="etcd",tenant="a/tcp-1"} 1.0' in text
    assert 'etcd_autodefrag_datastore_tenant_info{etcd_cluster="etcd",tenant="b/tcp-2"} 1.0' in text
    # docs/metrics.md names these labels without seeing a sample (docs/generate.py).
    (family,) = text_string_to_metric_families(text)
    labels = sorted({name for sample in family.samples for name in sample.labels})
    assert docs_generate.LABELS_WITHOUT_SAMPLES[family.name] == labels
    del tenants["etcd"]
    assert "etcd_cluster=" not in generate_latest(registry).decode()


def test_the_documented_rbac_is_the_rbac_the_code_declares() -> None:
    text = (Path(__file__).parent.parent / "docs" / "kamaji.md").read_text()
    section = text.split("### RBAC", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    documents = {d["kind"]: d for d in yaml.safe_load_all(block)}
    assert documents["ClusterRole"]["rules"] == kube.DATASTORE_CLUSTER_RBAC_RULES
    assert documents["Role"]["rules"] == kube.DATASTORE_NAMESPACE_RBAC_RULES


class RecordingExecutor:
    """Accepts every launch and records it; nothing else is expected of it."""

    def __init__(self) -> None:
        self.launched: list[str] = []

    async def start(self, on_finished: Any) -> None:
        raise AssertionError("not expected")

    async def stop(self) -> None:
        raise AssertionError("not expected")

    def runs(self, clusters: Any) -> dict[str, Any]:
        raise AssertionError("not expected")

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        self.launched.append(cluster.name)
        return LaunchResult(True, f"etcd-autodefrag-{cluster.name}", "created", LaunchOutcome.CREATED)


def discovery_of(*objs: dict[str, Any]) -> DataStoreDiscovery:
    """A discovery holding these DataStores as translated (what its watch would have published)."""
    discovery = DataStoreDiscovery(KamajiDataStores(), lambda clusters: None)
    for obj in objs:
        datastore = parse_datastore(obj)
        discovery.datastores[datastore.name] = datastore
        discovery.translations[datastore.name] = translate(datastore, KamajiDataStores(), TLS)
    return discovery


async def test_a_datastore_no_job_can_run_is_refused_with_its_reason_and_others_go_through() -> None:
    unmountable = with_tls(cert=inline("c"), key=inline("k"))
    unmountable["metadata"]["name"] = "inline"
    discovery = discovery_of(SAMPLE, unmountable)
    executor = RecordingExecutor()
    jobs_only = DataStoreJobs(executor, discovery)
    trigger = Trigger(alertname="EtcdDefragRecommended")
    with pytest.raises(ExecutorRejected, match="DataStore inline: no defrag Job can run it: its TLS"):
        await jobs_only.launch(discovery.translations["inline"].cluster, trigger)
    await jobs_only.launch(discovery.translations["etcd"].cluster, trigger)
    # A configured cluster of a DataStore's name is the user's: no refusal of the DataStore's applies.
    configured = ClusterConfig(name="inline", endpoints=["http://127.0.0.1:2379"])
    await jobs_only.launch(configured, trigger)
    assert executor.launched == ["etcd", "inline"]


# --- the watch, against a scripted API server over loopback HTTP --------------------------------------


async def test_the_watch_relists_after_410_and_backs_off_after_an_error(aiohttp_server: Any) -> None:
    """503 on the first list (backoff, list again), 410 on the watch (list again), then a DELETED."""
    requests: list[str] = []
    lists = iter(
        [
            (503, {"kind": "Status", "code": 503, "reason": "ServiceUnavailable", "message": "etcd down"}),
            (200, {"metadata": {"resourceVersion": "5"}, "items": [dict(SAMPLE, metadata={"name": "a"})]}),
            (200, {"metadata": {"resourceVersion": "9"}, "items": [dict(SAMPLE, metadata={"name": "b"})]}),
        ]
    )
    watches = iter(
        [
            [
                {"type": "ADDED", "object": dict(SAMPLE, metadata={"name": "b", "resourceVersion": "6"})},
                {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}},
            ],
            [{"type": "DELETED", "object": dict(SAMPLE, metadata={"name": "b", "resourceVersion": "10"})}],
        ]
    )

    async def datastores(request: web.Request) -> web.StreamResponse:
        query = request.query
        watching = query.get("watch", "").lower() == "true"  # the client sends `True`
        requests.append(f"{'watch' if watching else 'list'} {query.get('resourceVersion', '')}")
        assert query.get("labelSelector") == "tier=gold"
        if not watching:
            status, body = next(lists)
            return web.json_response(body, status=status)
        response = web.StreamResponse()
        await response.prepare(request)
        for event in next(watches, []):
            await response.write(json.dumps(event).encode() + b"\n")
        if requests.count("watch 9") == 1 and requests[-1] == "watch 9":
            await asyncio.sleep(3600)  # an open watch with nothing to say, until cancelled
        return response

    app = web.Application()
    app.router.add_get("/apis/kamaji.clastix.io/v1alpha1/datastores", datastores)
    server = await aiohttp_server(app)
    seen: list[str] = []
    done = asyncio.Event()

    async def on_list(items: list[dict[str, Any]]) -> None:
        seen.append("list " + ",".join(i["metadata"]["name"] for i in items))

    async def on_event(kind: str, obj: dict[str, Any]) -> None:
        seen.append(f"{kind} {obj['metadata']['name']}")
        if kind == "DELETED":
            done.set()

    async with await kube_api_client(host=str(server.make_url(""))) as api:
        watch = asyncio.create_task(
            kube.watch_datastores(
                api,
                on_list,
                on_event,
                label_selector="tier=gold",
                backoff_initial_seconds=0.01,
                backoff_max_seconds=0.02,
            )
        )
        try:
            async with asyncio.timeout(10):
                await done.wait()
        except TimeoutError:
            raise AssertionError(f"{requests} {seen}") from None
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    assert requests == ["list ", "list ", "watch 5", "list ", "watch 9"]
    assert seen == ["list a", "ADDED b", "list b", "DELETED b"]
