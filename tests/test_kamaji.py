"""exporter/kubernetes/kamaji.py: kamaji-etcd's two certificate layouts, told apart from its
StatefulSet, and the Jobs that follow them (through kube.discover, against the fake API with the
chart's objects)."""

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient

from exporter.config.settings import ClusterConfig
from exporter.core.handoff import cluster_from_json
from exporter.core.launches import Trigger
from exporter.kubernetes import api as kube
from exporter.kubernetes import jobs
from exporter.kubernetes.kamaji import (
    ClientSecrets,
    SecretLayout,
    client_secrets,
    detect_layout,
    member_endpoints,
    statefulset_replicas,
)

NAMESPACE = "kamaji-system"
TRIGGER = Trigger(alertname="EtcdDefragRecommended")


def sts(name: str, volumes: list[dict[str, Any]], replicas: int | None = 3) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": {"spec": {"volumes": volumes}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"metadata": {"name": name}, "spec": spec}


# What charts/kamaji-etcd/templates/etcd_sts.yaml mounts as volume `certs`, by layout.
SELF_SIGNED_VOLUMES = [{"name": "certs", "secret": {"secretName": "tenant-etcd-certs"}}]
CERT_MANAGER_VOLUMES = [
    {
        "name": "certs",
        "projected": {
            "sources": [
                {
                    "secret": {
                        "name": "tenant-etcd-server-certs",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "secret": {
                        "name": "tenant-etcd-peer-certs",
                        "items": [{"key": "tls.crt", "path": "peer.pem"}],
                    }
                },
            ]
        },
    }
]


@pytest.mark.parametrize(
    ("volumes", "layout"),
    [
        (SELF_SIGNED_VOLUMES, SecretLayout.SELF_SIGNED),
        (CERT_MANAGER_VOLUMES, SecretLayout.CERT_MANAGER),
        ([{"name": "data", "emptyDir": {}}, *SELF_SIGNED_VOLUMES], SecretLayout.SELF_SIGNED),
        ([], None),  # not the chart's StatefulSet
        ([{"name": "certs", "secret": {"secretName": "other-etcd-certs"}}], None),  # another release's
        ([{"name": "certs", "projected": {"sources": [{"secret": {"name": "my-server-tls"}}]}}], None),
    ],
)
def test_layout_is_read_from_the_secrets_the_statefulset_mounts(
    volumes: list[dict[str, Any]], layout: SecretLayout | None
) -> None:
    assert detect_layout(sts("tenant-etcd", volumes)) is layout


def test_a_statefulset_without_a_pod_template_has_no_layout() -> None:
    assert detect_layout({"metadata": {"name": "tenant-etcd"}, "spec": {}}) is None


@pytest.mark.parametrize(
    ("layout", "secrets", "described"),
    [
        (
            SecretLayout.SELF_SIGNED,
            ClientSecrets("e-certs", "ca.crt", "e-root-client-certs"),
            "Secret e-certs (ca.crt), Secret e-root-client-certs (tls.crt, tls.key)",
        ),
        (
            SecretLayout.CERT_MANAGER,
            ClientSecrets("e-client-certs", "ca.crt", "e-client-certs"),
            "Secret e-client-certs (ca.crt, tls.crt, tls.key)",
        ),
    ],
)
def test_each_layout_names_its_secrets(layout: SecretLayout, secrets: ClientSecrets, described: str) -> None:
    assert client_secrets(layout, "e") == secrets
    assert secrets.describe() == described
    assert secrets.names == list(dict.fromkeys([secrets.ca_secret, secrets.client_secret]))


def test_auto_names_no_secret() -> None:
    with pytest.raises(ValueError, match="secret_layout auto is not resolved"):
        client_secrets(SecretLayout.AUTO, "e")


def test_member_endpoints_follow_replicas_domain_and_port() -> None:
    assert member_endpoints(sts("kamaji-etcd", [], replicas=5), "kamaji-etcd", NAMESPACE) == [
        f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(5)
    ]
    endpoints = member_endpoints(
        sts("e", [], 2), "e-hl", "ns", port=2389, cluster_domain="k.local", scheme="http"
    )
    assert endpoints == ["http://e-0.e-hl.ns.svc.k.local:2389", "http://e-1.e-hl.ns.svc.k.local:2389"]


@pytest.mark.parametrize(("replicas", "count"), [(None, 1), (0, 0), (3, 3)])
def test_replicas_default_like_kubernetes(replicas: int | None, count: int) -> None:
    assert statefulset_replicas(sts("e", [], replicas)) == count
    assert len(member_endpoints(sts("e", [], replicas), "e", "ns")) == count


# --- through the API: what the service reads at start-up, and the Job it then creates --------------


def kamaji_cluster(endpoints: tuple[str, ...] = (), **kubernetes: Any) -> ClusterConfig:
    target = {"namespace": NAMESPACE, "variant": "kamaji", "etcd_name": "kamaji-etcd", **kubernetes}
    tls = {"ca_file": "/ca", "cert_file": "/c", "key_file": "/k"}
    return ClusterConfig.model_validate(
        {"name": "kamaji-etcd", "endpoints": list(endpoints), "tls": tls, "kubernetes": target}
    )


@pytest.mark.parametrize("layout", ["self-signed", "cert-manager"])
async def test_discovered_jobs_mount_secrets_that_exist_in_either_layout(
    fake_kube: FakeKube, kube_api: ApiClient, layout: str
) -> None:
    """A chart install of each layout: the Job's Pod mounts only Secrets (and keys) that exist there."""
    fake_kube.add_statefulset(NAMESPACE, "kamaji-etcd", replicas=3, layout=layout)
    cluster = kamaji_cluster(discover_endpoints=True)
    assert cluster.reads_kubernetes_api
    found = await kube.discover(cluster, kube_api)
    assert found.kubernetes is not None
    assert found.kubernetes.secret_layout is SecretLayout(layout)
    assert len(found.endpoints) == 3
    job = jobs.build_job(found, image="i:1", trigger=TRIGGER)
    pod = job["spec"]["template"]["spec"]
    assert fake_kube.missing_secrets(NAMESPACE, pod) == []
    # ...where the other layout's Job could not start (the bug this fixes: FailedMount).
    other = "cert-manager" if layout == "self-signed" else "self-signed"
    wrong = jobs.build_job(found.with_secret_layout(SecretLayout(other)), image="i:1", trigger=TRIGGER)
    assert fake_kube.missing_secrets(NAMESPACE, wrong["spec"]["template"]["spec"]) != []
    # One read of the StatefulSet, and never a Secret (the Role grants none).
    assert [(r.method, r.path) for r in fake_kube.requests] == [
        ("GET", "/apis/apps/v1/namespaces/kamaji-system/statefulsets/kamaji-etcd")
    ]


async def test_an_explicit_layout_is_kept_and_the_domain_and_port_are_used(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    fake_kube.add_statefulset(NAMESPACE, "kamaji-etcd", replicas=2, layout="cert-manager")
    cluster = kamaji_cluster(
        discover_endpoints=True,
        secret_layout="self-signed",
        cluster_domain="tenants.example",
        client_port=2389,
    )
    found = await kube.discover(cluster, kube_api)
    assert found.kubernetes is not None
    assert found.kubernetes.secret_layout is SecretLayout.SELF_SIGNED  # the override wins
    assert found.endpoints == [
        f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.tenants.example:2389" for i in range(2)
    ]
    args = jobs.build_job(found, image="i:1", trigger=TRIGGER)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert cluster_from_json(args[args.index("--cluster-json") + 1]).endpoints == found.endpoints


async def test_fixed_endpoints_still_read_the_layout(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    fake_kube.add_statefulset(NAMESPACE, "kamaji-etcd", replicas=3, layout="cert-manager")
    cluster = kamaji_cluster(("https://10.0.0.1:2379",))
    assert cluster.reads_kubernetes_api  # for the layout alone
    found = await kube.discover(cluster, kube_api)
    assert found.endpoints == ["https://10.0.0.1:2379"]
    assert found.kubernetes is not None
    assert found.kubernetes.secret_layout is SecretLayout.CERT_MANAGER
    explicit = found  # nothing left to read
    assert not explicit.reads_kubernetes_api
    assert await kube.discover(explicit, kube_api) is explicit


async def test_an_unknown_layout_asks_for_the_setting(fake_kube: FakeKube, kube_api: ApiClient) -> None:
    fake_kube.add_statefulset(NAMESPACE, "kamaji-etcd", replicas=3, layout=None)
    with pytest.raises(ValueError, match=r"mounts neither kamaji-etcd-certs .* set kubernetes.secret_layout"):
        await kube.discover(kamaji_cluster(discover_endpoints=True), kube_api)


# --- docs/kamaji.md: the command that copies the client certificate, run against both layouts -------

# A stand-in for kubectl that answers from FakeKube's objects the three calls the command makes.
FAKE_KUBECTL = r"""#!/usr/bin/env python3
import base64, json, os, sys
state = json.load(open(os.environ["FAKE_KUBECTL_STATE"]))
args = sys.argv[1:]
ns = args[args.index("-n") + 1]
rest = [a for i, a in enumerate(args) if a != "-n" and (i == 0 or args[i - 1] != "-n")]
if rest[:2] == ["get", "statefulset"]:
    print(" ".join(state["secret_volumes"].get(f"{ns}/{rest[2]}", [])), end="")
elif rest[:2] == ["get", "secret"]:
    data = state["secrets"].get(f"{ns}/{rest[2]}")
    key = rest[-1].split("{.data.")[1].rstrip("}").replace("\\.", ".")
    if data is None or key not in data:
        sys.exit(f'Error from server (NotFound): secrets "{rest[2]}" not found')
    print(data[key], end="")
elif rest[:3] == ["create", "secret", "generic"]:
    files = {}
    for arg in rest[4:]:
        key, path = arg.removeprefix("--from-file=").split("=", 1)
        files[key] = open(path).read()
    print(json.dumps({"namespace": ns, "name": rest[3], "files": files}))
else:
    sys.exit(f"unexpected kubectl call: {args}")
"""


def documented_copy_command() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "kamaji.md").read_text()
    section = text.split("## The service's own copy of the client certificate", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("layout", ["self-signed", "cert-manager"])
def test_the_documented_copy_command_works_on_both_layouts(layout: str, tmp_path: Path) -> None:
    fake = FakeKube()
    statefulset = fake.add_statefulset(NAMESPACE, "kamaji-etcd", 3, layout=layout)
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    state = {
        "secret_volumes": {
            f"{NAMESPACE}/kamaji-etcd": [v["secret"]["secretName"] for v in volumes if "secret" in v]
        },
        "secrets": {
            f"{ns}/{name}": {
                key: base64.b64encode(f"{name}/{key}".encode()).decode() for key in secret["data"]
            }
            for (ns, name), secret in fake.secrets.items()
        },
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{kubectl.parent}:{os.environ['PATH']}",
        "FAKE_KUBECTL_STATE": str(tmp_path / "state.json"),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", documented_copy_command()],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    secrets = client_secrets(SecretLayout(layout), "kamaji-etcd")
    assert created == {
        "namespace": "etcd-autodefrag",
        "name": "etcd-autodefrag-etcd-client",
        "files": {
            "ca.crt": f"{secrets.ca_secret}/ca.crt",  # the very files a defrag Pod mounts
            "tls.crt": f"{secrets.client_secret}/tls.crt",
            "tls.key": f"{secrets.client_secret}/tls.key",
        },
    }
