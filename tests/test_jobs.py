"""The defrag Job as data: manifests per variant (schema-valid), hostile alert text, reports, discovery."""

import ast
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import exporter.kubernetes.jobs
from exporter.config.settings import ClusterConfig, ConfigError, KubernetesTarget, load_settings
from exporter.core.handoff import cluster_from_json, cluster_json
from exporter.core.launches import LaunchOutcome, Trigger
from exporter.core.report import MemberOutcome, MemberReport, RunReport, RunResult
from exporter.kubernetes.jobs import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    JobConfigError,
    build_event,
    build_job,
    existing_job_launch,
    job_name,
    job_outcome,
    kubeadm_endpoints,
    parse_termination_message,
    sanitize_label_value,
)

# The oldest Kubernetes we claim and the newest schema the package ships.
K8S_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
TRIGGER = Trigger(
    alertname="EtcdDefragRecommended",
    group_key='{}:{etcd_cluster="a"}',
    fingerprint="5c1b3a9e0d2f4e61",
    receiver="etcd-autodefrag",
    fired_at=datetime(2026, 11, 22, 7, 0, tzinfo=UTC),
)


def cluster(kubernetes: dict[str, Any], *, endpoints: list[str] | None = None, **extra: Any) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "name": "tenant-a",
            "endpoints": endpoints or ["https://10.0.0.1:2379"],
            "kubernetes": kubernetes,
            **extra,
        }
    )


def validate(manifest: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(job)["containers"]
    assert len(containers) == 1
    return containers[0]


def mounts(job: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}


def volumes(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(job)["volumes"]}


TLS_FLAGS = ["--cacert", CA_FILE, "--cert", CERT_FILE, "--key", KEY_FILE]

VARIANTS = {
    "kamaji": (
        {
            "namespace": "kamaji-system",
            "variant": "kamaji",
            "etcd_name": "kamaji-etcd",
            "secret_layout": "self-signed",
        },
        None,
        TLS_FLAGS,
    ),
    "talos": ({"namespace": "etcd", "variant": "talos", "tls_secret": "talos-etcd"}, None, TLS_FLAGS),
    "kubeadm": ({"namespace": "kube-system", "variant": "kubeadm"}, None, TLS_FLAGS),
    "plain-mtls": (
        {
            "namespace": "etcd",
            "tls_secret": "etcd-client",
            "ca_key": "ca.crt",
            "cert_key": "tls.crt",
            "key_key": "tls.key",
        },
        None,
        TLS_FLAGS,
    ),
    "plain-server-tls": (
        {"namespace": "etcd", "tls_secret": "etcd-ca", "ca_key": "ca.crt", "cert_key": None, "key_key": None},
        None,
        ["--cacert", CA_FILE],
    ),
    "plain-http": ({"namespace": "etcd"}, ["http://etcd.etcd.svc:2379"], []),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_a_valid_job(variant: str) -> None:
    kubernetes, endpoints, tls_flags = VARIANTS[variant]
    configured = cluster(kubernetes, endpoints=endpoints)
    job = build_job(configured, image="registry.example/ead:1.2.3", trigger=TRIGGER)
    validate(job)
    assert job["metadata"]["name"] == "etcd-autodefrag-tenant-a"
    assert job["metadata"]["namespace"] == kubernetes["namespace"]
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["activeDeadlineSeconds"] == 1800 + 120
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    c = container(job)
    assert c["image"] == "registry.example/ead:1.2.3"
    assert c["command"] == ["etcd-autodefrag"]
    # The cluster as data (exporter/core/handoff.py): the Job reads no config file.
    run = [
        "defrag",
        "--cluster-json",
        cluster_json(configured),
        "--log-format",
        "text",
        "--log-level",
        "INFO",
    ]
    assert c["args"] == [*run, "--output", "json", "--report-file", "/dev/termination-log", *tls_flags]
    assert cluster_from_json(c["args"][2]) == configured
    assert "env" not in c
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert mounts(job)["/tmp"] == "tmp"
    assert not [v for v in pod["volumes"] if "configMap" in v]
    assert "emptyDir" in volumes(job)["tmp"]
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "etcd-autodefrag"
    assert labels["app.kubernetes.io/component"] == "defrag"
    assert labels["etcd-autodefrag.io/cluster"] == "tenant-a"
    assert labels["etcd-autodefrag.io/alertname"] == "EtcdDefragRecommended"
    assert job["spec"]["template"]["metadata"]["labels"] == labels  # the pods are ours too


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "kubeadm"])
def test_non_kubeadm_variants_meet_the_restricted_pod_security_standard(variant: str) -> None:
    kubernetes, endpoints, _ = VARIANTS[variant]
    job = build_job(cluster(kubernetes, endpoints=endpoints), image="i:1", trigger=TRIGGER)
    pod = pod_spec(job)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert not {"hostNetwork", "hostPID", "hostIPC", "nodeSelector", "tolerations"} & set(pod)
    assert not any("hostPath" in v for v in pod["volumes"])


CLIENT_ITEMS = [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]


@pytest.mark.parametrize(
    ("layout", "sources"),
    [
        (
            "self-signed",
            [
                {"secret": {"name": "kamaji-etcd-certs", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"secret": {"name": "kamaji-etcd-root-client-certs", "items": CLIENT_ITEMS}},
            ],
        ),
        (
            "cert-manager",
            [
                {
                    "secret": {
                        "name": "kamaji-etcd-client-certs",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}, *CLIENT_ITEMS],
                    }
                }
            ],
        ),
    ],
)
def test_kamaji_mounts_its_layouts_secrets_under_fixed_names(layout: str, sources: list[Any]) -> None:
    job = build_job(cluster({**VARIANTS["kamaji"][0], "secret_layout": layout}), image="i:1", trigger=TRIGGER)
    assert mounts(job)["/etc/etcd-autodefrag/tls"] == "tls"
    projected = volumes(job)["tls"]["projected"]
    assert projected["defaultMode"] == 0o440
    assert projected["sources"] == sources
    assert container(job)["args"][-6:] == TLS_FLAGS


def test_kamaji_job_waits_for_the_layout_to_be_read() -> None:
    """`secret_layout: auto` names no Secret until the service has read the StatefulSet."""
    target = {**VARIANTS["kamaji"][0], "secret_layout": "auto"}
    with pytest.raises(JobConfigError, match=r"certificate layout has not been read .*secret_layout: auto"):
        build_job(cluster(target), image="i:1", trigger=TRIGGER)


def test_talos_maps_its_keys_to_the_fixed_file_names() -> None:
    job = build_job(cluster(VARIANTS["talos"][0]), image="i:1", trigger=TRIGGER)
    assert volumes(job)["tls"]["secret"] == {
        "secretName": "talos-etcd",
        "items": [
            {"key": "ca", "path": "ca.crt"},
            {"key": "crt", "path": "tls.crt"},
            {"key": "key", "path": "tls.key"},
        ],
        "defaultMode": 0o440,
    }


def test_kubeadm_runs_as_root_without_capabilities_on_a_control_plane_node() -> None:
    job = build_job(cluster(VARIANTS["kubeadm"][0]), image="i:1", trigger=TRIGGER)
    pod = pod_spec(job)
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container(job)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container(job)["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert pod["tolerations"] == [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    ]
    host_paths = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v}
    # The three files, one by one: never the directory that also holds the CA key.
    assert host_paths == {
        "/etc/kubernetes/pki/etcd/ca.crt": "File",
        "/etc/kubernetes/pki/etcd/healthcheck-client.crt": "File",
        "/etc/kubernetes/pki/etcd/healthcheck-client.key": "File",
    }
    assert {CA_FILE, CERT_FILE, KEY_FILE} <= set(mounts(job))
    assert all(m.get("readOnly") for m in container(job)["volumeMounts"] if m["name"].startswith("etcd-"))


def test_cluster_settings_reach_the_job() -> None:
    kubernetes = {
        **VARIANTS["talos"][0],
        "image": "mirror.example/ead:pinned",
        "cooldown_seconds": 600,
        "active_deadline_seconds": 4000,
        "service_account": "etcd-defrag",
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "labels": {"team": "platform"},
        "annotations": {"sidecar.istio.io/inject": "false"},
    }
    job = build_job(cluster(kubernetes), image="default:1", trigger=TRIGGER, cooldown_seconds=99)
    validate(job)
    assert container(job)["image"] == "mirror.example/ead:pinned"
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["activeDeadlineSeconds"] == 4000
    assert pod_spec(job)["serviceAccountName"] == "etcd-defrag"
    assert pod_spec(job)["automountServiceAccountToken"] is False  # a service account, still no token
    assert container(job)["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert job["metadata"]["labels"]["team"] == "platform"
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_service_wide_defaults_apply_when_the_cluster_sets_none() -> None:
    job = build_job(
        cluster(VARIANTS["talos"][0], deadline_seconds=600),
        image="default:1",
        trigger=TRIGGER,
        cooldown_seconds=900,
    )
    assert container(job)["image"] == "default:1"
    assert job["spec"]["ttlSecondsAfterFinished"] == 900
    assert job["spec"]["activeDeadlineSeconds"] == 720


def test_trigger_is_recorded_in_annotations() -> None:
    job = build_job(cluster(VARIANTS["talos"][0]), image="i:1", trigger=TRIGGER)
    assert job["metadata"]["annotations"] == {
        "etcd-autodefrag.io/alertname": "EtcdDefragRecommended",
        "etcd-autodefrag.io/group-key": '{}:{etcd_cluster="a"}',
        "etcd-autodefrag.io/fingerprint": "5c1b3a9e0d2f4e61",
        "etcd-autodefrag.io/receiver": "etcd-autodefrag",
        "etcd-autodefrag.io/fired-at": "2026-11-22T07:00:00+00:00",
    }
    assert job["metadata"]["labels"]["etcd-autodefrag.io/dry-run"] == "false"


def test_a_dry_run_trigger_runs_the_engine_in_dry_run() -> None:
    trigger = Trigger(alertname="EtcdDefragRecommended", dry_run=True)
    job = build_job(cluster(VARIANTS["talos"][0]), image="i:1", trigger=trigger)
    assert "--dry-run" in container(job)["args"]
    assert job["metadata"]["labels"]["etcd-autodefrag.io/dry-run"] == "true"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("EtcdDefragRecommended", "EtcdDefragRecommended"),
        ("Etcd Defrag Recommended", "Etcd-Defrag-Recommended"),
        ("etcd/defrag\\now", "etcd-defrag-now"),
        ("$(rm -rf /)", "rm-rf"),
        ("`reboot`; echo pwned", "reboot-echo-pwned"),
        ("Ärger über Größe", "Arger-uber-Groe"),
        ("🔥🔥🔥", "unknown"),
        ("", "unknown"),
        ("---...___", "unknown"),
        ("a" * 100, "a" * 63),
        ("a" * 62 + "-b", "a" * 62),
        ("x.y_z-1", "x.y_z-1"),
    ],
)
def test_label_values_are_sanitized(text: str, expected: str) -> None:
    assert sanitize_label_value(text) == expected


HOSTILE = [
    "$(rm -rf /)",
    "--namespace=kube-system --image=evil:latest",
    "a" * 100,
    "line\nbreak\r\n\x00nul",
    "ünïcödé ☃ 雪",
    "/../../etc/passwd",
    '"; kubectl delete ns default; "',
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_alert_text_never_shapes_the_job(text: str) -> None:
    benign = build_job(cluster(VARIANTS["kamaji"][0]), image="i:1", trigger=Trigger(alertname="ok"))
    trigger = Trigger(alertname=text, group_key=text, fingerprint=text, receiver=text)
    job = build_job(cluster(VARIANTS["kamaji"][0]), image="i:1", trigger=trigger)
    validate(job)
    assert LABEL_VALUE.match(job["metadata"]["labels"]["etcd-autodefrag.io/alertname"])
    assert len(job["metadata"]["labels"]["etcd-autodefrag.io/alertname"]) <= 63
    assert job["metadata"]["annotations"]["etcd-autodefrag.io/alertname"] == text
    # Namespace, image, command, volumes: identical to a benign trigger's Job.
    assert job["metadata"]["namespace"] == benign["metadata"]["namespace"]
    assert pod_spec(job) == pod_spec(benign)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_becomes_a_valid_label_value(text: str) -> None:
    value = sanitize_label_value(text)
    assert LABEL_VALUE.match(value)
    assert 0 < len(value) <= 63


def test_long_trigger_text_is_capped_in_annotations() -> None:
    trigger = Trigger(alertname="x" * 5000, group_key="g" * 5000)
    job = build_job(cluster(VARIANTS["talos"][0]), image="i:1", trigger=trigger)
    annotations = job["metadata"]["annotations"]
    assert len(annotations["etcd-autodefrag.io/alertname"]) == 1024
    assert len(annotations["etcd-autodefrag.io/group-key"]) == 1024
    assert "etcd-autodefrag.io/fired-at" not in annotations


@pytest.mark.parametrize(
    ("kubernetes", "endpoints", "message"),
    [
        (None, None, "no kubernetes section"),
        ({"namespace": "etcd"}, None, "kubernetes.tls_secret is required"),
        ({"namespace": "etcd", "tls_secret": "s"}, ["http://10.0.0.1:2379"], "is plain http"),
        (
            {"namespace": "e", "variant": "kubeadm"},
            ["http://127.0.0.1:2379"],
            "variant kubeadm mounts client TLS",
        ),
        ({"namespace": "e", "tls_secret": "s", "active_deadline_seconds": 1800}, None, "must exceed"),
    ],
)
def test_unusable_targets_are_refused_naming_the_field(
    kubernetes: dict[str, Any] | None, endpoints: list[str] | None, message: str
) -> None:
    data = {"name": "tenant-a", "endpoints": endpoints or ["https://10.0.0.1:2379"], "kubernetes": kubernetes}
    if kubernetes is not None:
        # Refused when the configuration is loaded, long before any alert arrives...
        with pytest.raises(ValidationError, match=message):
            ClusterConfig.model_validate(data)
    # ...and by build_job itself, for a config that skipped validation.
    target = KubernetesTarget.model_validate(kubernetes) if kubernetes is not None else None
    unchecked = ClusterConfig.model_construct(**{**data, "kubernetes": target})
    with pytest.raises(JobConfigError, match=message):
        build_job(unchecked, image="i:1", trigger=TRIGGER)


@pytest.mark.parametrize(
    ("kubernetes", "message"),
    [
        ("{namespace: Etcd}", "clusters[0].kubernetes.namespace: must be a DNS label"),
        ("{namespace: e, variant: kamaji}", "variant kamaji needs etcd_name"),
        ("{namespace: e, variant: talos, etcd_name: x}", "etcd_name is only used by variant kamaji"),
        (
            "{namespace: e, variant: kubeadm, tls_secret: s}",
            "tls_secret is only used by variants talos and plain",
        ),
        ("{namespace: e, variant: k3s}", "clusters[0].kubernetes.variant"),
        ("{namespace: e, cert_key: null}", "cert_key and key_key must both be set"),
        ("{namespace: e, resources: {requests: {cpu: lots}}}", "'lots' is not a quantity"),
        ("{namespace: e, resources: {limit: {cpu: '1'}}}", "only requests and limits"),
        ("{namespace: e, labels: {app.kubernetes.io/name: x}}", "is set by etcd-autodefrag itself"),
        ("{namespace: e, labels: {team: 'a b'}}", "is not a label value"),
        ("{namespace: e, annotations: {'bad key!': x}}", "is not a label or annotation key"),
        ("{namespace: e, cooldown_seconds: -1}", "clusters[0].kubernetes.cooldown_seconds"),
        ("{namespace: e, nmespace: x}", "clusters[0].kubernetes.nmespace: unknown setting"),
        (
            "{namespace: e, variant: kamaji, etcd_name: x, secret_layout: vault}",
            "clusters[0].kubernetes.secret_layout: Input should be 'auto', 'self-signed' or 'cert-manager'",
        ),
        (
            "{namespace: e, variant: kamaji, etcd_name: x, cluster_domain: Cluster_Local}",
            "cluster_domain: must be a DNS domain like cluster.local",
        ),
        ("{namespace: e, variant: kamaji, etcd_name: x, client_port: 0}", "kubernetes.client_port"),
        ("{namespace: e, variant: kamaji, etcd_name: x, client_port: 65536}", "kubernetes.client_port"),
        (
            "{namespace: e, variant: kubeadm, cluster_domain: k.local, client_port: 2389}",
            "cluster_domain, client_port: only used by variant kamaji, not kubeadm",
        ),
        (
            "{namespace: e, tls_secret: s, secret_layout: cert-manager}",
            "secret_layout: only used by variant kamaji, not plain",
        ),
    ],
)
def test_settings_errors_name_the_field(tmp_path: Path, kubernetes: str, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"clusters:\n  - name: a\n    endpoints: [https://10.0.0.1:2379]\n    kubernetes: {kubernetes}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert message in str(error.value)


def test_job_name_is_the_lock_name() -> None:
    assert job_name("tenant-a") == "etcd-autodefrag-tenant-a"
    longest = "a" * 40  # the longest cluster name settings allow
    assert len(job_name(longest)) <= 63
    with pytest.raises(ValueError, match="cannot name a Job"):
        job_name("Tenant A")


# --- the report as a termination message ----------------------------------------------------------


def big_report(members: int, name_length: int = 40) -> RunReport:
    return RunReport(
        cluster="tenant-a",
        result=RunResult.FAILED,
        reason="defragmentation failed on " + ", ".join(f"m{i}" for i in range(members)),
        started_at="2026-11-22T07:00:00+00:00",
        duration_seconds=12.5,
        members=[
            MemberReport(
                name=f"member-{i}-" + "x" * name_length,
                id=f"{i:x}",
                endpoint=f"https://member-{i}.etcd.svc.cluster.local:2379",
                leader=i == members - 1,
                outcome=MemberOutcome.DEFRAGMENTED if i % 2 else MemberOutcome.FAILED,
                reason="context deadline exceeded " * 5,
                size_before_bytes=2_000_000_000,
                size_after_bytes=1_000_000_000,
                reclaimed_bytes=1_000_000_000 if i % 2 else 0,
            )
            for i in range(members)
        ],
    )


def test_a_small_report_is_the_full_report() -> None:
    report = big_report(3, name_length=1)
    report.members[0].reason = ""
    assert len(report.to_json()) < 4096
    assert report.summary_json() == report.to_json()
    assert parse_termination_message(report.summary_json()) == json.loads(report.to_json())


@pytest.mark.parametrize(("members", "name_length"), [(9, 40), (60, 40), (500, 200)])
def test_a_large_report_becomes_a_summary_that_fits(members: int, name_length: int) -> None:
    report = big_report(members, name_length)
    assert len(report.to_json()) > 4096
    text = report.summary_json(max_bytes=4096)
    assert len(text.encode()) <= 4096
    summary = parse_termination_message(text)
    assert summary is not None
    assert summary["summary"] is True
    assert summary["result"] == "failed"
    assert summary["exit_code"] == 1
    assert summary["reclaimed_bytes"] == report.reclaimed_bytes
    shown = summary["members"]
    assert len(shown) + summary.get("members_omitted", 0) == members
    assert shown[0] == {"name": report.members[0].name, "outcome": "failed", "reclaimed_bytes": 0}


@pytest.mark.parametrize("text", [None, "", "  \n", "not json", "[1, 2]", '"a string"', '{"cut": "at 40'])
def test_unusable_termination_messages_are_none(text: str | None) -> None:
    assert parse_termination_message(text) is None


# --- what an existing Job means, how a Job ended --------------------------------------------------

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def api_job(*, conditions: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    """A Job as the API server returns it (built by us, then defaulted and given a status)."""
    job = build_job(cluster(VARIANTS["talos"][0]), image="i:1", trigger=TRIGGER)
    job["metadata"].update(uid="7d6f1c1e-job", creationTimestamp="2026-11-22T07:00:00Z", resourceVersion="1")
    job["status"] = {**status, **({"conditions": conditions} if conditions else {})}
    return job


def condition(kind: str, at: str = "2026-11-22T07:10:00Z", reason: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "lastTransitionTime": at, "lastProbeTime": at, "reason": reason}


@pytest.mark.parametrize(
    ("job", "outcome", "reason"),
    [
        (
            api_job(),
            LaunchOutcome.ALREADY_RUNNING,
            "already running: Job etcd-autodefrag-tenant-a (created 2026",
        ),
        (
            api_job(active=1, startTime="2026-11-22T07:00:05Z"),
            LaunchOutcome.ALREADY_RUNNING,
            "(started 2026-11-22T07:00:05Z)",
        ),
        (
            api_job(conditions=[condition("SuccessCriteriaMet"), condition("Complete")], succeeded=1),
            LaunchOutcome.COOLING_DOWN,
            "cooling down: Job etcd-autodefrag-tenant-a succeeded at 2026-11-22T07:10:00Z; "
            "Kubernetes removes it at 2026-11-22T08:10:00Z",
        ),
        (
            api_job(conditions=[condition("FailureTarget"), condition("Failed")], failed=1),
            LaunchOutcome.COOLING_DOWN,
            "failed at 2026-11-22T07:10:00Z",
        ),
        # FailureTarget alone: pods are still terminating, the Job has not ended yet.
        (
            api_job(conditions=[condition("FailureTarget")], active=1),
            LaunchOutcome.ALREADY_RUNNING,
            "already",
        ),
    ],
)
def test_why_a_create_found_a_job(job: dict[str, Any], outcome: LaunchOutcome, reason: str) -> None:
    result = existing_job_launch(job)
    assert not result.created
    assert result.job_name == "etcd-autodefrag-tenant-a"
    assert result.outcome is outcome
    assert reason in result.reason


def test_a_finished_job_without_ttl_needs_a_person() -> None:
    job = api_job(conditions=[condition("Complete")])
    del job["spec"]["ttlSecondsAfterFinished"]
    assert "delete it to allow the next run" in existing_job_launch(job).reason


def test_a_job_being_deleted_is_the_end_of_a_cooldown() -> None:
    job = api_job(conditions=[condition("Complete")])
    job["metadata"]["deletionTimestamp"] = "2026-11-22T08:10:00Z"
    assert existing_job_launch(job).outcome is LaunchOutcome.COOLING_DOWN


def test_a_job_we_did_not_create_blocks_with_its_own_reason() -> None:
    job = {
        "metadata": {"name": "etcd-autodefrag-tenant-a", "labels": {"app": "something-else"}},
        "status": {},
    }
    result = existing_job_launch(job)
    assert result.outcome is LaunchOutcome.NAME_TAKEN
    assert "did not create it" in result.reason


def pod(owner_uid: str, message: str | None, finished_at: str = "2026-11-22T07:09:59Z") -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0, "reason": "Completed", "finishedAt": finished_at}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": "p", "ownerReferences": [{"kind": "Job", "uid": owner_uid, "controller": True}]},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [{"name": "defrag", "state": {"terminated": terminated}}],
        },
    }


def test_a_finished_job_yields_its_report() -> None:
    report = big_report(3, name_length=1)
    job = api_job(conditions=[condition("Complete")], startTime="2026-11-22T07:00:05Z", succeeded=1)
    stale = pod("an-earlier-job-of-the-same-name", '{"result": "stale"}', finished_at="2026-11-22T09:00:00Z")
    outcome = job_outcome(job, [stale, pod("7d6f1c1e-job", report.summary_json())])
    assert outcome is not None
    assert outcome.cluster == "tenant-a"
    assert outcome.job_name == "etcd-autodefrag-tenant-a"
    assert outcome.namespace == "etcd"
    assert outcome.uid == "7d6f1c1e-job"
    assert outcome.succeeded
    assert outcome.report == json.loads(report.to_json())
    assert outcome.started_at == datetime(2026, 11, 22, 7, 0, 5, tzinfo=UTC)
    assert outcome.finished_at == datetime(2026, 11, 22, 7, 10, tzinfo=UTC)


def test_a_failed_job_without_a_message_has_no_report() -> None:
    job = api_job(conditions=[condition("Failed", reason="DeadlineExceeded")])
    outcome = job_outcome(job, [pod("7d6f1c1e-job", None)])
    assert outcome is not None
    assert not outcome.succeeded
    assert outcome.report is None
    assert outcome.reason == "DeadlineExceeded"
    assert job_outcome(job, []) is not None  # pods already gone: still an outcome


def test_a_running_job_has_no_outcome() -> None:
    assert job_outcome(api_job(active=1), [pod("7d6f1c1e-job", None)]) is None


def test_event_about_a_job_is_a_valid_event() -> None:
    job = api_job()
    event = build_event(
        job, reason="DefragLaunched", message="m" * 2000, type="Normal", now=NOW, reporting_instance="ead-0"
    )
    validate(event)
    assert event["involvedObject"] == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "etcd-autodefrag-tenant-a",
        "namespace": "etcd",
        "uid": "7d6f1c1e-job",
    }
    assert event["metadata"] == {"generateName": "etcd-autodefrag-tenant-a.", "namespace": "etcd"}
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-11-22T08:00:00Z"
    assert len(event["message"]) == 1024


# --- discovery --------------------------------------------------------------------------------------


def kubeadm_pod(node: str, ip: str, command: list[str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"etcd-{node}",
            "namespace": "kube-system",
            "labels": {"component": "etcd", "tier": "control-plane"},
            "annotations": {"kubeadm.kubernetes.io/etcd.advertise-client-urls": f"https://{ip}:2379"},
        },
        "spec": {"nodeName": node, "hostNetwork": True, "containers": [{"name": "etcd", "command": command}]},
        "status": {"phase": "Running", "hostIP": ip, "podIP": ip},
    }


def test_kubeadm_endpoints_from_static_pods() -> None:
    pod_list = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1"},
        "items": [
            kubeadm_pod("cp-2", "10.0.0.12", ["etcd", "--advertise-client-urls", "https://10.0.0.12:2379"]),
            kubeadm_pod(
                "cp-1",
                "10.0.0.11",
                [
                    "etcd",
                    "--advertise-client-urls=https://10.0.0.11:2379",
                    "--cert-file=/etc/kubernetes/pki/etcd/server.crt",
                    "--listen-client-urls=https://127.0.0.1:2379,https://10.0.0.11:2379",
                ],
            ),
            kubeadm_pod("cp-3", "10.0.0.13", ["etcd", "--data-dir=/var/lib/etcd"]),  # no flag: the host IP
            kubeadm_pod("cp-6", "fd00::16", ["etcd"]),
            {**kubeadm_pod("x", "10.9.9.9", ["kube-apiserver"]), "metadata": {"name": "kube-apiserver-x"}},
        ],
    }
    assert kubeadm_endpoints(pod_list) == [
        "https://10.0.0.11:2379",
        "https://10.0.0.12:2379",
        "https://10.0.0.13:2379",
        "https://[fd00::16]:2379",
    ]
    assert kubeadm_endpoints({"items": []}) == []


def test_the_pure_module_does_no_io() -> None:
    tree = ast.parse(Path(exporter.kubernetes.jobs.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    io_modules = {
        "aiohttp",
        "asyncio",
        "kubernetes_asyncio",
        "os",
        "socket",
        "subprocess",
        "pathlib",
        "io",
        "time",
    }
    assert not imported & io_modules


def test_times_are_kubernetes_style() -> None:
    job = api_job(conditions=[condition("Complete", at="2026-11-22T07:10:00+02:00")])
    # The removal time is shown in UTC whatever offset the API server used.
    assert "removes it at 2026-11-22T06:10:00Z" in existing_job_launch(job).reason
    assert timedelta(hours=1).total_seconds() == job["spec"]["ttlSecondsAfterFinished"]
