"""The exit codes of every command: one table, printed by every --help and kept equal to docs/cli.md."""

import logging
import textwrap
from enum import IntEnum

log = logging.getLogger("etcd_autodefrag")


class ExitCode(IntEnum):
    """Every exit code of every command; `--help` prints EXIT_CODE_MEANINGS, docs/cli.md the same."""

    OK = 0
    FAILED = 1
    USAGE = 2
    REFUSED = 3
    DEFERRED = 75  # EX_TEMPFAIL: try again later
    INTERRUPTED = 130  # 128 + SIGINT
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe ended


EXIT_CODE_MEANINGS = {
    ExitCode.OK: "success: the run defragmented, had nothing to do, or was a dry run; `status`: every "
    "member answered; `serve`: stopped by SIGTERM or Ctrl-C",
    ExitCode.FAILED: "failed: a member's defrag failed or timed out, the cluster became unhealthy "
    "mid-run, the deadline passed; `serve`, `render --apply`: the Kubernetes API failed",
    ExitCode.USAGE: "bad usage or configuration: a flag, config file, environment variable, TLS file "
    "or listen address; the message names it. Nothing was contacted",
    ExitCode.REFUSED: "refused before touching anything: no endpoint answered, a voting member is down, "
    "a CORRUPT alarm, another run holds the lock, the defrag would stop a 1- or 2-member cluster; "
    "`status`: an endpoint or member did not answer",
    ExitCode.DEFERRED: "deferred: the cluster is changing (a member started within settle_seconds, a "
    "learner, the member list changed, a StatefulSet rollout); nothing was touched, try again later "
    "(`EX_TEMPFAIL`)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
    ExitCode.BROKEN_PIPE: "the output's reader went away (`status` piped into `head`); a defrag run had "
    "already ended",
}
EXIT_USAGE = ExitCode.USAGE


def exit_code_table() -> str:
    """The exit codes as `--help` prints them."""
    return "exit codes:\n" + "\n".join(
        textwrap.fill(meaning, width=100, initial_indent=f"  {int(code):<4} ", subsequent_indent=" " * 7)
        for code, meaning in EXIT_CODE_MEANINGS.items()
    )
