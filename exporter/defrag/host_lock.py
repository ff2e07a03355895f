"""One defrag run per etcd cluster on this host: an flock on a file named by etcd's cluster id.

The engine takes it as soon as it knows the cluster id, before it changes anything; the lock in etcd
(exporter.defrag.lock) is what keeps runs on different hosts apart.
"""

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from exporter.config.settings import ENV_PREFIX
from exporter.defrag.lock import LockUnavailable


def lock_directory() -> Path:
    """Where `defrag` keeps its per-cluster lock files: $ETCD_AUTODEFRAG_LOCK_DIR, else $TMPDIR."""
    return Path(os.environ.get(f"{ENV_PREFIX}LOCK_DIR") or tempfile.gettempdir())


@contextlib.contextmanager
def host_lock(cluster_id: int) -> Iterator[None]:
    """One defrag run per etcd cluster on this host, whatever flags or config named it.

    Keyed by etcd's own cluster id, so `--cluster a` and `--endpoints` of the same cluster exclude
    each other. Across hosts, the lock key in etcd and the Kubernetes Job name are the locks.
    The file is removed at the end, while still locked; a run that opened it just before then
    finds, once it holds the lock, that the path names another file (or none) and starts over.
    """
    path = lock_directory() / f"etcd-autodefrag-{cluster_id:x}.lock"
    for _ in range(3):
        try:
            handle = path.open("a")
        except OSError as exc:
            raise LockUnavailable(f"cannot open the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LockUnavailable(f"another defrag run on this cluster holds {path}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # removed by the run that just ended: lock the new file instead
    else:
        raise LockUnavailable(f"the lock file {path} keeps being replaced; try again")
    with handle:
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
