"""The argument parser of every command, and turning flags into a cluster (errors name the flag)."""

import argparse
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from exporter import __version__
from exporter.cli.exit_codes import exit_code_table
from exporter.config.settings import (
    DEFAULT_ENDPOINT,
    DEFAULT_THRESHOLDS,
    ENV_PREFIX,
    ByteCount,
    ClusterConfig,
    PositiveSeconds,
    Settings,
)
from exporter.core.handoff import CLUSTER_JSON_FLAG, cluster_from_json
from exporter.core.policy import (
    thresholds_expression,
)
from exporter.kubernetes import cronjob as render_mod
from exporter.kubernetes import jobs, kamaji

log = logging.getLogger("etcd_autodefrag")


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
