"""What a launched run is handed: the cluster the service resolved, as data. Pure: no I/O.

The service decides on a cluster as it holds it in memory: its configuration as last loaded, with the
endpoints (and kamaji-etcd certificate layout) discovered from the Kubernetes API. A run that re-read
the config file by `--cluster NAME` could act on something else after an edit or a SIGHUP, or not
find its cluster at all; a Job read its own copy of the file from a ConfigMap in its namespace,
which could differ again. So the run gets the resolved ClusterConfig itself, as JSON in
`defrag --cluster-json`, validated by the same model, and reads no config file (docs/run-handoff.md).
The local executor puts it on the child's command line, the Kubernetes executor in the Job's
container args, where `kubectl get job -o yaml` shows it.

A ClusterConfig holds no secret: TLS settings are file paths, never their contents.
"""

from dataclasses import dataclass

from pydantic import ValidationError

from exporter.config.settings import ClusterConfig, LogFormat, Settings, format_validation_error

CLUSTER_JSON_FLAG = "--cluster-json"


def cluster_json(cluster: ClusterConfig) -> str:
    """The cluster as the run receives it: compact JSON of the fields that differ from the defaults.

    Defaults left out keep it short enough to read in a Job's spec, and let an image one release
    apart (a cluster's own `kubernetes.image`) read it as long as no field it lacks is set.
    """
    return cluster.model_dump_json(exclude_defaults=True)


def cluster_from_json(text: str) -> ClusterConfig:
    """The cluster a run was handed; ValueError with one line per problem when it is not one."""
    try:
        return ClusterConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = format_validation_error(exc).splitlines()[1:]
        raise ValueError("not a cluster configuration: " + "; ".join(p.strip() for p in problems)) from None


@dataclass(frozen=True)
class RunSettings:
    """The service-wide settings a run needs besides its cluster, handed over as flags too."""

    log_format: str = LogFormat.TEXT.value
    log_level: str = "INFO"

    @classmethod
    def from_settings(cls, settings: Settings) -> "RunSettings":
        """The run settings of this service."""
        return cls(log_format=settings.log_format.value, log_level=settings.log_level)

    def flags(self) -> list[str]:
        """`--log-format F --log-level L`, as `etcd-autodefrag defrag` takes them."""
        return ["--log-format", self.log_format, "--log-level", self.log_level]


DEFAULT_RUN_SETTINGS = RunSettings()


def run_args(cluster: ClusterConfig, run: RunSettings) -> list[str]:
    """`defrag --cluster-json ... --log-format ... --log-level ...`: what every launched run is given."""
    return ["defrag", CLUSTER_JSON_FLAG, cluster_json(cluster), *run.flags()]
