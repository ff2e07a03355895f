"""The `etcd-autodefrag` command line: `defrag`, `status`, `serve` and `render`.

Exit codes (README, "Exit codes"): 0 success or nothing to do, 1 a member failed, 2 bad usage or
configuration, 3 refused by the safety gate, 75 deferred by the rollout gate.
"""

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from exporter import __version__, jobs, logs
from exporter import render as render_mod
from exporter.cluster_lock import LockUnavailable
from exporter.engine import DefragEngine, RunReport, iter_lines
from exporter.etcd import EtcdClient, TlsFiles, make_ssl_context
from exporter.policy import (
    QuorumCost,
    cluster_rule,
    fragmentation_ratio,
    free_bytes,
    human_bytes,
    quorum_cost,
    quota_usage_ratio,
)
from exporter.settings import (
    DEFAULT_ENDPOINT,
    ENV_PREFIX,
    ClusterConfig,
    ConfigError,
    Settings,
    default_cluster,
    format_validation_error,
    load_settings,
)
from exporter.snapshot import ClusterSnapshot, QuotaCache, observe_cluster

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe ended
log = logging.getLogger("etcd_autodefrag")


class UsageError(Exception):
    """Bad flags or configuration: exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="etcd-autodefrag",
        description="Keep etcd clusters from running out of space: gauges, alerts, safe defrag.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"YAML file with the cluster list (env {ENV_PREFIX}CONFIG)",
    )
    common.add_argument("--log-format", choices=["text", "json"], default=None)
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)

    target = argparse.ArgumentParser(add_help=False)
    where = target.add_argument_group("which cluster")
    where.add_argument("--cluster", metavar="NAME", help="take everything from this configured cluster")
    where.add_argument(
        "--endpoints",
        metavar="URL[,URL...]",
        help="client URLs; one member is enough, the others come from its member list",
    )
    where.add_argument(
        "--no-discover",
        action="store_true",
        help="act only on the members behind --endpoints, do not add the others from the member list",
    )
    where.add_argument("--cacert", type=Path, help="CA bundle to verify the members")
    where.add_argument("--cert", type=Path, help="client certificate")
    where.add_argument("--key", type=Path, help="client key")
    where.add_argument("--server-name", help="TLS server name when endpoints are IP addresses")
    where.add_argument("--rule", metavar="EXPR", help="defrag rule in etcd-defrag's syntax")
    where.add_argument("--quota-bytes", type=int, help="quota to assume when a member reports none")
    where.add_argument("--request-timeout", type=float, metavar="S", help="per-request timeout")

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defrag = sub.add_parser(
        "defrag",
        parents=[common, target],
        help="defragment the members of one cluster, one at a time, leader last",
        description="Health gate, then each member in turn (followers first, leader last).",
    )
    defrag.add_argument("--dry-run", action="store_true", help="check and evaluate, change nothing")
    defrag.add_argument("--compact", action="store_true", help="compact to the current revision first")
    defrag.add_argument("--move-leader", action="store_true", help="hand leadership away first")
    defrag.add_argument("--continue-on-error", action="store_true", help="go on after a failed member")
    defrag.add_argument("--member-timeout", type=float, metavar="S", help="per-member defrag timeout")
    defrag.add_argument("--deadline", type=float, metavar="S", help="deadline of the whole run")
    defrag.add_argument(
        "--allow-unavailable",
        action="store_true",
        help="accept that a cluster of one or two voting members stops answering while a member is "
        "defragmented (allow_unavailable_defrag; refused otherwise, exit 3)",
    )
    defrag.add_argument(
        "--settle-seconds",
        type=float,
        metavar="S",
        help="defer (exit 75) while a member started less than S seconds ago; 0 turns it off",
    )
    defrag.add_argument(
        "--break-lock",
        action="store_true",
        help="you are sure no other run is going on for this cluster: undo the etcd lock a dead run "
        "left, or under NOSPACE go on where no lock can be taken (docs/locking.md)",
    )
    defrag.add_argument("--output", choices=["text", "json"], default="text")
    defrag.add_argument(
        "--report-file",
        type=Path,
        metavar="PATH",
        help="also write the JSON report here, at most 4096 bytes (a Job's /dev/termination-log)",
    )

    status = sub.add_parser(
        "status",
        parents=[common, target],
        help="a table of the members: sizes, fragmentation, quota usage, rule verdict",
    )
    status.add_argument("--output", choices=["table", "json"], default="table")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve /metrics for every configured cluster (and the Alertmanager webhook)",
        description="Without a config file: one cluster 'local' at " + DEFAULT_ENDPOINT + ".",
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    add_render_parser(sub)
    return parser


def add_render_parser(sub: Any) -> None:
    """`render cronjob` (kamaji-etcd's defrag.sh flags, or Talos) and `render job --cluster NAME`."""
    render = sub.add_parser(
        "render",
        help="print (or --apply) the CronJob of a scheduled defrag, or the Job the webhook would create",
    )
    objects = render.add_subparsers(dest="render_command", required=True, metavar="OBJECT")
    cronjob = objects.add_parser(
        "cronjob",
        help="a CronJob that runs this engine on a schedule (replaces kamaji-etcd's defrag.sh)",
        description="Same flags and defaults as kamaji-etcd's defrag.sh. DEBUG=1 prints every derived "
        "value to stderr. --apply creates it, or replaces the CronJob of that name, with your own "
        "kubeconfig; without it the YAML goes to stdout.",
    )
    defaults = render_mod.DEFRAG_SH_DEFAULTS
    cronjob.add_argument(
        "-e",
        dest="etcd_name",
        metavar="ETCD_NAME",
        help=f"kamaji: etcd StatefulSet ({defaults['etcd_name']})",
    )
    cronjob.add_argument(
        "-s", dest="service", metavar="SERVICE", help=f"kamaji: etcd Service ({defaults['service']})"
    )
    cronjob.add_argument(
        "-n",
        dest="namespace",
        metavar="NAMESPACE",
        help=f"of etcd and the CronJob ({defaults['namespace']}; talos: {render_mod.TALOS_NAMESPACE})",
    )
    cronjob.add_argument(
        "-j", dest="schedule", metavar="SCHEDULE", help=f"cron schedule ('{defaults['schedule']}')"
    )
    cronjob.add_argument("--variant", choices=render_mod.VARIANTS, default="kamaji")
    cronjob.add_argument("--secret", metavar="NAME", help="talos: Secret with keys ca, crt, key")
    cronjob.add_argument(
        "--endpoints",
        metavar="URL[,URL...]",
        help="etcd client URLs (talos: required; kamaji: instead of -s)",
    )
    cronjob.add_argument(
        "--replicas", type=int, metavar="N", help="kamaji: members (default: the StatefulSet's, with --apply)"
    )
    cronjob.add_argument(
        "--cluster-domain", metavar="DOMAIN", help=f"kamaji: ({render_mod.DEFAULT_CLUSTER_DOMAIN})"
    )
    cronjob.add_argument("--rule", metavar="EXPR", help="defrag rule (default: the default thresholds)")
    cronjob.add_argument("--image", metavar="IMAGE", help=f"({jobs.DEFAULT_IMAGE})")
    cronjob.add_argument("--name", metavar="NAME", help="CronJob name (kamaji: <ETCD_NAME>-defrag-job)")
    cronjob.add_argument("--apply", action="store_true", help="create or replace it through the API")
    cronjob.add_argument("--kubeconfig", type=Path, metavar="FILE", help="with --apply (default $KUBECONFIG)")
    cronjob.add_argument("--context", metavar="NAME", help="with --apply: kubeconfig context")

    job = objects.add_parser(
        "job",
        help="the Job the webhook creates for a configured cluster",
        description="Exactly the Job the webhook's Kubernetes executor creates for an alert of that "
        "name: the same name (the lock), so `kubectl create -f -` waits its turn like any other run.",
    )
    job.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"YAML file with the cluster list (env {ENV_PREFIX}CONFIG)",
    )
    job.add_argument("--cluster", metavar="NAME", required=True, help="the configured cluster")
    job.add_argument("--alertname", default="manual", help="recorded on the Job (default: manual)")
    job.add_argument("--dry-run", action="store_true", help="the Job runs `defrag --dry-run`")
    job.add_argument(
        "--endpoints",
        metavar="URL[,URL...]",
        help="for a cluster with kubernetes.discover_endpoints: the URLs the service would read from the API",
    )


def endpoint_list(text: str) -> list[str]:
    """The URLs of a comma-separated --endpoints value."""
    return [e.strip() for e in text.split(",") if e.strip()]


def cluster_from_args(args: argparse.Namespace, settings: Settings) -> ClusterConfig:
    """The cluster to act on: a configured one (`--cluster`), flags only, or the local default."""
    overrides: dict[str, Any] = {}
    if args.endpoints:
        overrides["endpoints"] = endpoint_list(args.endpoints)
    if args.no_discover:
        overrides["discover_members"] = False
    if args.cacert or args.cert or args.key or args.server_name:
        overrides["tls"] = {
            "ca_file": args.cacert,
            "cert_file": args.cert,
            "key_file": args.key,
            "server_name": args.server_name,
        }
    if args.rule is not None:
        overrides["rule"] = args.rule
        overrides["thresholds"] = None
    flag_fields = {
        "quota_bytes": "quota_bytes",
        "request_timeout": "request_timeout_seconds",
        "member_timeout": "member_timeout_seconds",
        "deadline": "deadline_seconds",
        "settle_seconds": "settle_seconds",
    }
    for flag, name in flag_fields.items():
        if getattr(args, flag, None) is not None:
            overrides[name] = getattr(args, flag)
    for flag in ("compact", "move_leader", "continue_on_error"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if getattr(args, "allow_unavailable", False):
        overrides["allow_unavailable_defrag"] = True

    if args.cluster:
        base = settings.cluster(args.cluster).model_dump()
    elif args.endpoints:
        base = {"name": "cli", "endpoints": overrides["endpoints"]}
    elif settings.clusters:
        names = ", ".join(c.name for c in settings.clusters)
        raise UsageError(f"name the cluster with --cluster (configured: {names}) or give --endpoints")
    else:
        base = default_cluster().model_dump()
    try:
        cluster = ClusterConfig.model_validate({**base, **overrides})
    except Exception as exc:  # pydantic ValidationError, formatted for people
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise UsageError(
                format_validation_error(exc).replace("invalid configuration", "invalid flags")
            ) from None
        raise
    if not cluster.endpoints:
        raise UsageError(
            f"cluster {cluster.name} reads its endpoints from the Kubernetes API "
            "(kubernetes.discover_endpoints), which this command does not: give --endpoints "
            "(the service passes them to its Jobs)"
        )
    return cluster


class DiscoveryError(Exception):
    """The Kubernetes API could not tell a cluster's endpoints."""


async def discovered(clusters: Sequence[ClusterConfig]) -> list[ClusterConfig]:
    """The clusters, those with `kubernetes.discover_endpoints` given the URLs the API lists now.

    The API client is in-cluster in a Pod, else the kubeconfig ($KUBECONFIG, ~/.kube/config).
    """
    if not any(c.discovers_endpoints for c in clusters):
        return list(clusters)
    from exporter import kube

    # $KUBECONFIG as the process sees it now (the client library reads it once, at import).
    kubeconfig = Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None
    try:
        api = await kube.kube_api_client(kubeconfig=kubeconfig)
    except ConfigError as exc:
        raise DiscoveryError(f"cannot discover endpoints: {exc}") from None
    out = []
    async with api:
        for cluster in clusters:
            if cluster.discovers_endpoints:
                try:
                    endpoints = await kube.discover_endpoints(cluster, api)
                except kube.KubeError as exc:
                    raise DiscoveryError(
                        f"cluster {cluster.name}: cannot discover its endpoints: {exc}"
                    ) from None
                try:
                    cluster = cluster.with_endpoints(endpoints)
                except ValueError as exc:  # e.g. plain http URLs for a variant that mounts TLS
                    raise DiscoveryError(f"cluster {cluster.name}: discovered endpoints: {exc}") from None
                log.info(
                    "cluster %s: %d endpoints from the Kubernetes API: %s",
                    cluster.name,
                    len(endpoints),
                    ", ".join(endpoints),
                )
            out.append(cluster)
    return out


def make_client(session: aiohttp.ClientSession, cluster: ClusterConfig) -> EtcdClient:
    """An etcd client for one cluster, with its TLS material loaded now (a bad file is a usage error)."""
    ssl_context = None
    if cluster.tls is not None:
        tls = TlsFiles(
            cluster.tls.ca_file,
            cluster.tls.cert_file,
            cluster.tls.key_file,
            cluster.tls.server_name,
        )
        try:
            ssl_context = make_ssl_context(tls)
        except (OSError, ValueError) as exc:
            # ssl's own message ("[SSL] PEM lib") names no file: say which ones were read.
            named = {"ca": tls.ca_file, "cert": tls.cert_file, "key": tls.key_file}
            files = ", ".join(f"{what} {path}" for what, path in named.items() if path)
            raise UsageError(f"cluster {cluster.name}: cannot load TLS files ({files}): {exc}") from None
    return EtcdClient(
        session,
        ssl_context=ssl_context,
        server_name=cluster.tls.server_name if cluster.tls else None,
        timeout_seconds=cluster.request_timeout_seconds,
    )


@contextlib.contextmanager
def host_lock(cluster_id: int) -> Iterator[None]:
    """One defrag run per etcd cluster on this host, whatever flags or config named it.

    Keyed by etcd's own cluster id, so `--cluster a` and `--endpoints` of the same cluster exclude
    each other. Across hosts, the Kubernetes Job name is the lock (see the webhook).
    """
    directory = Path(os.environ.get(f"{ENV_PREFIX}LOCK_DIR", tempfile.gettempdir()))
    path = directory / f"etcd-autodefrag-{cluster_id:x}.lock"
    try:
        handle = path.open("a")
    except OSError as exc:
        raise LockUnavailable(f"cannot open the lock file {path}: {exc.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockUnavailable(f"another defrag run on this cluster holds {path}") from None
        yield


async def run_defrag(args: argparse.Namespace, cluster: ClusterConfig) -> RunReport:
    """Run the engine once for one cluster."""
    async with aiohttp.ClientSession() as session:
        engine = DefragEngine(
            make_client(session, cluster),
            cluster,
            dry_run=args.dry_run,
            lock=host_lock,
            break_lock=args.break_lock,
        )
        return await engine.run()


async def run_status(cluster: ClusterConfig) -> ClusterSnapshot:
    """One snapshot of one cluster."""
    async with aiohttp.ClientSession() as session:
        client = make_client(session, cluster)
        return await observe_cluster(client, cluster, cluster_rule(cluster), QuotaCache())


def status_rows(snapshot: ClusterSnapshot, *, whole_cluster: bool = True) -> list[dict[str, Any]]:
    """One dict per member, the columns of `status`.

    `whole_cluster` False (no member discovery): the rows are the given members only, too few to
    say what a defrag costs the quorum, so `defrag_cost` is null.
    """
    rows = []
    alarms = {a.member_id: a.kind.value for a in snapshot.alarms}
    voters = [m for m in snapshot.members if not m.member.is_learner]
    cost, cost_reason = quorum_cost(voting=len(voters), healthy_voting=sum(m.up for m in voters))
    for m in snapshot.members:
        s = m.status
        usage = quota_usage_ratio(s) if s else None
        rows.append(
            {
                "endpoint": m.endpoint,
                "id": f"{m.member.id or (s.member_id if s else 0):x}",
                "name": m.member.name,
                "version": s.version if s else "",
                "db_size_bytes": s.db_size_bytes if s else None,
                "db_size_in_use_bytes": s.db_size_in_use_bytes if s else None,
                "db_free_bytes": free_bytes(s) if s else None,
                "fragmentation_ratio": round(fragmentation_ratio(s), 4) if s else None,
                "quota_bytes": s.quota_bytes if s and s.quota_bytes else None,
                "quota_usage_ratio": round(usage, 4) if usage is not None else None,
                "is_leader": bool(s and s.member_id == snapshot.leader_id),
                "is_learner": m.member.is_learner,
                "raft_term": s.raft_term if s else None,
                "raft_index": s.raft_index if s else None,
                "raft_applied_index": s.raft_applied_index if s else None,
                "alarms": alarms.get(m.member.id or (s.member_id if s else 0), ""),
                "defrag_recommended": bool(m.verdict and m.verdict.defrag),
                "reason": m.verdict.reason if m.verdict else m.error,
                # What defragmenting this member would cost the cluster (exporter.policy.quorum_cost).
                "defrag_cost": (None if not whole_cluster else "none" if m.member.is_learner else cost.value),
                "defrag_cost_reason": (
                    "not known: only the given members were asked (no member discovery)"
                    if not whole_cluster
                    else "learner: never defragmented"
                    if m.member.is_learner
                    else cost_reason
                ),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an etcdctl-style table."""
    columns: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("NAME", lambda r: r["name"]),
        ("ENDPOINT", lambda r: r["endpoint"]),
        ("ID", lambda r: r["id"]),
        ("VERSION", lambda r: r["version"]),
        ("DB SIZE", lambda r: _size(r["db_size_bytes"])),
        ("IN USE", lambda r: _size(r["db_size_in_use_bytes"])),
        ("FREE", lambda r: _size(r["db_free_bytes"])),
        ("FRAG", lambda r: _pct(r["fragmentation_ratio"])),
        ("QUOTA", lambda r: _size(r["quota_bytes"])),
        ("QUOTA USE", lambda r: _pct(r["quota_usage_ratio"])),
        ("LEADER", lambda r: "true" if r["is_leader"] else "false"),
        ("LEARNER", lambda r: "true" if r["is_learner"] else "false"),
        ("TERM", lambda r: _num(r["raft_term"])),
        ("INDEX", lambda r: _num(r["raft_index"])),
        ("APPLIED", lambda r: _num(r["raft_applied_index"])),
        ("ALARMS", lambda r: r["alarms"]),
        ("DEFRAG?", lambda r: "yes" if r["defrag_recommended"] else "no"),
    ]
    cells = [[head for head, _ in columns]] + [[str(get(r)) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [rule]
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append(rule)
    lines.append(rule)
    for r in rows:
        if r["reason"]:
            lines.append(f"{r['name'] or r['endpoint']}: {r['reason']}")
    costs = {
        (r["defrag_cost"], r["defrag_cost_reason"])
        for r in rows
        if r["defrag_cost"] not in (QuorumCost.NONE, None)
    }
    for cost, reason in sorted(costs):
        lines.append(f"defrag risk ({cost}): {reason}")
    return "\n".join(lines)


def _size(value: int | None) -> str:
    return human_bytes(value) if value is not None else "-"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def _num(value: int | None) -> str:
    return str(value) if value is not None else "-"


def needs_restart(running: Settings, fresh: Settings) -> list[str]:
    """The settings other than `clusters` that differ: a reload does not apply them."""
    return [
        name
        for name in type(running).model_fields
        if name != "clusters" and getattr(running, name) != getattr(fresh, name)
    ]


def serve(settings: Settings, config_file: Path | None, overrides: dict[str, Any] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; SIGHUP re-reads the cluster list from the config file.

    `overrides` are the command-line values that beat the file (`--listen`), applied on reload too.
    """
    from aiohttp import web

    from exporter.app import create_app, reconfigure

    clusters = settings.clusters
    if not clusters:
        clusters = [default_cluster()]
        log.info(
            "no clusters configured: watching one cluster 'local' at %s (give --config to change)",
            DEFAULT_ENDPOINT,
        )
    try:
        clusters = asyncio.run(discovered(clusters))
    except DiscoveryError as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return 1
    # Raises ConfigError (exit 2 in main) for an open webhook beyond loopback or unreadable secrets.
    app = create_app(settings, clusters=clusters, config_file=config_file)
    reloading: set[asyncio.Task[None]] = set()

    async def reload_on_sighup(app: web.Application) -> None:
        async def reload() -> None:
            try:
                fresh = load_settings(config_file, **(overrides or {}))
                clusters = await discovered(fresh.clusters or [default_cluster()])
            except (ConfigError, DiscoveryError) as exc:
                log.error("SIGHUP: configuration not reloaded, keeping the current one: %s", exc)
                return
            reconfigure(app, clusters)
            log.info("SIGHUP: reloaded %d clusters from %s", len(fresh.clusters), config_file)
            if changed := needs_restart(settings, fresh):
                log.warning(
                    "SIGHUP: %s changed in %s but only the cluster list is reloaded: restart the "
                    "service to apply them",
                    ", ".join(changed),
                    config_file,
                )

        def start_reload() -> None:
            task = asyncio.get_running_loop().create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        if config_file is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, start_reload)

    app.on_startup.append(reload_on_sighup)
    log.info(
        "serving /metrics and the webhook /webhook/alertmanager for %d clusters (%s) on http://%s:%d",
        len(clusters),
        ", ".join(c.name for c in clusters),
        settings.listen_host,
        settings.listen_port,
    )
    try:
        web.run_app(app, host=settings.listen_host, port=settings.listen_port, print=None, access_log=None)
    except OSError as exc:
        print(f"etcd-autodefrag: cannot listen on {settings.listen_address}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


# --- render -----------------------------------------------------------------------------------------

RENDER_API_TIMEOUT_SECONDS = 30.0


def render(args: argparse.Namespace) -> int:
    """`render cronjob` / `render job`: YAML on stdout, or `--apply`; exit 2 for bad flags."""
    try:
        if args.render_command == "job":
            manifest = render_job(args)
        else:
            flags = cronjob_flags(args)
            plan = render_mod.plan_cronjob(flags)  # every flag checked before any API call
            if args.apply:
                if args.kubeconfig is not None and not args.kubeconfig.is_file():
                    raise UsageError(f"--kubeconfig: {args.kubeconfig}: no such file")
                return asyncio.run(apply_cronjob(args, flags))
            if args.kubeconfig or args.context:
                raise UsageError("--kubeconfig and --context go with --apply")
            debug_notes(plan)
            manifest = render_mod.build_cronjob(plan)
    except (UsageError, ConfigError, render_mod.RenderError, jobs.JobConfigError) as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(manifest, sort_keys=False, width=4096), end="")
    return 0


def render_job(args: argparse.Namespace) -> dict[str, Any]:
    """The Job of exporter.executors.KubernetesExecutor.launch for this cluster and alert name."""
    settings = load_settings(args.config)
    cluster = settings.cluster(args.cluster)
    if args.endpoints is not None:
        if not cluster.discovers_endpoints:
            raise UsageError(
                f"--endpoints: cluster {cluster.name} takes its endpoints from the configuration, "
                "not from the Kubernetes API"
            )
        try:
            cluster = cluster.with_endpoints(endpoint_list(args.endpoints))
        except ValueError as exc:
            raise UsageError(f"--endpoints: {exc}") from None
    elif cluster.discovers_endpoints:
        raise UsageError(
            f"cluster {cluster.name} reads its endpoints from the Kubernetes API "
            "(kubernetes.discover_endpoints): give them with --endpoints"
        )
    return jobs.build_job(
        cluster,
        image=settings.executor.image or jobs.DEFAULT_IMAGE,
        trigger=jobs.Trigger(alertname=args.alertname, dry_run=args.dry_run),
        cooldown_seconds=settings.executor.cooldown_seconds,
    )


def cronjob_flags(args: argparse.Namespace) -> render_mod.CronJobFlags:
    """The `render cronjob` flags as given (None: not given)."""
    endpoints = endpoint_list(args.endpoints) if args.endpoints is not None else None
    return render_mod.CronJobFlags(
        variant=args.variant,
        etcd_name=args.etcd_name,
        service=args.service,
        namespace=args.namespace,
        schedule=args.schedule,
        replicas=args.replicas,
        secret=args.secret,
        endpoints=endpoints,
        cluster_domain=args.cluster_domain,
        rule=args.rule,
        image=args.image,
        name=args.name,
    )


def debug_notes(plan: render_mod.CronJobPlan) -> None:
    """With DEBUG set (defrag.sh's DEBUG=1), every derived value and where it came from, on stderr."""
    if os.environ.get("DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
        for note in plan.notes:
            print(f"render cronjob: {note}", file=sys.stderr)


async def apply_cronjob(args: argparse.Namespace, flags: render_mod.CronJobFlags) -> int:
    """Read the StatefulSet's replicas (kamaji), then create or replace the CronJob; 1 on API errors."""
    from exporter import kube

    timeout = RENDER_API_TIMEOUT_SECONDS
    try:
        async with await kube.kube_api_client(kubeconfig=args.kubeconfig, context=args.context) as api:
            replicas = None
            if render_mod.needs_statefulset(flags):
                namespace, name = render_mod.kamaji_names(flags)
                try:
                    statefulset = await kube.read_statefulset(api, namespace, name, timeout=timeout)
                except kube.KubeRejected as exc:
                    if exc.status != 404:
                        raise
                    raise UsageError(
                        f"-e/-n: StatefulSet {namespace}/{name} not found; name the kamaji etcd "
                        "StatefulSet with -e and -n, or give --replicas or --endpoints"
                    ) from None
                replicas = jobs.statefulset_replicas(statefulset)
            plan = render_mod.plan_cronjob(flags, statefulset_replicas=replicas)
            debug_notes(plan)
            applied = await kube.apply_cronjob(api, render_mod.build_cronjob(plan), timeout=timeout)
    except kube.KubeError as exc:
        print(f"etcd-autodefrag: render cronjob --apply: {exc}", file=sys.stderr)
        if exc.status in (401, 403):
            rules = "; ".join(
                f"{'/'.join(filter(None, [*r['apiGroups'], *r['resources']]))} {','.join(r['verbs'])}"
                for r in kube.RENDER_APPLY_RBAC_RULES
            )
            print(
                "etcd-autodefrag: --apply uses your own kubeconfig (not the service's Role); it needs "
                f"{rules} in the namespace. Or print the YAML and apply it with kubectl.",
                file=sys.stderr,
            )
        return 1
    endpoints = plan.cluster.endpoints
    what = f"{plan.namespace}/{plan.name} (schedule '{plan.schedule}', {len(endpoints)} endpoints)"
    if applied.created:
        print(f"created CronJob {what}")
    else:
        before = ", ".join(applied.previous_images) or "no container"
        print(f"replaced CronJob {what}; the old one ran {before}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `etcd-autodefrag` console script."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`status | head`): nothing more to say, and no traceback. Point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        logs.configure(level="WARNING")  # render prints what it did; only problems are logged
        return render(args)
    overrides = {"listen_address": args.listen} if getattr(args, "listen", None) else {}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(
        fmt=args.log_format or settings.log_format.value, level=args.log_level or settings.log_level
    )
    try:
        if args.command == "serve":
            return serve(settings, args.config, overrides)
        cluster = cluster_from_args(args, settings)
        if args.command == "defrag":
            report = asyncio.run(run_defrag(args, cluster))
            if args.report_file is not None:
                try:
                    args.report_file.write_text(report.summary_json(max_bytes=4096))
                except OSError as exc:
                    print(f"etcd-autodefrag: cannot write report: {exc}", file=sys.stderr)
            if args.output == "json":
                print(report.to_json())
            else:
                print("\n".join(iter_lines(report)))
            return report.exit_code
        if args.command == "status":
            snapshot = asyncio.run(run_status(cluster))
            if snapshot.error:
                print(f"etcd-autodefrag: cluster {cluster.name}: {snapshot.error}", file=sys.stderr)
                return 1
            rows = status_rows(snapshot, whole_cluster=cluster.discover_members)
            print(json.dumps(rows, indent=2) if args.output == "json" else format_table(rows))
            return 1 if any(r["db_size_bytes"] is None for r in rows) else 0
    except (UsageError, ConfigError) as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("etcd-autodefrag: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
