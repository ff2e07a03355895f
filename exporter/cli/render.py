"""`render job` and `render cronjob`: the manifests, printed or applied (migration from a CronJob)."""

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

import yaml

from exporter.cli.exit_codes import EXIT_USAGE
from exporter.cli.parser import UsageError, endpoint_list
from exporter.config.settings import (
    ConfigError,
    load_settings,
)
from exporter.core.handoff import RunSettings
from exporter.core.launches import Trigger
from exporter.kubernetes import cronjob as render_mod
from exporter.kubernetes import jobs, kamaji

log = logging.getLogger("etcd_autodefrag")


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
    """The Job of exporter.launch.kubernetes.KubernetesExecutor.launch for this cluster and alert name."""
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
