"""One server process with its own log file: the etcd harness's, the control plane's and the demo's.

A child is tied to the thread that started it (PR_SET_PDEATHSIG), so a test run or a demo that dies
leaves no server behind.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL_LINES = 40
STOP_TIMEOUT_SECONDS = 15.0


def die_with_parent(death_signal: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel send `death_signal` to the child when its spawner dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only safe to use from the
    main thread (a child started from a worker thread would die with that thread): elsewhere None.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    number = int(death_signal)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, number)

    return preexec


class AlreadyRunning(RuntimeError):
    """`start` on a process that runs."""


@dataclass(eq=False)
class ServerProcess:
    """One server process, logging to its own file; `start` after `stop` restarts it.

    `own_session`: a Ctrl-C in the terminal reaches only the parent, which then stops its children
    in order (the demo). `death_signal`: what the child gets when the parent dies.
    """

    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    own_session: bool = False
    death_signal: signal.Signals = signal.SIGKILL
    stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.running:
            raise AlreadyRunning(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- starting {self.name} at {time.time():.3f}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=self.own_session,
                preexec_fn=die_with_parent(self.death_signal),
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL if it has not exited within the timeout."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(self.stop_timeout_seconds if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of its log, headed by its name, log path and exit code."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = "(no log)"
        return f"--- {self.name} ({self.log_path}), exit code {self.exit_code}:\n" + "\n".join(
            text.splitlines()[-lines:]
        )
