"""`render cronjob` and `render job`: defrag.sh's flags, schema-valid objects, args that really run,
the Job the webhook creates, and `--apply` against the fake Kubernetes API."""

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_harness import EtcdCluster
from fake_kube import FakeKube, Recorded
from kubernetes_asyncio.client import ApiClient
from test_jobs import validate

from exporter.cli.main import main
from exporter.cli.parser import build_parser
from exporter.config.settings import load_settings
from exporter.core.launches import Trigger
from exporter.kubernetes import api as kube
from exporter.kubernetes.cronjob import RenderError, check_schedule
from exporter.kubernetes.jobs import CA_FILE, CERT_FILE, DEFAULT_IMAGE, KEY_FILE, TERMINATION_LOG
from exporter.kubernetes.kamaji import SecretLayout
from exporter.launch import kubernetes as executors

# kamaji-etcd's scripts/defrag.sh with no flags: its CronJob's name, namespace, schedule and endpoints.
DEFRAG_SH_NAME = "kamaji-etcd-defrag-job"
DEFRAG_SH_NAMESPACE = "kamaji-system"
DEFRAG_SH_SCHEDULE = "0 0 * * *"
DEFRAG_SH_ENDPOINTS = ",".join(
    f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(3)
)
# What defrag.sh applies (its heredoc with the defaults filled in), as found in a cluster to migrate.
DEFRAG_SH_CRONJOB = {
    "apiVersion": "batch/v1",
    "kind": "CronJob",
    "metadata": {"name": DEFRAG_SH_NAME, "namespace": DEFRAG_SH_NAMESPACE},
    "spec": {
        "schedule": DEFRAG_SH_SCHEDULE,
        "jobTemplate": {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "etcd-defrag",
                                "image": "ghcr.io/ahrtr/etcd-defrag:v0.15.0",
                                "args": [
                                    f"--endpoints={DEFRAG_SH_ENDPOINTS}",
                                    "--cacert=/opt/certs/ca/ca.crt",
                                    "--cert=/opt/certs/root-client-certs/tls.crt",
                                    "--key=/opt/certs/root-client-certs/tls.key",
                                    "--cluster",
                                    "--defrag-rule",
                                    "dbQuotaUsage > 0.8 || dbSize - dbSizeInUse > 200*1024*1024",
                                ],
                                "volumeMounts": [
                                    {
                                        "mountPath": "/opt/certs/root-client-certs",
                                        "name": "root-client-certs",
                                    },
                                    {"mountPath": "/opt/certs/ca", "name": "certs"},
                                ],
                            }
                        ],
                        "restartPolicy": "OnFailure",
                        "securityContext": {"runAsUser": 0},
                        "volumes": [
                            {
                                "name": "root-client-certs",
                                "secret": {"secretName": "kamaji-etcd-root-client-certs"},
                            },
                            {"name": "certs", "secret": {"secretName": "kamaji-etcd-certs"}},
                        ],
                    }
                }
            }
        },
    },
}
TLS_FLAGS = ["--cacert", CA_FILE, "--cert", CERT_FILE, "--key", KEY_FILE]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def render(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(argv, capsys)
    assert code == 0, err
    manifest: dict[str, Any] = yaml.safe_load(out)
    return manifest


def cronjob(*flags: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return render(["render", "cronjob", *flags], capsys)


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if manifest["kind"] == "CronJob" else spec["template"]
    pod: dict[str, Any] = template["spec"]
    return pod


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(manifest)["containers"]
    found: dict[str, Any] = only
    return found


def flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def secret_names(manifest: dict[str, Any]) -> list[str]:
    names = []
    for volume in pod_spec(manifest)["volumes"]:
        if "secret" in volume:
            names.append(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            names.append(source["secret"]["name"])
    return names


# --- defaults and flags ------------------------------------------------------------------------------


def test_defaults_are_defrag_sh_s(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = cronjob(capsys=capsys)
    args = container(manifest)["args"]
    assert manifest["kind"] == "CronJob"
    assert manifest["metadata"]["name"] == DEFRAG_SH_NAME
    assert manifest["metadata"]["namespace"] == DEFRAG_SH_NAMESPACE
    assert manifest["spec"]["schedule"] == DEFRAG_SH_SCHEDULE
    assert manifest["spec"]["concurrencyPolicy"] == "Forbid"
    assert flag_value(args, "--endpoints") == DEFRAG_SH_ENDPOINTS
    assert secret_names(manifest) == ["kamaji-etcd-certs", "kamaji-etcd-root-client-certs"]
    assert args[0] == "defrag"
    assert args[-6:] == TLS_FLAGS
    assert "--rule" not in args  # the engine's default thresholds
    assert container(manifest)["image"] == DEFAULT_IMAGE


FLAG_CASES = [
    (["-e", "tenant-etcd"], lambda m: m["metadata"]["name"], "tenant-etcd-defrag-job"),
    (
        ["-e", "tenant-etcd"],
        secret_names,
        ["tenant-etcd-certs", "tenant-etcd-root-client-certs"],
    ),
    (
        ["-e", "tenant-etcd", "-s", "tenant-svc", "-n", "tenants"],
        lambda m: flag_value(container(m)["args"], "--endpoints"),
        ",".join(f"https://tenant-etcd-{i}.tenant-svc.tenants.svc.cluster.local:2379" for i in range(3)),
    ),
    (["-n", "tenants"], lambda m: m["metadata"]["namespace"], "tenants"),
    (["-j", "14 9 * * 1-5"], lambda m: m["spec"]["schedule"], "14 9 * * 1-5"),
    (["--replicas", "5"], lambda m: flag_value(container(m)["args"], "--endpoints").count(","), 4),
    # Kamaji's default install (cert-manager): one Secret holds the CA and the client certificate.
    (["--secret-layout", "cert-manager"], secret_names, ["kamaji-etcd-client-certs"]),
    (
        ["--secret-layout", "self-signed"],
        secret_names,
        ["kamaji-etcd-certs", "kamaji-etcd-root-client-certs"],
    ),
    (
        ["--replicas", "1", "--client-port", "2389"],
        lambda m: flag_value(container(m)["args"], "--endpoints"),
        "https://kamaji-etcd-0.kamaji-etcd.kamaji-system.svc.cluster.local:2389",
    ),
    (
        ["--replicas", "1", "--cluster-domain", "k8s.example.org"],
        lambda m: flag_value(container(m)["args"], "--endpoints"),
        "https://kamaji-etcd-0.kamaji-etcd.kamaji-system.svc.k8s.example.org:2379",
    ),
    (
        ["--endpoints", "https://10.0.0.1:2379, https://10.0.0.2:2379"],
        lambda m: flag_value(container(m)["args"], "--endpoints"),
        "https://10.0.0.1:2379,https://10.0.0.2:2379",
    ),
    (["--rule", "dbSizeFree > 1"], lambda m: flag_value(container(m)["args"], "--rule"), "dbSizeFree > 1"),
    (["--image", "registry.example/ea:1"], lambda m: container(m)["image"], "registry.example/ea:1"),
    (["--name", "nightly-defrag"], lambda m: m["metadata"]["name"], "nightly-defrag"),
    (
        ["--variant", "talos", "--secret", "etcd-defrag-talosconfig", "--endpoints", "https://10.0.0.1:2379"],
        lambda m: (m["metadata"]["namespace"], m["metadata"]["name"], pod_spec(m)["volumes"][-1]["secret"]),
        (
            "kube-system",
            "etcd-defrag",
            {
                "secretName": "etcd-defrag-talosconfig",
                "items": [
                    {"key": "ca", "path": "ca.crt"},
                    {"key": "crt", "path": "tls.crt"},
                    {"key": "key", "path": "tls.key"},
                ],
                "defaultMode": 0o440,
            },
        ),
    ),
    (
        ["--variant", "talos", "--secret", "s", "--endpoints", "https://10.0.0.1:2379", "-n", "etcd"],
        lambda m: (m["metadata"]["namespace"], container(m)["args"][-6:]),
        ("etcd", TLS_FLAGS),
    ),
]


@pytest.mark.parametrize(("flags", "get", "expected"), FLAG_CASES)
def test_every_flag(flags: list[str], get: Any, expected: Any, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = cronjob(*flags, capsys=capsys)
    assert get(manifest) == expected
    validate(manifest)


BAD_FLAGS = [
    (["-j", "0 0 * *"], "-j: '0 0 * *' is not a cron schedule"),
    (["-j", "61 * * * *"], "-j: '61 * * * *': minute '61': 61 is outside 0-59"),
    (["-j", "0 0 * * 1-9"], "day of week '1-9': 9 is outside 0-6"),
    (["-j", "@every 1h"], "-j: '@every 1h': unknown macro"),
    (["-j", "CRON_TZ=UTC 0 0 * * *"], "-j: a time zone in the schedule is refused"),
    (["-e", "Kamaji_Etcd"], "-e: 'Kamaji_Etcd' must be a DNS label"),
    (["-e", "a" * 45], "--name: '" + "a" * 45 + "-defrag-job' (derived from -e: give a shorter --name)"),
    (["-s", "etcd.svc"], "-s: 'etcd.svc' must be a DNS label"),
    (["-n", "Kamaji"], "-n: must be a DNS label"),
    (["--name", "Nightly"], "--name: 'Nightly' cannot name a CronJob"),
    (["--replicas", "0"], "--replicas: must be at least 1"),
    (["--client-port", "70000"], "--client-port: must be from 1 to 65535; got 70000"),
    (["--secret-layout", "vault"], "argument --secret-layout: invalid choice: 'vault'"),
    (["--endpoints", "https://10.0.0.1:2379", "--client-port", "2389"], "--endpoints replaces --client-port"),
    (
        [
            "--variant",
            "talos",
            "--secret",
            "s",
            "--endpoints",
            "https://10.0.0.1:2379",
            "--secret-layout",
            "auto",
        ],
        "--secret-layout: only for --variant kamaji",
    ),
    (["--replicas", "three"], "argument --replicas: invalid int value: 'three'"),
    (["--cluster-domain", "cluster_local"], "--cluster-domain: 'cluster_local' is not a DNS domain"),
    (["--rule", "dbSize >> 3"], "--rule: invalid defrag rule at column 8"),
    (["--endpoints", "http://10.0.0.1:2379"], "--endpoints: variant kamaji mounts client TLS"),
    (["--endpoints", "https://a:2379", "-s", "x"], "--endpoints replaces -s"),
    (["--endpoints", ","], "--endpoints: no URL in ','; give client URLs like https://"),
    (["--endpoints", ""], "--endpoints: no URL in ''"),
    (["--secret", "s"], "--secret is for --variant talos"),
    (["--variant", "plain"], "argument --variant: invalid choice: 'plain'"),
    (["--variant", "talos", "--endpoints", "https://10.0.0.1:2379"], "--secret: --variant talos needs"),
    (["--variant", "talos", "--secret", "s"], "--endpoints: --variant talos needs"),
    (
        ["--variant", "talos", "--secret", "s", "--endpoints", "https://10.0.0.1:2379", "-e", "x"],
        "-e: only for --variant kamaji",
    ),
    (
        ["--variant", "talos", "--secret", "s", "--endpoints", "https://10.0.0.1:2379", "--replicas", "3"],
        "--replicas: only for --variant kamaji",
    ),
    (["--variant", "talos", "--secret", "Bad", "--endpoints", "https://a:2379"], "--secret: must be"),
    (["--kubeconfig", "/etc/kubeconfig"], "--kubeconfig and --context go with --apply"),
    (["--apply", "--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig: /nonexistent/kubeconfig"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["render", "cronjob", *flags], capsys)
    assert (code, out) == (2, "")
    assert message in err


@pytest.mark.parametrize(
    "schedule",
    [
        "0 0 * * *",
        "*/15 * * * *",
        "0 2 * * 0",
        "0 2 */14 * *",
        "0 0 1,15 * mon-fri",
        "5 4 ? JAN-jun SUN",
        "@weekly",
    ],
)
def test_schedules_a_cronjob_accepts(schedule: str) -> None:
    check_schedule(schedule)


@pytest.mark.parametrize(
    "schedule",
    [
        "",
        "0 0 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "5-1 * * * *",
        "*/0 * * * *",
        "0 0 * * fri-mon",
        "x * * * *",
        "0 0 * * ²",
    ],
)
def test_schedules_a_cronjob_refuses(schedule: str) -> None:
    with pytest.raises(RenderError, match=r"^-j: "):
        check_schedule(schedule)


def test_debug_prints_every_derived_value_on_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEBUG", raising=False)
    quiet = run(["render", "cronjob", "-e", "tenant-etcd"], capsys)
    monkeypatch.setenv("DEBUG", "1")
    debug = run(["render", "cronjob", "-e", "tenant-etcd"], capsys)
    assert quiet[0] == debug[0] == 0
    assert quiet[1] == debug[1]  # the YAML does not change
    assert quiet[2] == ""
    lines = debug[2].splitlines()
    assert "render cronjob: etcd StatefulSet: tenant-etcd (-e)" in lines
    assert "render cronjob: namespace: kamaji-system (default)" in lines
    assert "render cronjob: schedule: 0 0 * * * (default)" in lines
    assert "render cronjob: members: 3 (default, as defrag.sh; --apply reads the StatefulSet)" in lines
    assert any(line.startswith("render cronjob: rule: dbSizeFree >= 104857600") for line in lines)
    assert any("concurrencyPolicy: Forbid" in line for line in lines)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--rule", "dbQuotaUsage > 0.8 || dbSize - dbSizeInUse > 200*1024*1024", "-j", "@daily"],
        ["--variant", "talos", "--secret", "etcd-defrag-talosconfig", "--endpoints", "https://10.0.0.1:2379"],
    ],
)
def test_cronjobs_are_schema_valid(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    manifest = cronjob(*flags, capsys=capsys)
    validate(manifest)
    # Not the service's own Jobs: its watch (component=defrag) must not count scheduled runs.
    labels = manifest["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "scheduled-defrag"
    assert pod_spec(manifest)["automountServiceAccountToken"] is False
    assert "config" not in {v["name"] for v in pod_spec(manifest)["volumes"]}


# --- the CronJob's command really runs ---------------------------------------------------------------


def local_command(manifest: dict[str, Any], cluster: EtcdCluster, report: Path) -> list[str]:
    """The container's command and args with the files where this host has them."""
    assert cluster.tls is not None
    where = {
        CA_FILE: str(cluster.tls.ca_file),
        CERT_FILE: str(cluster.tls.cert_file),
        KEY_FILE: str(cluster.tls.key_file),
        TERMINATION_LOG: str(report),
    }
    executable = shutil.which(container(manifest)["command"][0], path=str(Path(sys.executable).parent))
    assert executable is not None
    return [executable, *(where.get(arg, arg) for arg in container(manifest)["args"])]


@pytest.mark.etcd
@pytest.mark.parametrize(
    ("rule", "defragmented"),
    [(["--rule", "dbSizeFree > 0"], 3), ([], 0)],
    ids=["rule-matches", "default-rule"],
)
def test_the_cronjob_command_runs_the_engine(
    rule: list[str],
    defragmented: int,
    tls_etcd_cluster: EtcdCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = tls_etcd_cluster
    manifest = cronjob("--endpoints", cluster.endpoints[0], *rule, capsys=capsys)
    args = build_parser().parse_args(container(manifest)["args"])
    assert (args.command, args.endpoints, args.output) == ("defrag", cluster.endpoints[0], "text")
    assert (str(args.cacert), str(args.cert), str(args.key)) == (CA_FILE, CERT_FILE, KEY_FILE)
    assert str(args.report_file) == TERMINATION_LOG

    cluster.churn()
    report_file = tmp_path / "termination-log"
    # The cluster started this session: without --settle-seconds 0 the rollout gate defers the run.
    command = [*local_command(manifest, cluster, report_file), "--settle-seconds", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    assert len(report_file.read_bytes()) <= 4096
    outcomes = [m["outcome"] for m in report["members"]]
    assert len(outcomes) == 3  # the other two members came from the member list
    assert outcomes.count("defragmented") == defragmented
    assert done.stdout.count("defragmented") == defragmented
    if defragmented:
        assert report["result"] == "success"
        assert report["members"][-1]["leader"] is True  # leader last
    else:
        assert report["result"] == "nothing_to_do"
        assert set(outcomes) == {"skipped"}


# --- render job: the webhook's Job -------------------------------------------------------------------

JOB_CONFIG = {
    "executor": {"image": "registry.example/etcd-autodefrag:7", "cooldown_seconds": 900},
    "clusters": [
        {
            "name": "tenant-a",
            "endpoints": ["https://tenant-a-etcd-0.tenant-a-etcd.tenants.svc.cluster.local:2379"],
            "rule": "dbSizeFree > 200*1024*1024",
            "kubernetes": {"namespace": "tenants", "variant": "kamaji", "etcd_name": "tenant-a-etcd"},
        }
    ],
}


@pytest.mark.parametrize("dry_run", [False, True])
async def test_render_job_is_the_job_the_webhook_creates(
    dry_run: bool,
    fake_kube: FakeKube,
    kube_api: ApiClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(JOB_CONFIG))
    flags = ["--config", str(config), "--cluster", "tenant-a", "--alertname", "EtcdDefragRecommended"]
    flags += ["--secret-layout", "cert-manager"]  # what the service reads from the StatefulSet
    rendered = render(["render", "job", *flags, *(["--dry-run"] if dry_run else [])], capsys)
    validate(rendered)

    settings = load_settings(config)
    target = settings.cluster("tenant-a").kubernetes
    assert target is not None
    assert target.etcd_name is not None
    fake_kube.add_statefulset(target.namespace, target.etcd_name, replicas=3)  # the rollout gate reads it
    executor = executors.kubernetes_executor(settings, api_client=kube_api)
    await executor.start(lambda _outcome: None)
    try:
        trigger = Trigger(alertname="EtcdDefragRecommended", dry_run=dry_run)
        discovered = settings.cluster("tenant-a").with_secret_layout(SecretLayout.CERT_MANAGER)
        result = await executor.launch(discovered, trigger)
    finally:
        await executor.stop()
    assert result.created
    jobs_sent = [body for body in fake_kube.received if body.get("kind") == "Job"]
    assert jobs_sent == [rendered]
    assert rendered["metadata"]["name"] == "etcd-autodefrag-tenant-a"  # the lock's name
    assert container(rendered)["image"] == "registry.example/etcd-autodefrag:7"
    assert rendered["spec"]["ttlSecondsAfterFinished"] == 900
    assert ("--dry-run" in container(rendered)["args"]) is dry_run
    assert secret_names(rendered) == ["tenant-a-etcd-client-certs"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cluster", "nope"], "cluster 'nope' is not in the configuration (configured: tenant-a, plain)"),
        (["--cluster", "plain"], "cluster plain: no kubernetes section"),
        (
            ["--cluster", "tenant-a"],
            "cluster tenant-a reads kamaji-etcd's certificate layout from the Kubernetes API "
            "(kubernetes.secret_layout: auto): give it with --secret-layout self-signed or cert-manager",
        ),
        (
            ["--cluster", "plain", "--secret-layout", "cert-manager"],
            "--secret-layout: cluster plain does not",
        ),
    ],
)
def test_render_job_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    clusters = [*JOB_CONFIG["clusters"], {"name": "plain", "endpoints": ["http://127.0.0.1:2379"]}]
    config.write_text(yaml.safe_dump({**JOB_CONFIG, "clusters": clusters}))
    code, out, err = run(["render", "job", "--config", str(config), *flags], capsys)
    assert (code, out) == (2, "")
    assert message in err


# --- --apply against the fake Kubernetes API ------------------------------------------------------------


def kubeconfig(tmp_path: Path, server: str) -> Path:
    """A kubeconfig as a user has one: the CLI must load it, not a test-only host."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "alice", "user": {"token": "alice-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "alice"}}],
                "current-context": "fake",
            }
        )
    )
    return path


async def apply(
    fake: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str, str]:
    """`render cronjob --apply` in a thread (the CLI runs its own event loop; the fake serves on ours)."""
    argv = ["render", "cronjob", "--apply", "--kubeconfig", str(kubeconfig(tmp_path, fake.url)), *flags]
    return await asyncio.to_thread(run, argv, capsys)


def covered(request: Recorded, rules: list[dict[str, list[str]]]) -> bool:
    rbac = request.rbac()
    assert rbac is not None, request
    group, resource, verb = rbac
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


@pytest.mark.parametrize("layout", ["self-signed", "cert-manager"])
async def test_apply_follows_the_statefulsets_certificate_layout(
    layout: str, fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--apply reads the layout from the Secrets kamaji-etcd mounts; the CronJob's Pods can start."""
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", 3, layout=layout)
    code, _, err = await apply(fake_kube, tmp_path, capsys, "--replicas", "3")
    assert code == 0, err
    stored = fake_kube.cronjobs[("kamaji-system", "kamaji-etcd-defrag-job")]
    assert fake_kube.missing_secrets("kamaji-system", pod_spec(stored)) == []
    assert fake_kube.received == [cronjob("--replicas", "3", "--secret-layout", layout, capsys=capsys)]
    assert [r.rbac() for r in fake_kube.requests] == [
        ("apps", "statefulsets", "get"),
        ("batch", "cronjobs", "create"),
    ]


async def test_apply_asks_for_the_layout_the_statefulset_does_not_show(
    fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", 3, layout=None)
    code, out, err = await apply(fake_kube, tmp_path, capsys)
    assert (code, out) == (2, "")
    assert "--secret-layout: StatefulSet kamaji-system/kamaji-etcd mounts neither" in err
    assert fake_kube.cronjobs == {}


@pytest.mark.parametrize(("replicas", "members"), [(5, 5), (None, 1)])
async def test_apply_creates_with_the_statefulsets_replicas(
    replicas: int | None,
    members: int,
    fake_kube: FakeKube,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas)
    code, out, err = await apply(fake_kube, tmp_path, capsys)
    assert code == 0, err
    assert out == (
        f"created CronJob kamaji-system/kamaji-etcd-defrag-job (schedule '0 0 * * *', {members} endpoints)\n"
    )
    stored = fake_kube.cronjobs[("kamaji-system", "kamaji-etcd-defrag-job")]
    endpoints = flag_value(container(stored)["args"], "--endpoints")
    assert endpoints is not None
    assert endpoints.split(",") == [
        f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(members)
    ]
    # What --apply sends is exactly what the same flags print.
    assert fake_kube.received == [cronjob("--replicas", str(members), capsys=capsys)]  # self-signed both
    # The user's own credentials, and only the calls RENDER_APPLY_RBAC_RULES lists.
    assert {r.authorization for r in fake_kube.requests} == {"Bearer alice-token"}
    assert all(covered(r, kube.RENDER_APPLY_RBAC_RULES) for r in fake_kube.requests)
    assert [r.rbac() for r in fake_kube.requests] == [
        ("apps", "statefulsets", "get"),
        ("batch", "cronjobs", "create"),
    ]


async def test_apply_replaces_defrag_sh_s_cronjob(
    fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = fake_kube.add_cronjob(DEFRAG_SH_CRONJOB)
    flags = ("--replicas", "3", "--secret-layout", "self-signed", "-j", "30 2 * * *")
    code, out, err = await apply(fake_kube, tmp_path, capsys, *flags)
    assert code == 0, err
    assert out == (
        "replaced CronJob kamaji-system/kamaji-etcd-defrag-job (schedule '30 2 * * *', 3 endpoints); "
        "the old one ran ghcr.io/ahrtr/etcd-defrag:v0.15.0\n"
    )
    stored = fake_kube.cronjobs[("kamaji-system", "kamaji-etcd-defrag-job")]
    assert stored["metadata"]["uid"] == old["metadata"]["uid"]  # replaced in place, not deleted
    assert stored["metadata"]["generation"] == 2
    assert [c["image"] for c in pod_spec(stored)["containers"]] == [DEFAULT_IMAGE]
    assert pod_spec(stored)["restartPolicy"] == "Never"  # nothing of the old one survives
    assert stored["spec"]["schedule"] == "30 2 * * *"
    assert stored["spec"]["concurrencyPolicy"] == "Forbid"
    assert [r.rbac() for r in fake_kube.requests] == [
        ("batch", "cronjobs", "create"),
        ("batch", "cronjobs", "get"),
        ("batch", "cronjobs", "update"),
    ]


async def test_apply_retries_a_replace_that_lost_a_race(
    fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_kube.add_cronjob(DEFRAG_SH_CRONJOB)
    path = "PUT /apis/batch/v1/namespaces/kamaji-system/cronjobs/kamaji-etcd-defrag-job"
    fake_kube.fail_next(1, 409, reason="Conflict", message="the object has been modified", match=path)
    code, out, err = await apply(
        fake_kube, tmp_path, capsys, "--replicas", "3", "--secret-layout", "self-signed"
    )
    assert code == 0, err
    assert out.startswith("replaced CronJob kamaji-system/kamaji-etcd-defrag-job")
    assert [r.method for r in fake_kube.requests].count("PUT") == 2
    stored = fake_kube.cronjobs[("kamaji-system", "kamaji-etcd-defrag-job")]
    assert container(stored)["command"] == ["etcd-autodefrag"]


async def test_apply_forbidden_says_whose_permissions(
    fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = (
        'cronjobs.batch is forbidden: User "alice" cannot create resource "cronjobs" in API group '
        '"batch" in the namespace "kube-system"'
    )
    fake_kube.fail_next(1, 403, message=message, match="POST /apis/batch/v1/namespaces/kube-system/cronjobs")
    talos = [
        "--variant",
        "talos",
        "--secret",
        "etcd-defrag-talosconfig",
        "--endpoints",
        "https://10.0.0.1:2379",
    ]
    code, out, err = await apply(fake_kube, tmp_path, capsys, *talos)
    assert (code, out) == (1, "")
    assert f"Kubernetes API: 403 Forbidden: {message}" in err
    assert "--apply uses your own kubeconfig (not the service's Role)" in err
    assert "batch/cronjobs create,get,update" in err
    assert fake_kube.cronjobs == {}
    # Talos: members from --endpoints, so no StatefulSet is read.
    assert [r.rbac() for r in fake_kube.requests] == [("batch", "cronjobs", "create")]


async def test_apply_without_the_statefulset_names_the_flags(
    fake_kube: FakeKube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await apply(fake_kube, tmp_path, capsys, "-e", "tenant-etcd", "-n", "tenants")
    assert (code, out) == (2, "")
    assert "-e/-n: StatefulSet tenants/tenant-etcd not found" in err
    assert fake_kube.cronjobs == {}


async def test_apply_with_the_api_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # held but not listening: every connection is refused
        server = f"http://127.0.0.1:{bound.getsockname()[1]}"
        argv = ["render", "cronjob", "--apply", "--kubeconfig", str(kubeconfig(tmp_path, server))]
        code, out, err = await asyncio.to_thread(run, [*argv, "--replicas", "3"], capsys)
    assert (code, out) == (1, "")
    assert "render cronjob --apply: Kubernetes API unreachable" in err


def test_the_services_role_is_not_widened() -> None:
    # render --apply runs with the user's kubeconfig: the service's Role never gains CronJobs or updates.
    granted = {
        (g, r, v)
        for rule in kube.RBAC_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert not any(resource == "cronjobs" for _, resource, _ in granted)
    assert not any(verb in ("update", "patch", "delete") for _, _, verb in granted)
