"""etcd-autodefrag: fragmentation gauges and safe, alert-driven sequential defragmentation for etcd."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("etcd-autodefrag")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
