"""Following Kamaji's DataStores while the service runs (`discover.kamaji_datastores`).

kube.watch_datastores reports the DataStores; for each etcd one this reads the Secrets its TLS
material is in, writes the material to files, turns it into a cluster (exporter.kubernetes.datastores)
and hands the new set to `on_change`, which the app merges with the configured clusters for the
refresher, /metrics and the webhook. Nothing here decides anything the pure module does not.

Secrets are read with `get` only, never listed or watched, so that RBAC can be a Role granting `get`
on Secrets: when a DataStore appears or changes, and every `secret_refresh_seconds`, which is how a
renewed certificate (cert-manager renews kamaji-etcd's a week before expiry) reaches us without a
copy or a restart.

TLS material as files, not in memory: the etcd client's ssl.SSLContext takes the CA from memory
(`cadata`) but a client certificate and key only from files (`load_cert_chain`), and the files keep
one code path with configured clusters (make_ssl_context checks them the same way). They live in a
directory of our own (mkdtemp: mode 0700, owned by the service's user), one directory per content,
`<root>/<cluster>/<sha256>/{ca.crt,tls.crt,tls.key}` (0600), written under a temporary name and
renamed into place, so that no reader ever sees half a file. New content means new paths, so a
changed ClusterConfig: the refresher then builds a new client with the new certificate. Directories
no cluster uses any more (an old version, a deleted DataStore) are removed once the new set is
adopted; the whole root at shutdown.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from exporter.config.settings import ClusterConfig, KamajiDataStores, TlsConfig
from exporter.core.launches import LaunchResult, RunState, Trigger
from exporter.etcd.tls import TlsFileError, make_ssl_context
from exporter.kubernetes import api as kube
from exporter.kubernetes.datastores import (
    DataStore,
    DataStoreError,
    Translation,
    material_bytes,
    parse_datastore,
    translate,
)
from exporter.launch.executor import Executor, ExecutorRejected, OnFinished
from exporter.launch.kubernetes import KubernetesExecutor

log = logging.getLogger(__name__)

Json = dict[str, Any]
RESTART_SECONDS = 10.0  # after an unexpected failure of the watch loop
OnChange = Callable[[list[ClusterConfig]], None]


class TlsStore:
    """The DataStores' TLS material as files under a private directory (see the module docstring)."""

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        """The private directory, made at first use (mkdtemp: mode 0700, owned by us)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="etcd-autodefrag-tls-", dir=self.parent))
        return self._root

    def write(self, cluster: str, files: Mapping[str, bytes]) -> TlsConfig:
        """The files of one version of a cluster's material (written unless already there)."""
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name] + b"\0")
        directory = self.root / cluster / digest.hexdigest()[:16]
        if not directory.exists():
            (self.root / cluster).mkdir(mode=0o700, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root / cluster))
            try:
                for name, content in files.items():
                    fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        out.write(content)
                staging.rename(directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return TlsConfig(
            ca_file=directory / "ca.crt" if "ca.crt" in files else None,
            cert_file=directory / "tls.crt" if "tls.crt" in files else None,
            key_file=directory / "tls.key" if "tls.key" in files else None,
        )

    def prune(self, in_use: Mapping[str, TlsConfig | None]) -> None:
        """Remove every version no cluster in `in_use` (by name) points at."""
        if self._root is None:
            return
        for cluster_dir in self._root.iterdir():
            tls = in_use.get(cluster_dir.name)
            keep = tls.ca_file.parent if tls is not None and tls.ca_file is not None else None
            for version in cluster_dir.iterdir():
                if version != keep:
                    shutil.rmtree(version, ignore_errors=True)
            if keep is None:
                shutil.rmtree(cluster_dir, ignore_errors=True)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


class DataStoreDiscovery:
    """Keeps one cluster per etcd DataStore current; `on_change` gets the whole set on every change."""

    def __init__(
        self,
        settings: KamajiDataStores,
        on_change: OnChange,
        *,
        request_timeout: float = 10.0,
        store: TlsStore | None = None,
    ) -> None:
        self.api: Any = None  # the Kubernetes API client, given to run()
        self.settings = settings
        self.on_change = on_change
        self.request_timeout = request_timeout
        self.store = store or TlsStore()
        self.listed = False  # the first list has been turned into clusters
        self.datastores: dict[str, DataStore] = {}  # every etcd DataStore, by name
        self.translations: dict[str, Translation] = {}
        self._problems: dict[str, str] = {}  # the last reason logged per DataStore, to log a reason once
        self._lock = asyncio.Lock()

    def clusters(self) -> list[ClusterConfig]:
        """The clusters of the DataStores, as last published."""
        return [t.cluster for t in self.translations.values()]

    def tenants(self) -> dict[str, tuple[str, ...]]:
        """`status.usedBy` of every etcd DataStore, by name."""
        return {name: ds.tenants for name, ds in self.datastores.items()}

    def owns(self, cluster: ClusterConfig) -> bool:
        """The cluster is one of ours as published (not a configured one of the same name)."""
        translation = self.translations.get(cluster.name)
        return translation is not None and translation.cluster == cluster

    def job_refusal(self, cluster: ClusterConfig) -> str | None:
        """Why no Job can run this cluster, if it is a discovered one that none can run, else None."""
        return self.translations[cluster.name].job_refusal if self.owns(cluster) else None

    async def run(self, api_client: Any) -> NoReturn:
        """Watch DataStores and re-read their Secrets periodically, until cancelled."""
        self.api = api_client
        rereads = asyncio.create_task(self._reread_forever())
        try:
            while True:
                try:
                    await kube.watch_datastores(
                        self.api,
                        self._listed,
                        self._changed,
                        label_selector=self.settings.label_selector,
                        request_timeout=self.request_timeout,
                    )
                except Exception:  # a bug of ours must not end the discovery silently
                    log.exception("following DataStores failed; starting again in %gs", RESTART_SECONDS)
                    await asyncio.sleep(RESTART_SECONDS)
        finally:
            rereads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rereads

    def close(self) -> None:
        """Remove the TLS files."""
        self.store.close()

    # --- what the watch reports -------------------------------------------------------------------

    async def _listed(self, items: list[Json]) -> None:
        async with self._lock:
            self.datastores = {}
            for item in items:
                if (datastore := self._parse(item)) is not None:
                    self.datastores[datastore.name] = datastore
            for name in [n for n in self._problems if n not in self.datastores]:
                del self._problems[name]
            await self._resolve(list(self.datastores.values()))
            self.listed = True

    async def _changed(self, kind: str, obj: Json) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        async with self._lock:
            if kind == "DELETED":
                self.datastores.pop(name, None)
                self._problems.pop(name, None)
                if self.translations.pop(name, None) is not None:
                    log.info("DataStore %s deleted: cluster %s removed", name, name)
                self._publish()
                return
            datastore = self._parse(obj)
            if datastore is None:
                self.datastores.pop(name, None)
                if self.translations.pop(name, None) is not None:
                    self._publish()
                return
            previous = self.datastores.get(name)
            self.datastores[name] = datastore
            if previous is not None and _same_spec(previous, datastore):
                self._publish()  # status only (its tenants): no Secret to read again
                return
            await self._resolve([datastore])

    async def _reread_forever(self) -> NoReturn:
        while True:
            await asyncio.sleep(self.settings.secret_refresh_seconds)
            try:
                async with self._lock:
                    await self._resolve(list(self.datastores.values()))
            except Exception:  # as in run(): log it, try again at the next period
                log.exception("reading the DataStores' Secrets again failed")

    # --- DataStore -> cluster ---------------------------------------------------------------------

    def _parse(self, obj: Json) -> DataStore | None:
        """The etcd DataStore, or None (logged once per reason) for another driver or a bad shape."""
        name = str((obj.get("metadata") or {}).get("name") or "")
        try:
            datastore = parse_datastore(obj)
        except DataStoreError as exc:
            self._note(name, str(exc))
            return None
        if not datastore.is_etcd:
            self._note(
                name,
                f"DataStore {name}: driver {datastore.driver}, not etcd: not watched",
                level=logging.INFO,
            )
            return None
        return datastore

    async def _resolve(self, datastores: list[DataStore]) -> None:
        """Read the Secrets of these DataStores (each once), translate them, publish the set."""
        secrets: dict[tuple[str, str], Json] = {}
        unreadable: dict[tuple[str, str], str] = {}
        for key in sorted({s for ds in datastores for s in ds.secrets()}):
            try:
                secrets[key] = await kube.read_secret(self.api, *key, timeout=self.request_timeout)
            except kube.KubeError as exc:
                unreadable[key] = str(exc)
        for datastore in datastores:
            missing = [
                f"Secret {ns}/{n}: {unreadable[(ns, n)]}"
                for ns, n in datastore.secrets()
                if (ns, n) in unreadable
            ]
            try:
                if missing:
                    raise DataStoreError(f"DataStore {datastore.name}: " + "; ".join(missing))
                translation = self._translate(datastore, secrets)
            except DataStoreError as exc:
                kept = datastore.name in self.translations
                self._note(datastore.name, f"{exc}" + ("; keeping what was read before" if kept else ""))
                continue
            if (
                self._problems.pop(datastore.name, None) is not None
                or datastore.name not in self.translations
            ):
                self._log_adopted(translation)
            elif translation.cluster != self.translations[datastore.name].cluster:
                log.info("DataStore %s changed: cluster %s updated", datastore.name, datastore.name)
            self.translations[datastore.name] = translation
        self._publish()

    def _translate(self, datastore: DataStore, secrets: Mapping[tuple[str, str], Json]) -> Translation:
        tls = None
        if datastore.tls is not None:
            try:
                tls = self.store.write(datastore.name, material_bytes(datastore.tls, secrets))
            except OSError as exc:  # our own directory: full, or removed under us
                raise DataStoreError(
                    f"DataStore {datastore.name}: cannot write its TLS files: {exc}"
                ) from None
            try:
                make_ssl_context(tls, cluster=datastore.name)
            except TlsFileError as exc:
                material = datastore.tls.materials()[
                    {"ca_file": "ca.crt", "cert_file": "tls.crt", "key_file": "tls.key"}[exc.setting]
                ]
                raise DataStoreError(
                    f"DataStore {datastore.name}: {material.describe()}: {exc.problem}"
                ) from None
        return translate(datastore, self.settings, tls)

    def _publish(self) -> None:
        self.translations = {n: t for n, t in self.translations.items() if n in self.datastores}
        self.on_change(self.clusters())
        self.store.prune({n: t.cluster.tls for n, t in self.translations.items()})

    def _log_adopted(self, translation: Translation) -> None:
        cluster = translation.cluster
        placement = (
            f"its Jobs run in namespace {cluster.kubernetes.namespace}"
            if cluster.kubernetes is not None
            else f"no defrag Job can run it: {translation.job_refusal}"
        )
        log.log(
            logging.INFO if cluster.kubernetes is not None else logging.WARNING,
            "DataStore %s: cluster %s at %s; %s",
            cluster.name,
            cluster.name,
            ", ".join(cluster.endpoints),
            placement,
            extra={"etcd_cluster": cluster.name},
        )

    def _note(self, name: str, problem: str, *, level: int = logging.WARNING) -> None:
        """Log a DataStore's problem once, until it changes or goes away."""
        if self._problems.get(name) != problem:
            self._problems[name] = problem
            log.log(level, "%s", problem)


def _same_spec(a: DataStore, b: DataStore) -> bool:
    """Equal but for the status (tenants) and the resourceVersion."""
    return (a.driver, a.endpoints, a.tls) == (b.driver, b.endpoints, b.tls)


class DataStoreJobs:
    """The service's executor, refusing with the reason a discovered cluster that no Job can run.

    A DataStore whose TLS material a Pod cannot mount has no `kubernetes` section, and the
    executor alone could only say so; this says why (inline content, the CA in another namespace).
    Everything else goes to the executor unchanged.
    """

    def __init__(self, executor: Executor, discovery: DataStoreDiscovery) -> None:
        self.executor = executor
        self.discovery = discovery

    async def start(self, on_finished: OnFinished) -> None:
        await self.executor.start(on_finished)

    async def stop(self) -> None:
        await self.executor.stop()

    def runs(self, clusters: Sequence[str]) -> dict[str, RunState]:
        return self.executor.runs(clusters)

    def follow(self, clusters: Sequence[ClusterConfig]) -> None:
        """Watch the Jobs of the clusters' namespaces, so that a Job still running from before a
        restart is seen running, and its end counted, without waiting for the next launch."""
        if isinstance(self.executor, KubernetesExecutor):
            for cluster in clusters:
                if cluster.kubernetes is not None:
                    self.executor.watch_namespace(cluster.kubernetes.namespace)

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        if (reason := self.discovery.job_refusal(cluster)) is not None:
            raise ExecutorRejected(
                f"cluster {cluster.name}: DataStore {cluster.name}: no defrag Job can run it: {reason}"
            )
        return await self.executor.launch(cluster, trigger)
