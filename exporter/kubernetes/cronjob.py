"""The scheduled fallback as data: the CronJob `etcd-autodefrag render cronjob` prints. Pure: no I/O.

For clusters that have no Prometheus and Alertmanager to drive the webhook, a CronJob runs our engine
(`etcd-autodefrag defrag`) on a schedule, as kamaji-etcd's `defrag.sh` and the usual Talos CronJob run
theirs. What changes is what runs: only the members the rule selects are defragmented, followers
first and the leader last, each behind the health gate, against the quota each member reports.

`render cronjob` takes defrag.sh's flags with defrag.sh's defaults (DEFRAG_SH_DEFAULTS), so a
migration is one command with the same arguments; its CronJob keeps defrag.sh's name and namespace
(`<etcd_name>-defrag-job` in `-n`), so applying it replaces the old one in place and the two never
run side by side. The pod is exporter.kubernetes.jobs.defrag_pod_template's, the one the webhook's Jobs run:
same image, security context, file layout and report in the termination message.

The endpoints are only where the engine starts: it reads the member list from the first that
answers (discover_members), so a member missing from the list of URLs is still defragmented.

The certificates are kamaji-etcd's, in the layout `--secret-layout` names (exporter/kubernetes/kamaji.py):
`--apply` reads it from the Secrets the StatefulSet mounts; printing assumes defrag.sh's own.

The side effects (reading the StatefulSet's replica count and layout, creating or replacing the CronJob) are
exporter.kubernetes.api's `read_statefulset` and `apply_cronjob`, called by `render cronjob --apply` in
exporter/cli/render.py.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from exporter.config.settings import (
    DEFAULT_THRESHOLDS,
    ClusterConfig,
    KubernetesTarget,
    format_validation_error,
)
from exporter.core.names import is_dns_label, is_dns_subdomain
from exporter.core.policy import thresholds_expression
from exporter.core.rule import parse_rule
from exporter.kubernetes.jobs import (
    APP,
    APP_LABEL,
    COMPONENT_LABEL,
    DEADLINE_MARGIN_SECONDS,
    DEFAULT_IMAGE,
    TERMINATION_LOG,
    defrag_pod_template,
)
from exporter.kubernetes.kamaji import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_CLUSTER_DOMAIN,
    SecretLayout,
    client_secrets,
    detect_layout,
    member_endpoints,
    statefulset_replicas,
)
from exporter.kubernetes.variants import Variant

Json = dict[str, Any]

# kamaji-etcd's scripts/defrag.sh: `[-e etcd_name] [-s etcd_service] [-n etcd_namespace] [-j schedule]`.
DEFRAG_SH_DEFAULTS = {
    "etcd_name": "kamaji-etcd",
    "service": "kamaji-etcd",
    "namespace": "kamaji-system",
    "schedule": "0 0 * * *",
}
# defrag.sh hard-codes members -0, -1 and -2; without the API (no --apply) we assume as many, and say so.
DEFAULT_REPLICAS = 3
# The Talos CronJob this replaces lives in kube-system as `etcd-defrag`, next to its Secret.
TALOS_NAMESPACE = "kube-system"
TALOS_NAME = "etcd-defrag"
# The variants whose scheduled defrag this replaces (kamaji-etcd's defrag.sh, the Talos CronJob).
VARIANTS = (Variant.KAMAJI.value, Variant.TALOS.value)
# Not `defrag`: the service watches Jobs labelled component=defrag (jobs.JOB_SELECTOR) as its own runs.
COMPONENT = "scheduled-defrag"
# A schedule missed by more than this (controller down, cluster upgrade) is skipped, not run late;
# without a limit the controller gives up on a CronJob that missed more than 100 schedules.
STARTING_DEADLINE_SECONDS = 3600
CRONJOB_NAME_MAX = 52  # the CronJob controller appends an 11-character suffix to name each Job


class RenderError(ValueError):
    """The flags cannot make a CronJob; the message names the flag."""


@dataclass(frozen=True, kw_only=True)
class CronJobFlags:
    """The flags of `render cronjob` as given; None means "not given" (the default applies)."""

    variant: str = Variant.KAMAJI.value
    etcd_name: str | None = None
    service: str | None = None
    namespace: str | None = None
    schedule: str | None = None
    replicas: int | None = None
    secret: str | None = None
    endpoints: Sequence[str] | None = None
    cluster_domain: str | None = None
    client_port: int | None = None
    secret_layout: str | None = None
    rule: str | None = None
    image: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class CronJobPlan:
    """Everything the CronJob is made of, with a note per derived value (printed with DEBUG=1)."""

    cluster: ClusterConfig  # endpoints, rule, deadline and the `kubernetes` target of the pod
    name: str
    schedule: str
    image: str
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> KubernetesTarget:
        """Where the pod runs and where its certificates come from."""
        assert self.cluster.kubernetes is not None  # plan_cronjob always sets it
        return self.cluster.kubernetes

    @property
    def namespace(self) -> str:
        """Where the CronJob, its Jobs and the Secrets they mount live."""
        return self.target.namespace


def needs_statefulset(flags: CronJobFlags) -> bool:
    """Whether `--apply` reads the StatefulSet (kamaji): for the member count (no --endpoints or
    --replicas) or for the certificate layout (no --secret-layout, or `auto`)."""
    if flags.variant != Variant.KAMAJI.value:
        return False
    counts = flags.endpoints is None and flags.replicas is None
    return counts or flags.secret_layout in (None, SecretLayout.AUTO.value)


def kamaji_names(flags: CronJobFlags) -> tuple[str, str]:
    """(namespace, StatefulSet name) of a kamaji-etcd, with defrag.sh's defaults."""
    return (
        flags.namespace or DEFRAG_SH_DEFAULTS["namespace"],
        flags.etcd_name or DEFRAG_SH_DEFAULTS["etcd_name"],
    )


class _Notes(list[str]):
    def pick(self, flag: str, value: Any, default: Any, label: str) -> Any:
        """`value` if the flag was given, else `default`; either way noted with where it came from."""
        if value is None:
            self.append(f"{label}: {default} (default)")
            return default
        self.append(f"{label}: {value} ({flag})")
        return value


def plan_cronjob(flags: CronJobFlags, *, statefulset: Json | None = None) -> CronJobPlan:
    """Resolve defaults and check every flag; `statefulset` is kamaji-etcd's, as read by --apply.

    Raises RenderError naming the flag at fault.
    """
    notes = _Notes()
    if flags.variant == Variant.KAMAJI.value:
        if flags.secret is not None:
            raise RenderError(
                "--secret is for --variant talos; kamaji's certificates come from kamaji-etcd's "
                "Secrets (--secret-layout)"
            )
        etcd_name = notes.pick("-e", flags.etcd_name, DEFRAG_SH_DEFAULTS["etcd_name"], "etcd StatefulSet")
        namespace = notes.pick("-n", flags.namespace, DEFRAG_SH_DEFAULTS["namespace"], "namespace")
        _check_dns_label("-e", etcd_name, "the StatefulSet's pods take their host names from it")
        layout = _secret_layout(flags, statefulset, f"{namespace}/{etcd_name}", notes)
        target_data: Json = {
            "namespace": namespace,
            "variant": "kamaji",
            "etcd_name": etcd_name,
            "secret_layout": layout.value,
        }
        default_name = f"{etcd_name}-defrag-job"  # defrag.sh's name: applying ours replaces its CronJob
        notes.append(f"certificates: {client_secrets(layout, etcd_name).describe()}")
        replicas = statefulset_replicas(statefulset) if statefulset is not None else None
        endpoints = _kamaji_endpoints(flags, etcd_name, namespace, replicas, notes)
    elif flags.variant == Variant.TALOS.value:
        given = [
            flag
            for flag, value in (
                ("-e", flags.etcd_name),
                ("-s", flags.service),
                ("--replicas", flags.replicas),
                ("--cluster-domain", flags.cluster_domain),
                ("--client-port", flags.client_port),
                ("--secret-layout", flags.secret_layout),
            )
            if value is not None
        ]
        if given:
            raise RenderError(
                f"{', '.join(given)}: only for --variant kamaji (Talos runs etcd on the control-plane "
                "nodes, not in a StatefulSet); give the members with --endpoints"
            )
        if flags.secret is None:
            raise RenderError(
                "--secret: --variant talos needs the name of a Secret with the etcd client certificate "
                "under the keys ca, crt and key"
            )
        if not flags.endpoints:
            raise RenderError(
                "--endpoints: --variant talos needs the etcd client URLs of the control-plane nodes, "
                "e.g. --endpoints https://10.0.0.11:2379,https://10.0.0.12:2379"
            )
        namespace = notes.pick("-n", flags.namespace, TALOS_NAMESPACE, "namespace")
        target_data = {"namespace": namespace, "variant": "talos", "tls_secret": flags.secret}
        default_name = TALOS_NAME  # the Talos CronJob's name: applying ours replaces it
        notes.append(f"certificates: Secret {flags.secret}, keys ca, crt, key (--secret)")
        endpoints = list(flags.endpoints)
        notes.append(f"endpoints: {', '.join(endpoints)} (--endpoints)")
    else:
        raise RenderError(f"--variant must be one of {', '.join(VARIANTS)}; got {flags.variant!r}")

    name = notes.pick("--name", flags.name, default_name, "CronJob name")
    schedule = notes.pick("-j", flags.schedule, DEFRAG_SH_DEFAULTS["schedule"], "schedule")
    image = notes.pick("--image", flags.image, DEFAULT_IMAGE, "image")
    if flags.rule is None:
        notes.append(f"rule: {thresholds_expression(DEFAULT_THRESHOLDS)} (the default thresholds)")
    else:
        notes.append(f"rule: {parse_rule(flags.rule) if flags.rule == '' else flags.rule} (--rule)")
    check_schedule(schedule)
    if not is_dns_label(name, max_chars=CRONJOB_NAME_MAX):
        derived = " (derived from -e: give a shorter --name)" if flags.name is None else ""
        raise RenderError(
            f"--name: {name!r}{derived} cannot name a CronJob: lowercase letters, digits and '-', at "
            f"most {CRONJOB_NAME_MAX} characters (the controller adds 11 to name its Jobs)"
        )
    cluster = _validated(target_data, endpoints, flags.rule)
    notes.append(
        "concurrencyPolicy: Forbid (a run still going when the next is due: the next one is skipped)"
    )
    return CronJobPlan(cluster, name, schedule, image, list(notes))


def _secret_layout(flags: CronJobFlags, statefulset: Json | None, where: str, notes: _Notes) -> SecretLayout:
    """--secret-layout; `auto` (or none) reads it from the StatefulSet with --apply, else self-signed."""
    try:
        layout = SecretLayout(flags.secret_layout or SecretLayout.AUTO.value)
    except ValueError:
        choices = ", ".join(layout.value for layout in SecretLayout)
        raise RenderError(f"--secret-layout must be one of {choices}; got {flags.secret_layout!r}") from None
    if layout is not SecretLayout.AUTO:
        notes.append(f"certificate layout: {layout.value} (--secret-layout)")
        return layout
    if statefulset is None:
        # Printing reads nothing: defrag.sh's own Secrets, which a cert-manager install lacks.
        notes.append(
            "certificate layout: self-signed (default without --apply, as defrag.sh; "
            "--secret-layout cert-manager for Kamaji's default install)"
        )
        return SecretLayout.SELF_SIGNED
    found = detect_layout(statefulset)
    if found is None:
        raise RenderError(
            f"--secret-layout: StatefulSet {where} mounts neither of the kamaji-etcd chart's certificate "
            "Secrets; say which layout it uses (self-signed or cert-manager)"
        )
    notes.append(f"certificate layout: {found.value} (the Secrets StatefulSet {where} mounts)")
    return found


def _kamaji_endpoints(
    flags: CronJobFlags, etcd_name: str, namespace: str, replicas_read: int | None, notes: _Notes
) -> list[str]:
    if flags.endpoints is not None:
        given = [f for f, v in (("-s", flags.service), ("--replicas", flags.replicas)) if v is not None]
        given += [
            flag
            for flag, value in (
                ("--cluster-domain", flags.cluster_domain),
                ("--client-port", flags.client_port),
            )
            if value is not None
        ]
        if given:
            raise RenderError(
                f"--endpoints replaces {', '.join(given)}: give the client URLs or how to derive them"
            )
        notes.append(f"endpoints: {', '.join(flags.endpoints)} (--endpoints)")
        return list(flags.endpoints)
    service = notes.pick("-s", flags.service, DEFRAG_SH_DEFAULTS["service"], "etcd Service")
    domain = notes.pick("--cluster-domain", flags.cluster_domain, DEFAULT_CLUSTER_DOMAIN, "cluster domain")
    port = notes.pick("--client-port", flags.client_port, DEFAULT_CLIENT_PORT, "client port")
    _check_dns_label("-s", service, "it is part of each member's host name")
    if not is_dns_subdomain(domain):
        raise RenderError(f"--cluster-domain: {domain!r} is not a DNS domain like cluster.local")
    if not 1 <= port <= 65535:
        raise RenderError(f"--client-port: must be from 1 to 65535; got {port}")
    if flags.replicas is not None:
        if flags.replicas < 1:
            raise RenderError(f"--replicas: must be at least 1; got {flags.replicas}")
        replicas, source = flags.replicas, "--replicas"
    elif replicas_read is not None:
        replicas, source = replicas_read, f"spec.replicas of StatefulSet {namespace}/{etcd_name}"
    else:
        replicas, source = DEFAULT_REPLICAS, "default, as defrag.sh; --apply reads the StatefulSet"
    notes.append(f"members: {replicas} ({source})")
    if replicas < 1:
        raise RenderError(
            f"-e: StatefulSet {namespace}/{etcd_name} has {replicas} replicas: no etcd member to defragment"
        )
    statefulset = {"metadata": {"name": etcd_name}, "spec": {"replicas": replicas}}
    endpoints = member_endpoints(statefulset, service, namespace, port=port, cluster_domain=domain)
    notes.append(f"endpoints: {', '.join(endpoints)}")
    return endpoints


def _check_dns_label(flag: str, value: str, why: str) -> None:
    if not is_dns_label(value):
        raise RenderError(f"{flag}: {value!r} must be a DNS label (lowercase letters, digits, '-'): {why}")


# Which flag sets each field the settings models check.
_FLAG_OF_FIELD = {
    "endpoints": "--endpoints",
    "rule": "--rule",
    "kubernetes.namespace": "-n",
    "kubernetes.etcd_name": "-e",
    "kubernetes.tls_secret": "--secret",
    "kubernetes.secret_layout": "--secret-layout",
}


def _validated(target_data: Json, endpoints: list[str], rule: str | None) -> ClusterConfig:
    """The settings models' own checks (names, URLs, rule syntax, TLS), their messages naming flags."""
    if not endpoints:
        raise RenderError("--endpoints: give at least one client URL, e.g. https://10.0.0.11:2379")
    try:
        return ClusterConfig.model_validate(
            {"name": "render", "endpoints": endpoints, "rule": rule, "kubernetes": target_data}
        )
    except ValidationError as exc:
        problems = format_validation_error(exc).splitlines()[1:]
    for field_name, flag in _FLAG_OF_FIELD.items():
        problems = [re.sub(rf"^\s*{re.escape(field_name)}(\[\d+\])?:", f"{flag}:", p) for p in problems]
    # A problem of the whole cluster (TLS against plain-http endpoints) is about the endpoints.
    problems = [re.sub(r"^\s*\(top level\): (kubernetes: )?", "--endpoints: ", p) for p in problems]
    # One problem per line; a rule's own message spans lines (the rule, then a caret under the column).
    raise RenderError("\n".join(p.removeprefix("  ") for p in problems))


def build_cronjob(plan: CronJobPlan) -> Json:
    """The batch/v1 CronJob that runs `etcd-autodefrag defrag` for the planned cluster on its schedule.

    Creating it is kube.apply_cronjob's (`--apply`), or the user's (`kubectl apply -f`).
    """
    cluster = plan.cluster
    labels = {APP_LABEL: APP, COMPONENT_LABEL: COMPONENT}
    args = ["defrag", "--endpoints", ",".join(cluster.endpoints)]
    if cluster.rule is not None:
        args += ["--rule", cluster.rule]
    # Text on stdout for `kubectl logs`; the JSON report goes to the termination message.
    args += ["--output", "text", "--report-file", TERMINATION_LOG]
    template = defrag_pod_template(plan.target, image=plan.image, args=args, labels=labels)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": plan.name, "namespace": plan.namespace, "labels": dict(labels)},
        "spec": {
            "schedule": plan.schedule,
            # defrag.sh leaves the default (Allow): a slow run and the next one would overlap.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    # One attempt (defrag.sh restarts on failure): the next schedule tries again.
                    "backoffLimit": 0,
                    "activeDeadlineSeconds": round(cluster.deadline_seconds) + DEADLINE_MARGIN_SECONDS,
                    "template": template,
                },
            },
        },
    }


# --- cron schedules ------------------------------------------------------------------------------

# What Kubernetes' CronJob validation accepts (robfig/cron's standard parser): five fields or a macro.
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)


def check_schedule(schedule: str) -> None:
    """Raise RenderError unless `schedule` is a cron schedule a CronJob accepts, e.g. `0 0 * * *`."""
    text = schedule.strip()
    if text.startswith(("TZ=", "CRON_TZ=")):
        raise RenderError("-j: a time zone in the schedule is refused by Kubernetes (spec.timeZone sets it)")
    if text.startswith("@"):
        if text not in _MACROS:
            raise RenderError(f"-j: {schedule!r}: unknown macro (one of {', '.join(_MACROS)})")
        return
    parts = text.split()
    if len(parts) != 5:
        raise RenderError(
            f"-j: {schedule!r} is not a cron schedule: five fields (minute hour day-of-month month "
            "day-of-week) like '0 0 * * *'"
        )
    for part, (name, low, high, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            problem = _cron_item_problem(item, low, high, names)
            if problem:
                raise RenderError(f"-j: {schedule!r}: {name} {item!r}: {problem}")


def _cron_item_problem(item: str, low: int, high: int, names: dict[str, int]) -> str:
    span, slash, step = item.partition("/")
    if slash and not (_is_number(step) and int(step) > 0):
        return "the step after / must be a positive number"
    if span in ("*", "?"):
        return ""
    first, dash, last = span.partition("-")
    values = []
    for text in (first, last) if dash else (first,):
        value = int(text) if _is_number(text) else names.get(text.lower())
        if value is None:
            return f"expected a number from {low} to {high}" + (" or a name" if names else "")
        if not low <= value <= high:
            return f"{value} is outside {low}-{high}"
        values.append(value)
    if len(values) == 2 and values[0] > values[1]:
        return "a range must go from low to high"
    return ""


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()
