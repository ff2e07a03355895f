"""The `etcd-autodefrag` command line: `defrag`, `status`, `serve` and `render`.

One contract for every command (docs/cli.md): the exit codes of ExitCode, printed by every --help;
`--output text|json` wherever there is a report; every error names the flag, setting or file.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from exporter import logs
from exporter.cli.exit_codes import ExitCode
from exporter.cli.output import format_table, status_rows
from exporter.cli.parser import (
    FLAG_FOR_FIELD,
    UsageError,
    build_parser,
    cluster_from_args,
)
from exporter.cli.render import render
from exporter.config.settings import (
    ClusterConfig,
    ConfigError,
    Settings,
    load_settings,
)
from exporter.core.policy import (
    cluster_rule,
)
from exporter.core.report import RunReport, iter_lines
from exporter.core.snapshot import ClusterSnapshot
from exporter.defrag.engine import DefragEngine
from exporter.defrag.host_lock import host_lock
from exporter.etcd.connect import Connection, TlsFileError, checked_connection, connection
from exporter.etcd.observe import QuotaCache, observe_cluster
from exporter.kubernetes.discovery import DiscoveryError
from exporter.service import startup

log = logging.getLogger("etcd_autodefrag")


def connect_or_usage_error(cluster: ClusterConfig, *, from_flags: bool = False) -> Connection:
    """The cluster's connection (TLS files read now); ConfigError (exit 2) naming the setting and file.

    `from_flags`: the files came from --cacert/--cert/--key, so the message names those flags.
    """
    if not from_flags:
        return checked_connection(cluster)
    try:
        return connection(cluster)
    except TlsFileError as exc:
        raise ConfigError(f"{FLAG_FOR_FIELD['tls.' + exc.setting]} {exc.path}: {exc.problem}") from None


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
