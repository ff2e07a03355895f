"""Two and four defrag runs at once under NOSPACE, each its own process with its own host lock.

The one promise we must never break: no two members of one cluster defragment at once. Only the lock
in etcd stands between these runs (each has its own ETCD_AUTODEFRAG_LOCK_DIR, as on separate hosts),
and the verdict comes from etcd's own logs: every member logs when its backend starts and finishes a
defragmentation, and no two such intervals may overlap. Each trial must also leave the cluster
recovered: NOSPACE disarmed, writes accepted, and the lock free.

LOCK_OVERLAP_TRIALS sets the trials per case (20 by default, as docs/locking.md reports).
"""

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_harness import (
    NOSPACE_ERROR,
    EtcdBuild,
    EtcdCluster,
    EtcdHarnessError,
    EtcdRequestError,
    start_cluster,
)
from reliability_counts import COUNTS

from exporter.defrag.lock import TOKEN_COUNT

pytestmark = pytest.mark.etcd

TRIALS = int(os.environ.get("LOCK_OVERLAP_TRIALS", "20"))
QUOTA_BYTES = 32 * 1024 * 1024
VALUE = b"v" * (256 * 1024)
# Live data that every defrag copies, so that each one lasts long enough (~0.1-0.5 s) for two runs to
# meet: the handoff from one member to the next is where unguarded runs overlapped.
LIVE_KEYS = 64
CLI = [sys.executable, "-m", "exporter"]
RUN_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def logged_cluster(tmp_path_factory: pytest.TempPathFactory, etcd_build: EtcdBuild) -> Iterator[EtcdCluster]:
    """A 3-member cluster of the release under test that logs every defragmentation (level info)."""
    try:
        cluster = start_cluster(
            tmp_path_factory.mktemp("etcd-overlap"),
            quota_bytes=QUOTA_BYTES,
            log_level="info",
            build=etcd_build,
        )
    except EtcdHarnessError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        cluster.put_many((f"/live/{i:04d}", VALUE) for i in range(LIVE_KEYS))
        yield cluster
    finally:
        cluster.stop()


def fill_with_history(cluster: EtcdCluster) -> None:
    """NOSPACE from overwrites: history that compaction frees, so a run can bring the cluster back."""
    with pytest.raises(EtcdRequestError, match=NOSPACE_ERROR):  # noqa: PT012
        for n in range(10_000):
            cluster.put(f"/fill/{n % 8}", VALUE)
    cluster.wait(
        lambda: any(a.get("alarm") == "NOSPACE" for a in cluster.alarms()), timeout=10, what="NOSPACE"
    )


def start_runs(cluster: EtcdCluster, count: int, tmp_path: Path) -> list[subprocess.Popen[str]]:
    """`count` CLI runs started back to back, as from `count` hosts: no host lock in common."""
    processes = []
    for index in range(count):
        lock_dir = tmp_path / f"host-{index}"
        lock_dir.mkdir(exist_ok=True)
        env = {**os.environ, "ETCD_AUTODEFRAG_LOCK_DIR": str(lock_dir)}
        command = [
            *CLI,
            "defrag",
            "--endpoints",
            ",".join(cluster.endpoints),
            "--rule",
            "false",  # NOSPACE overrides the rule: every member is defragmented
            "--compact",
            "--settle-seconds",
            "0",  # the cluster started seconds ago
            "--output",
            "json",
        ]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


@pytest.mark.parametrize("runs", [2, 4])
def test_concurrent_runs_under_nospace_never_defragment_two_members_at_once(
    logged_cluster: EtcdCluster, runs: int, tmp_path: Path
) -> None:
    cluster = logged_cluster
    # The tokens, as any run with space (or `serve`) writes them before the cluster fills up.
    subprocess.run([*CLI, "defrag", "--endpoints", cluster.endpoints[0], "--rule", "false"], check=True)
    refused = succeeded = 0
    for trial in range(TRIALS):
        fill_with_history(cluster)
        seen = {m.name: len(m.defrag_intervals()) for m in cluster.members}
        processes = start_runs(cluster, runs, tmp_path)
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
            results.append((process.returncode, stdout, stderr))

        intervals = [i for m in cluster.members for i in m.defrag_intervals()[seen[m.name] :]]
        context = f"trial {trial}: {[(code, err[-600:]) for code, _, err in results]}"
        overlapping = [(a, b) for a, b in itertools.combinations(intervals, 2) if a.overlaps(b)]
        assert overlapping == [], f"{context}: defrags overlapped: {overlapping}"
        assert all(i.finished is not None for i in intervals), context
        codes = sorted(code for code, _, _ in results)
        assert set(codes) <= {0, 3}, context  # done, or refused before touching anything
        reports = [json.loads(out) for _, out, _ in results]
        winners = [r for r in reports if r["result"] == "success"]
        assert len(winners) >= 1, context
        assert all(r["result"] in {"success", "refused", "nothing_to_do"} for r in reports), context
        for report in reports:
            if report["result"] == "refused":
                assert "lock" in report["reason"], context
        # Every member once per winner, and never two at a time: three intervals per winning run.
        assert len(intervals) == 3 * len(winners), context
        # The cluster is back: no alarm, writes accepted, and the lock free with every token back.
        assert cluster.alarms() == [], context
        cluster.put("/after-trial", str(trial).encode())
        keys = cluster.keys_with_prefix("/etcd-autodefrag/")
        assert sorted(keys) == [f"nospace-lock/{i:02d}" for i in range(TOKEN_COUNT)], context
        refused += codes.count(3)
        succeeded += len(winners)
    COUNTS.add("lock_overlap_trials", TRIALS)
    COUNTS.add("lock_overlap_runs", TRIALS * runs)
    COUNTS.add("lock_overlap_refused", refused)
    COUNTS.add("lock_overlap_overlaps", 0)
