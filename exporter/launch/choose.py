"""Which executor the settings describe: `executor.kind` local, kubernetes, or auto (kubernetes in a Pod)."""

import os
from collections.abc import Mapping

from exporter.config.settings import (
    ExecutorSettings,
    Settings,
)
from exporter.launch import kubernetes, local
from exporter.launch.executor import Executor


def resolve_kind(executor: ExecutorSettings, environ: Mapping[str, str]) -> ExecutorSettings.Kind:
    """`auto` means kubernetes inside a Pod (KUBERNETES_SERVICE_HOST set), local elsewhere."""
    if executor.kind is not ExecutorSettings.Kind.AUTO:
        return executor.kind
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return ExecutorSettings.Kind.KUBERNETES
    return ExecutorSettings.Kind.LOCAL


def executor_from_settings(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> Executor:
    """The executor the settings describe (`auto`: kubernetes in a Pod, local elsewhere)."""
    if resolve_kind(settings.executor, environ) is ExecutorSettings.Kind.KUBERNETES:
        return kubernetes.kubernetes_executor(settings)
    return local.local_executor(settings, environ=environ)
