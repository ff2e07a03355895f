"""The etcd harness does what the other tests rely on it to do."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from etcd_harness import (
    EtcdBuild,
    EtcdCluster,
    EtcdHarnessError,
    EtcdRequestError,
    TlsMaterial,
    builds_from_env,
    free_after_compaction_floor_bytes,
    installed_build,
    start_cluster,
    wait_until,
)

MiB = 1024 * 1024


def _member_list(cluster: EtcdCluster) -> list[dict[str, Any]]:
    result = cluster.etcdctl("member", "list", "--write-out=json")
    members: list[dict[str, Any]] = json.loads(result.stdout)["members"]
    return members


def _get_text(url: str, context: ssl.SSLContext | None = None) -> str:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


def test_wait_until_returns_the_value_or_names_what_it_waited_for() -> None:
    values = iter([0, None, "ready"])
    assert wait_until(lambda: next(values), timeout=1, what="a value", interval=0.001) == "ready"
    with pytest.raises(TimeoutError, match=r"waiting for the moon \(last error: OSError\('x'\)\)"):
        wait_until(_raise_os_error, timeout=0.05, what="the moon", ignore=(OSError,))


def _raise_os_error() -> None:
    raise OSError("x")


@pytest.mark.etcd
def test_cluster_runs_the_release_it_was_started_with(etcd: EtcdCluster, etcd_build: EtcdBuild) -> None:
    assert etcd.build == etcd_build
    assert {status["version"] for status in etcd.statuses().values()} == {etcd_build.version}
    assert f"etcdctl version: {etcd_build.version}\n" in etcd.etcdctl("version").stdout


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("3.4,latest", r"\['latest'\] are not version lines"),
        ("3.4,3.4", "names a version twice"),
        ("3.9", r"no etcd 3\.9 here: the installed etcd is 3\.\d+\.\d+ .* are 3\.5, 3\.6"),
    ],
)
def test_etcd_versions_that_cannot_be_served_are_refused(value: str, error: str) -> None:
    with pytest.raises(EtcdHarnessError, match=error):
        builds_from_env(value)


def test_etcd_versions_unset_means_the_installed_etcd_only() -> None:
    assert builds_from_env(None) is None
    assert builds_from_env(" ") is None


@pytest.mark.etcd
def test_shared_cluster_has_three_members_and_one_leader(etcd: EtcdCluster) -> None:
    statuses = etcd.statuses()
    assert sorted(statuses) == ["etcd-0", "etcd-1", "etcd-2"]
    assert len({status["leader"] for status in statuses.values()}) == 1
    leaders = [n for n, s in statuses.items() if s["leader"] == s["header"]["member_id"]]
    assert leaders == [etcd.leader().name]
    members = _member_list(etcd)
    assert sorted(m["name"] for m in members) == ["etcd-0", "etcd-1", "etcd-2"]
    assert not any(m.get("isLearner") for m in members)
    assert all(url.startswith("http://127.0.0.1:") for url in etcd.endpoints)
    assert len(set(etcd.endpoints)) == 3

    first = etcd.put("/test-harness/basic", b"1")
    assert etcd.put("/test-harness/basic", b"2", endpoint=etcd.endpoints[2]) == first + 1
    # The code under test reads the quota from the client URL's /metrics.
    metrics = _get_text(f"{etcd.endpoints[0]}/metrics")
    assert f"etcd_server_quota_backend_bytes {float(32 * MiB):.7e}" in metrics


@pytest.mark.etcd
@pytest.mark.parametrize(
    ("keys", "value_size", "rounds"),
    [
        (200, 16 * 1024, 3),  # the default: values of 4 pages, two to a leaf
        (64, 3000, 20),  # values well under a page, several to a leaf
        (8, 512 * 1024, 4),  # values of 128 pages, as in the demo
    ],
)
def test_churn_leaves_at_least_the_floor_free_on_every_member(
    fresh_etcd_cluster: EtcdCluster, keys: int, value_size: int, rounds: int
) -> None:
    fresh_etcd_cluster.churn(keys=keys, value_size=value_size, rounds=rounds)

    floor_bytes = free_after_compaction_floor_bytes(
        superseded_bytes=keys * value_size * (rounds - 1), live_keys=keys
    )
    for name, status in fresh_etcd_cluster.statuses().items():
        db_size_bytes = int(status["dbSize"])
        free_bytes = db_size_bytes - int(status["dbSizeInUse"])
        assert free_bytes >= floor_bytes, (name, status)
        assert free_bytes > 0.3 * db_size_bytes, (name, status)


def test_churn_refuses_a_workload_that_frees_nothing_for_sure(tmp_path: Path) -> None:
    # Refused before anything is written: a cluster without members is enough to show it.
    cluster = EtcdCluster(
        tmp_path, [], quota_bytes=32 * MiB, tls=None, cluster_flags=(), build=installed_build()
    )
    with pytest.raises(EtcdHarnessError, match="supersedes too little"):
        cluster.churn(keys=10, value_size=100, rounds=2)


@pytest.mark.etcd
def test_stopped_and_killed_members_restart_on_their_data(fresh_etcd_cluster: EtcdCluster) -> None:
    cluster = fresh_etcd_cluster
    old_leader = cluster.leader()
    member_id = old_leader.status()["header"]["member_id"]

    old_leader.stop()
    assert not old_leader.running
    new_leader = cluster.leader()
    assert new_leader is not old_leader
    revision = cluster.put("/test-harness/while-down", b"x", endpoint=new_leader.client_url)

    old_leader.start()
    cluster.wait_healthy()
    assert old_leader.status()["header"]["member_id"] == member_id
    wait_until(
        lambda: int(old_leader.status()["header"]["revision"]) >= revision,
        timeout=10,
        what="the restarted member to catch up",
    )

    leader = cluster.leader()
    follower = next(m for m in cluster.members if m is not leader)
    follower.kill()
    assert not follower.running
    assert sorted(cluster.statuses()) == sorted(m.name for m in cluster.members if m.running)
    follower.start()
    cluster.wait_healthy()
    assert all(member.running for member in cluster.members)


@pytest.mark.etcd
def test_tls_cluster_requires_a_client_certificate(tls_etcd_cluster: EtcdCluster) -> None:
    tls = tls_etcd_cluster.tls
    assert isinstance(tls, TlsMaterial)
    endpoint = tls_etcd_cluster.endpoints[0]
    assert endpoint.startswith("https://127.0.0.1:")

    without_cert = ssl.create_default_context(cafile=str(tls.ca_file))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _get_text(f"{endpoint}/health", without_cert)

    with_cert = ssl.create_default_context(cafile=str(tls.ca_file))
    with_cert.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    # 3.5 and later add "reason" to the reply.
    assert json.loads(_get_text(f"{endpoint}/health", with_cert))["health"] == "true"
    assert tls_etcd_cluster.leader() in tls_etcd_cluster.members
    health = tls_etcd_cluster.etcdctl("endpoint", "health")
    assert (health.stdout + health.stderr).count("is healthy") == 3  # 3.4 reports on stderr


@pytest.mark.etcd
def test_fill_until_nospace_raises_the_alarm_and_etcdctl_recovers(
    fresh_etcd_cluster: EtcdCluster,
) -> None:
    cluster = fresh_etcd_cluster
    cluster.fill_until_nospace()

    assert {alarm["alarm"] for alarm in cluster.alarms()} == {"NOSPACE"}
    with pytest.raises(EtcdRequestError, match="database space exceeded"):
        cluster.put("/test-harness/one-more", b"x")

    # The documented way out: free space, compact, defragment, then disarm.
    cluster.etcdctl("del", "--prefix", "/etcd-harness/fill/")
    cluster.compact()
    cluster.etcdctl("defrag", "--cluster")
    cluster.etcdctl("alarm", "disarm")
    assert cluster.alarms() == []
    cluster.put("/test-harness/one-more", b"x")
    cluster.wait_healthy()


@pytest.mark.etcd
def test_learner_is_added_and_everything_is_removed_on_stop(tmp_path: Path, etcd_build: EtcdBuild) -> None:
    with start_cluster(tmp_path, learner=True, build=etcd_build) as cluster:
        learners = [m for m in _member_list(cluster) if m.get("isLearner")]
        assert [m["name"] for m in learners] == ["etcd-3-learner"]
        learner = cluster.member("etcd-3-learner")
        assert learner.running
        assert learner.status().get("isLearner") is True
        assert cluster.leader() is not learner
        assert len(cluster.endpoints) == 4

    assert not cluster.directory.exists()
    assert not any(member.running for member in cluster.members)
