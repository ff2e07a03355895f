"""`make demo`: the product on one machine, with a real 3-member etcd cluster.

1. start etcd (3 members, 64 MiB quota) on free loopback ports in a temporary directory;
2. start `etcd-autodefrag serve` for it and watch its /metrics;
3. write, overwrite and compact until the rule recommends a defrag;
4. run `etcd-autodefrag defrag` (followers first, leader last) and show the gauges fall.

The alert-driven path (Prometheus rule -> Alertmanager -> webhook) joins this demo with the
webhook and alert-rules issues. `KEEP=1` leaves everything running until Ctrl-C.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from etcd_harness import EtcdCluster, start_cluster, wait_until

RULE = "dbSizeFree > 12*1024*1024 && dbSizeFree > 0.5*dbSize"
CLUSTER = "demo"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gauges(url: str) -> dict[tuple[str, str], float]:
    """(metric, member) -> value for the demo cluster, from one scrape."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("etcd_cluster") == CLUSTER:
                values[(sample.name, sample.labels.get("member", ""))] = sample.value
    return values


def show(url: str, cluster: EtcdCluster) -> dict[tuple[str, str], float]:
    values = gauges(url)
    for member in cluster.members:
        size = values.get(("etcd_autodefrag_db_size_bytes", member.name), 0)
        free = values.get(("etcd_autodefrag_db_free_bytes", member.name), 0)
        ratio = values.get(("etcd_autodefrag_db_fragmentation_ratio", member.name), 0)
        leader = " (leader)" if values.get(("etcd_autodefrag_member_is_leader", member.name)) else ""
        print(
            f"    {member.name}{leader:<9} size {size / 2**20:6.1f} MiB   "
            f"free {free / 2**20:6.1f} MiB   fragmentation {ratio:5.1%}"
        )
    return values


def main() -> int:
    keep = os.environ.get("KEEP", "") not in ("", "0")
    workdir = Path(tempfile.mkdtemp(prefix="etcd-autodefrag-demo-"))
    processes: list[subprocess.Popen[bytes]] = []
    cluster: EtcdCluster | None = None

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        say("starting a 3-member etcd cluster (quota 64 MiB) on free loopback ports")
        cluster = start_cluster(workdir, quota_bytes=64 * 2**20)
        print(f"    endpoints: {', '.join(cluster.endpoints)}")

        config = workdir / "config.yaml"
        config.write_text(
            f"clusters:\n  - name: {CLUSTER}\n    endpoints: [{cluster.endpoints[0]}]\n    rule: '{RULE}'\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"starting etcd-autodefrag serve on {url} (rule: {RULE})")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    "serve",
                    "--config",
                    str(config),
                    "--listen",
                    f"127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(workdir / "serve.log", "wb"),  # noqa: SIM115 - closed with the process
            )
        )
        wait_until(
            lambda: urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200,
            timeout=20,
            what=f"{url}/readyz (log: {workdir / 'serve.log'})",
            ignore=(OSError,),
        )
        show(url, cluster)

        say("writing, overwriting and compacting 200 ever larger keys until the rule recommends a defrag")
        for round_number in range(1, 11):
            cluster.churn(keys=200, value_size=round_number * 12 * 1024, rounds=2)
            print(f"    round {round_number}:")
            values = show(url, cluster)
            if values.get(("etcd_autodefrag_cluster_defrag_recommended", "")) == 1:
                print('    etcd_autodefrag_cluster_defrag_recommended{etcd_cluster="demo"} = 1')
                break
        else:
            print("    the rule never matched; see the README's rule section")
            return 1

        say("running etcd-autodefrag defrag --cluster demo (one member at a time, leader last)")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "defrag", "--config", str(config), "--cluster", CLUSTER],
            check=False,
        )
        elapsed = time.monotonic() - started
        say("after the defrag")
        after = show(url, cluster)
        reclaimed = sum(
            values.get(("etcd_autodefrag_db_size_bytes", m.name), 0) for m in cluster.members
        ) - sum(after.get(("etcd_autodefrag_db_size_bytes", m.name), 0) for m in cluster.members)
        say(
            f"summary: exit code {result.returncode}, reclaimed {reclaimed / 2**20:.1f} MiB over 3 members "
            f"in {elapsed:.1f}s; recommended now = "
            f"{after.get(('etcd_autodefrag_cluster_defrag_recommended', ''), 0):.0f}"
        )
        if keep:
            say(f"KEEP=1: metrics at {url}/metrics, etcd at {cluster.endpoints[0]}; Ctrl-C stops everything")
            signal.pause()
        return result.returncode
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        if cluster is not None:
            cluster.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
        print("stopped every process the demo started and removed its files")


if __name__ == "__main__":
    sys.exit(main())
