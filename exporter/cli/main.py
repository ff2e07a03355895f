"""The `etcd-autodefrag` command line: `defrag`, `status`, `serve` and `render`.

One contract for every command (docs/cli.md): the exit codes of ExitCode, printed by every --help;
`--output text|json` wherever there is a report; every error names the flag, setting or file.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from pydantic import TypeAdapter, ValidationError

from exporter import __version__, logs
from exporter.config.settings import (
    DEFAULT_ENDPOINT,
    DEFAULT_THRESHOLDS,
    ENV_PREFIX,
    ByteCount,
    ClusterConfig,
    ConfigError,
    PositiveSeconds,
    Settings,
    load_settings,
)
from exporter.core.handoff import CLUSTER_JSON_FLAG, RunSettings, cluster_from_json
from exporter.core.launches import Trigger
from exporter.core.policy import (
    QuorumCost,
    cluster_rule,
    fragmentation_ratio,
    free_bytes,
    quorum_cost,
    quota_usage_ratio,
    thresholds_expression,
)
from exporter.core.report import RunReport, iter_lines
from exporter.core.snapshot import ClusterSnapshot
from exporter.core.units import human_bytes
from exporter.defrag.engine import DefragEngine
from exporter.defrag.host_lock import host_lock
from exporter.etcd.connect import Connection, TlsFileError, connection
from exporter.etcd.observe import QuotaCache, observe_cluster
from exporter.kubernetes import cronjob as render_mod
from exporter.kubernetes import jobs, kamaji
from exporter.kubernetes.discovery import DiscoveryError
from exporter.service import startup

log = logging.getLogger("etcd_autodefrag")


class ExitCode(IntEnum):
    """Every exit code of every command; `--help` prints EXIT_CODE_MEANINGS, docs/cli.md the same."""

    OK = 0
    FAILED = 1
    USAGE = 2
    REFUSED = 3
    DEFERRED = 75  # EX_TEMPFAIL: try again later
    INTERRUPTED = 130  # 128 + SIGINT
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe ended


EXIT_CODE_MEANINGS = {
    ExitCode.OK: "success: the run defragmented, had nothing to do, or was a dry run; `status`: every "
    "member answered; `serve`: stopped by SIGTERM or Ctrl-C",
    ExitCode.FAILED: "failed: a member's defrag failed or timed out, the cluster became unhealthy "
    "mid-run, the deadline passed; `serve`, `render --apply`: the Kubernetes API failed",
    ExitCode.USAGE: "bad usage or configuration: a flag, config file, environment variable, TLS file "
    "or listen address; the message names it. Nothing was contacted",
    ExitCode.REFUSED: "refused before touching anything: no endpoint answered, a voting member is down, "
    "a CORRUPT alarm, another run holds the lock, the defrag would stop a 1- or 2-member cluster; "
    "`status`: an endpoint or member did not answer",
    ExitCode.DEFERRED: "deferred: the cluster is changing (a member started within settle_seconds, a "
    "learner, the member list changed, a StatefulSet rollout); nothing was touched, try again later "
    "(`EX_TEMPFAIL`)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
    ExitCode.BROKEN_PIPE: "the output's reader went away (`status` piped into `head`); a defrag run had "
    "already ended",
}
EXIT_USAGE = ExitCode.USAGE


def exit_code_table() -> str:
    """The exit codes as `--help` prints them."""
    return "exit codes:\n" + "\n".join(
        textwrap.fill(meaning, width=100, initial_indent=f"  {int(code):<4} ", subsequent_indent=" " * 7)
        for code, meaning in EXIT_CODE_MEANINGS.items()
    )


def _help_epilog(*examples: str) -> str:
    lines = ["example:" if len(examples) == 1 else "examples:", *(f"  {e}" for e in examples)]
    return "\n".join(lines) + "\n\n" + exit_code_table() + "\n\nReference: docs/cli.md"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines (examples, the exit-code table) as written."""


def _flag_value(annotation: Any) -> Callable[[str], Any]:
    """An argparse `type` checking a flag's value with the settings' own type, in a flag's words.

    argparse prints the message after the flag: `argument --deadline: must be a finite number`.
    """
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            message = message.replace("Input should be", "must be")
            got = "" if repr(text) in message else f"; got {text!r}"
            raise argparse.ArgumentTypeError(f"{message}{got}") from None

    return parse


_seconds = _flag_value(PositiveSeconds)
_bytes = _flag_value(ByteCount)


def _output_format(text: str) -> str:
    return "text" if text == "table" else text  # `table`: what `status` called text before 0.2


def _default(name: str) -> Any:
    return ClusterConfig.model_fields[name].default


class UsageError(Exception):
    """Bad flags or configuration: exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="etcd-autodefrag",
        description="Keep etcd clusters from running out of space: gauges, alerts, safe defrag.",
        formatter_class=_HelpFormatter,
        epilog=_help_epilog(
            "etcd-autodefrag status --endpoints https://10.0.0.1:2379 --cacert ca.crt --cert c.crt "
            "--key c.key",
            "etcd-autodefrag defrag --cluster tenant-a --config config.yaml --dry-run",
            "etcd-autodefrag serve --config config.yaml",
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"YAML file with the cluster list (env {ENV_PREFIX}CONFIG; default: none)",
    )
    common.add_argument("--log-format", choices=["text", "json"], default=None, help="(default: text)")
    common.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None, help="(default: INFO)"
    )

    target = argparse.ArgumentParser(add_help=False)
    where = target.add_argument_group(
        "which cluster (required: --cluster or --endpoints; flags given with --cluster override its settings)"
    )
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
    where.add_argument("--cacert", type=Path, help="CA bundle to verify the members (default: system CAs)")
    where.add_argument("--cert", type=Path, help="client certificate (PEM)")
    where.add_argument("--key", type=Path, help="client key (PEM, unencrypted)")
    where.add_argument("--server-name", help="TLS server name when endpoints are IP addresses")
    where.add_argument(
        "--rule",
        metavar="EXPR",
        help="defrag rule in etcd-defrag's syntax (default: "
        + thresholds_expression(DEFAULT_THRESHOLDS)
        + ")",
    )
    where.add_argument(
        "--quota-bytes",
        type=_bytes,
        metavar="SIZE",
        help="quota to assume when a member reports none: bytes, or 8Gi, 8GiB, 8G (default: none)",
    )
    where.add_argument(
        "--request-timeout",
        type=_seconds,
        metavar="S",
        help=f"per-request timeout in seconds (default: {_default('request_timeout_seconds'):g})",
    )

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defrag = sub.add_parser(
        "defrag",
        parents=[common, target],
        formatter_class=_HelpFormatter,
        help="defragment the members of one cluster, one at a time, leader last",
        description="Health gate, then each member in turn (followers first, leader last). Progress "
        "goes to stderr, the report to stdout.",
        epilog=_help_epilog(
            "etcd-autodefrag defrag --endpoints https://10.0.0.1:2379 --cacert ca.crt --cert c.crt "
            "--key c.key --dry-run"
        ),
    )
    defrag.add_argument(
        CLUSTER_JSON_FLAG,
        metavar="JSON",
        help="the cluster as JSON, as the service hands it to a run it launches (docs/run-handoff.md); "
        "instead of --cluster, and no config file is read",
    )
    defrag.add_argument("--dry-run", action="store_true", help="check and evaluate, change nothing")
    defrag.add_argument("--compact", action="store_true", help="compact to the current revision first")
    defrag.add_argument("--move-leader", action="store_true", help="hand leadership away first")
    defrag.add_argument("--continue-on-error", action="store_true", help="go on after a failed member")
    defrag.add_argument(
        "--member-timeout",
        type=_seconds,
        metavar="S",
        help=f"per-member defrag timeout in seconds (default: {_default('member_timeout_seconds'):g})",
    )
    defrag.add_argument(
        "--deadline",
        type=_seconds,
        metavar="S",
        help=f"deadline of the whole run in seconds (default: {_default('deadline_seconds'):g})",
    )
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
    _output_flag(defrag, "text: a table of the members; json: the report (schema: docs/cli.md)")
    defrag.add_argument(
        "--report-file",
        type=Path,
        metavar="PATH",
        help="also write the JSON report here, at most 4096 bytes (a Job's /dev/termination-log)",
    )

    status = sub.add_parser(
        "status",
        parents=[common, target],
        formatter_class=_HelpFormatter,
        help="a table of the members: sizes, fragmentation, quota usage, rule verdict",
        description="Read-only. Needs a target as `defrag` does, so that a forgotten flag never reads "
        "another cluster than the one meant.",
        epilog=_help_epilog("etcd-autodefrag status --endpoints http://127.0.0.1:2379 --output json"),
    )
    _output_flag(status, "text: a table like `etcdctl endpoint status -w table`; json: one object per member")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="serve /metrics for every configured cluster (and the Alertmanager webhook)",
        description="Without a config file: one cluster 'local' at " + DEFAULT_ENDPOINT + ". TLS files "
        "are checked at start-up.",
        epilog=_help_epilog("etcd-autodefrag serve --config config.yaml --listen 0.0.0.0:9479"),
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: " + str(Settings.model_fields["listen_address"].default) + ")",
    )
    # kube-state-metrics' flags: each replica observes the clusters whose name hashes to its shard.
    serve.add_argument(
        "--shard",
        type=int,
        metavar="I",
        help="observe only shard I (0-based) of the clusters; default: the ordinal in env POD_NAME "
        "when --total-shards > 1 (docs/sharding.md)",
    )
    serve.add_argument(
        "--total-shards", type=int, metavar="N", help="split the clusters over N replicas (default: 1)"
    )
    add_render_parser(sub)
    return parser


def _output_flag(parser: argparse.ArgumentParser, formats: str) -> None:
    parser.add_argument(
        "--output",
        type=_output_format,
        choices=["text", "json"],
        default="text",
        help=f"{formats} (default: text)",
    )


def add_render_parser(sub: Any) -> None:
    """`render cronjob` (kamaji-etcd's defrag.sh flags, or Talos) and `render job --cluster NAME`."""
    render = sub.add_parser(
        "render",
        formatter_class=_HelpFormatter,
        help="print (or --apply) the CronJob of a scheduled defrag, or the Job the webhook would create",
        epilog=_help_epilog("etcd-autodefrag render cronjob -e kamaji-etcd -n kamaji-system"),
    )
    objects = render.add_subparsers(dest="render_command", required=True, metavar="OBJECT")
    cronjob = objects.add_parser(
        "cronjob",
        help="a CronJob that runs this engine on a schedule (replaces kamaji-etcd's defrag.sh)",
        description="Same flags and defaults as kamaji-etcd's defrag.sh. DEBUG=1 prints every derived "
        "value to stderr. --apply creates it, or replaces the CronJob of that name, with your own "
        "kubeconfig; without it the YAML goes to stdout.",
        formatter_class=_HelpFormatter,
        epilog=_help_epilog(
            "etcd-autodefrag render cronjob -e kamaji-etcd -n kamaji-system -j '0 3 * * *' --apply"
        ),
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
        "--cluster-domain", metavar="DOMAIN", help=f"kamaji: ({kamaji.DEFAULT_CLUSTER_DOMAIN})"
    )
    cronjob.add_argument(
        "--client-port", type=int, metavar="PORT", help=f"kamaji: ({kamaji.DEFAULT_CLIENT_PORT})"
    )
    cronjob.add_argument(
        "--secret-layout",
        choices=[layout.value for layout in kamaji.SecretLayout],
        help="kamaji: the chart's certificate Secrets (auto: read from the StatefulSet with --apply, "
        "else self-signed as defrag.sh; docs/kamaji.md)",
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
        "name, with the same name (etcd-autodefrag-<cluster>). While a Job of that name exists (running, "
        "or finished and not yet removed after the cooldown, its ttlSecondsAfterFinished) `kubectl "
        "create -f -` fails with AlreadyExists and nothing runs: no second run is queued. Delete the "
        "finished Job to run again sooner.",
        formatter_class=_HelpFormatter,
        epilog=_help_epilog(
            "etcd-autodefrag render job --config config.yaml --cluster tenant-a | kubectl create -f -"
        ),
    )
    job.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"YAML file with the cluster list (env {ENV_PREFIX}CONFIG; default: none)",
    )
    job.add_argument("--cluster", metavar="NAME", required=True, help="the configured cluster")
    job.add_argument("--alertname", default="manual", help="recorded on the Job (default: manual)")
    job.add_argument("--dry-run", action="store_true", help="the Job runs `defrag --dry-run`")
    job.add_argument(
        "--endpoints",
        metavar="URL[,URL...]",
        help="for a cluster with kubernetes.discover_endpoints: the URLs the service would read from the API",
    )
    job.add_argument(
        "--secret-layout",
        choices=[kamaji.SecretLayout.SELF_SIGNED.value, kamaji.SecretLayout.CERT_MANAGER.value],
        help="for a kamaji cluster with secret_layout auto: the layout the service would read from the API",
    )


def endpoint_list(text: str) -> list[str]:
    """The URLs of a comma-separated --endpoints value; UsageError when there are none."""
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    if not endpoints:
        # An unset shell variable (`--endpoints "$ETCD"`) must not fall back to a default cluster.
        raise UsageError(f"--endpoints: no URL in {text!r}; give client URLs like https://10.0.0.1:2379")
    return endpoints


# The flags of `defrag` and `status` that set a ClusterConfig field, by field (`tls.*` too).
FLAG_FOR_FIELD = {
    "endpoints": "--endpoints",
    "discover_members": "--no-discover",
    "rule": "--rule",
    "quota_bytes": "--quota-bytes",
    "request_timeout_seconds": "--request-timeout",
    "member_timeout_seconds": "--member-timeout",
    "deadline_seconds": "--deadline",
    "compact": "--compact",
    "move_leader": "--move-leader",
    "continue_on_error": "--continue-on-error",
    "tls.ca_file": "--cacert",
    "tls.cert_file": "--cert",
    "tls.key_file": "--key",
    "tls.server_name": "--server-name",
}


def flag_error(exc: ValidationError, flags: set[str], cluster: str | None) -> str:
    """A validation error of a cluster built from flags, in the words of the flags the user wrote.

    `flags` are the fields the flags set; an error about another field comes from the config file
    and keeps its name there (`clusters[NAME].field`).
    """
    by_name = {field: flag for field, flag in FLAG_FOR_FIELD.items() if field in flags}
    if "tls" in flags:
        by_name |= {
            f.removeprefix("tls."): flag for f, flag in FLAG_FOR_FIELD.items() if f.startswith("tls.")
        }
    # Only identifiers (member_timeout_seconds, cert_file): "rule" or "endpoints" are also plain words.
    names = sorted((n for n in by_name if "_" in n), key=len, reverse=True)
    words = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        if names:
            message = words.sub(lambda m: by_name[m[1]], message)
        if field in by_name:
            where = by_name[field]
        elif field in flags:  # a group of flags (tls): the message names them
            where = ""
        elif field:
            where = f"cluster {cluster}: {field}" if cluster else field
        else:
            where = f"cluster {cluster}" if cluster else ""
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


def cluster_from_args(args: argparse.Namespace, settings: Settings) -> ClusterConfig:
    """The cluster to act on: a configured one (`--cluster`) or flags only (`--endpoints`).

    A command that reads or changes a cluster must name it: no silent http://127.0.0.1:2379.
    """
    overrides: dict[str, Any] = {}
    if args.endpoints is not None:
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

    handed = getattr(args, "cluster_json", None)
    if handed is not None:
        if args.cluster:
            raise UsageError(f"--cluster and {CLUSTER_JSON_FLAG}: give one")
        try:
            base = cluster_from_json(handed).model_dump()
        except ValueError as exc:
            raise UsageError(f"{CLUSTER_JSON_FLAG}: {exc}") from None
    elif args.cluster:
        base = settings.cluster(args.cluster).model_dump()
    elif args.endpoints is not None:
        base = {"name": "cli", "endpoints": overrides["endpoints"]}
    else:
        configured = ", ".join(c.name for c in settings.clusters)
        raise UsageError(
            f"{args.command}: name the cluster with --cluster NAME"
            + (f" (configured: {configured})" if configured else " (and --config FILE)")
            + " or give --endpoints URL[,URL...]"
        )
    try:
        cluster = ClusterConfig.model_validate({**base, **overrides})
    except ValidationError as exc:
        raise UsageError(flag_error(exc, set(overrides), args.cluster)) from None
    if not cluster.endpoints:
        raise UsageError(
            f"cluster {cluster.name} reads its endpoints from the Kubernetes API "
            "(kubernetes.discover_endpoints), which this command does not: give --endpoints "
            "(the service passes them to its Jobs)"
        )
    return cluster


def connect_or_usage_error(cluster: ClusterConfig, *, from_flags: bool = False) -> Connection:
    """The cluster's connection (TLS files read now); ConfigError (exit 2) naming the setting and file.

    `from_flags`: the files came from --cacert/--cert/--key, so the message names those flags.
    """
    try:
        return connection(cluster)
    except TlsFileError as exc:
        if from_flags:
            raise ConfigError(f"{FLAG_FOR_FIELD['tls.' + exc.setting]} {exc.path}: {exc.problem}") from None
        raise ConfigError(str(exc)) from None


async def run_defrag(args: argparse.Namespace, connected: Connection) -> RunReport:
    """Run the engine once for one cluster."""
    async with aiohttp.ClientSession() as session:
        engine = DefragEngine(
            connected.client(session),
            connected.cluster,
            dry_run=args.dry_run,
            lock=host_lock,
            break_lock=args.break_lock,
        )
        return await engine.run()


async def run_status(connected: Connection) -> ClusterSnapshot:
    """One snapshot of one cluster."""
    cluster = connected.cluster
    async with aiohttp.ClientSession() as session:
        return await observe_cluster(connected.client(session), cluster, cluster_rule(cluster), QuotaCache())


def status_rows(snapshot: ClusterSnapshot, *, whole_cluster: bool = True) -> list[dict[str, Any]]:
    """One dict per member, the columns of `status`.

    `whole_cluster` False (no member discovery): the rows are the given members only, too few to
    say what a defrag costs the quorum, so `defrag_cost` is null.
    """
    rows = []
    alarms: dict[int, list[str]] = {}
    for alarm in snapshot.alarms:
        alarms.setdefault(alarm.member_id, []).append(alarm.kind.value)
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
                "version": s.version if s else None,
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
                "alarms": alarms.get(m.member.id or (s.member_id if s else 0), []),
                "defrag_recommended": bool(m.verdict and m.verdict.defrag),
                "reason": m.verdict.reason if m.verdict else m.error,
                "error": m.error,
                # What defragmenting this member would cost the cluster (exporter.core.policy.quorum_cost).
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
        ("VERSION", lambda r: r["version"] or "-"),
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
        ("ALARMS", lambda r: ",".join(r["alarms"])),
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


def serve(settings: Settings, config_file: Path | None, overrides: dict[str, Any] | None = None) -> int:
    """`serve`: run the service (exporter.service.startup) and turn its start-up failures into exit codes."""
    try:
        startup.run(settings, config_file, overrides)
    except DiscoveryError as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except startup.CannotListen as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.OK


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
    """The Job of exporter.launch.executors.KubernetesExecutor.launch for this cluster and alert name."""
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
    if args.secret_layout is not None:
        if cluster.kubernetes is None or cluster.kubernetes.secret_layout is not kamaji.SecretLayout.AUTO:
            raise UsageError(
                f"--secret-layout: cluster {cluster.name} does not read its kamaji-etcd certificate "
                "layout from the Kubernetes API (kubernetes.secret_layout is not auto)"
            )
        cluster = cluster.with_secret_layout(kamaji.SecretLayout(args.secret_layout))
    elif cluster.reads_kubernetes_api:
        raise UsageError(
            f"cluster {cluster.name} reads kamaji-etcd's certificate layout from the Kubernetes API "
            "(kubernetes.secret_layout: auto): give it with --secret-layout self-signed or cert-manager"
        )
    return jobs.build_job(
        cluster,
        image=settings.executor.image or jobs.DEFAULT_IMAGE,
        trigger=Trigger(alertname=args.alertname, dry_run=args.dry_run),
        cooldown_seconds=settings.executor.cooldown_seconds,
        run_settings=RunSettings.from_settings(settings),
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
        client_port=args.client_port,
        secret_layout=args.secret_layout,
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
    from exporter.kubernetes import api as kube

    timeout = RENDER_API_TIMEOUT_SECONDS
    try:
        async with await kube.kube_api_client(kubeconfig=args.kubeconfig, context=args.context) as api:
            statefulset = None
            if render_mod.needs_statefulset(flags):
                namespace, name = render_mod.kamaji_names(flags)
                try:
                    statefulset = await kube.read_statefulset(api, namespace, name, timeout=timeout)
                except kube.KubeRejected as exc:
                    if exc.status != 404:
                        raise
                    raise UsageError(
                        f"-e/-n: StatefulSet {namespace}/{name} not found; name the kamaji etcd "
                        "StatefulSet with -e and -n, or give --replicas or --endpoints and --secret-layout"
                    ) from None
            plan = render_mod.plan_cronjob(flags, statefulset=statefulset)
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
        return ExitCode.BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        logs.configure(level="WARNING")  # render prints what it did; only problems are logged
        return render(args)
    overrides: dict[str, Any] = {"listen_address": args.listen} if getattr(args, "listen", None) else {}
    # A run handed its cluster reads no config file: what runs is what the service decided.
    config = None if getattr(args, "cluster_json", None) is not None else args.config
    sharding = {
        key: value
        for key, value in (
            ("shard", getattr(args, "shard", None)),
            ("total_shards", getattr(args, "total_shards", None)),
        )
        if value is not None
    }
    if sharding:
        overrides["sharding"] = sharding  # merged with the environment's and the file's sharding
    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    logs.configure(
        fmt=args.log_format or settings.log_format.value, level=args.log_level or settings.log_level
    )
    try:
        if args.command == "serve":
            return serve(settings, args.config, overrides)
        cluster = cluster_from_args(args, settings)
        tls_flags = bool(args.cacert or args.cert or args.key or args.server_name)
        connected = connect_or_usage_error(cluster, from_flags=tls_flags)
        if args.command == "defrag":
            return defrag(args, connected)
        if args.command == "status":
            return status(args, connected)
    except (UsageError, ConfigError) as exc:
        print(f"etcd-autodefrag: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("etcd-autodefrag: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    raise AssertionError(f"unknown command {args.command}")


def defrag(args: argparse.Namespace, connected: Connection) -> int:
    """One run; the report on stdout (text or JSON), and as JSON in --report-file."""
    report = asyncio.run(run_defrag(args, connected))
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


def status(args: argparse.Namespace, connected: Connection) -> int:
    """The members' table (or JSON); exit 3, as a defrag would be refused, when any did not answer."""
    cluster = connected.cluster
    snapshot = asyncio.run(run_status(connected))
    if snapshot.error:
        print(f"etcd-autodefrag: cluster {cluster.name}: {snapshot.error}", file=sys.stderr)
        return ExitCode.REFUSED
    rows = status_rows(snapshot, whole_cluster=cluster.discover_members)
    print(json.dumps(rows, indent=2) if args.output == "json" else format_table(rows))
    return ExitCode.REFUSED if any(r["db_size_bytes"] is None for r in rows) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
