"""The webhook's credentials: read from the settings and their files, and checked per request.

A bearer token or basic auth, compared in constant time over the bytes that were sent; an open
webhook only on loopback. The token and password files are followed when they change (a rotated
Kubernetes Secret), by the handler through `secret_stamps`.
"""

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from exporter.config.settings import ConfigError, Settings


@dataclass(frozen=True)
class Credentials:
    """What a request must present; both None means the webhook is open (loopback only)."""

    token: SecretStr | None = None
    basic: tuple[str, SecretStr] | None = None

    @property
    def open(self) -> bool:
        """No authentication configured."""
        return self.token is None and self.basic is None


def _read_secret(path: Path, what: str) -> SecretStr:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"webhook.{what}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"webhook.{what}: {path} is empty")
    return SecretStr(value)


def load_credentials(settings: Settings) -> Credentials:
    """Secrets from the settings and their files, checked against where the service listens.

    An open webhook (no token, no basic auth) is allowed only on a loopback address: anyone who can
    reach it could otherwise launch defrag runs.
    """
    webhook = settings.webhook
    token = webhook.token
    if webhook.token_file is not None:
        token = _read_secret(webhook.token_file, "token_file")
    if token is not None and not token.get_secret_value().strip():
        raise ConfigError("webhook.token is empty")
    basic = None
    if webhook.basic_auth_username is not None:
        password = webhook.basic_auth_password
        if webhook.basic_auth_password_file is not None:
            password = _read_secret(webhook.basic_auth_password_file, "basic_auth_password_file")
        assert password is not None  # the settings validate that they come together
        basic = (webhook.basic_auth_username, password)
    credentials = Credentials(token, basic)
    if credentials.open and not is_loopback(settings.listen_host):
        raise ConfigError(
            f"the webhook has no credentials but the service listens on {settings.listen_address}, "
            "beyond this host: set webhook.token_file (or ETCD_AUTODEFRAG_WEBHOOK__TOKEN, or basic "
            "auth), or listen on 127.0.0.1"
        )
    return credentials


SECRET_CHECK_SECONDS = 1.0


def secret_stamps(paths: Sequence[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    """What tells a changed file: modification time, size and inode (None: cannot stat)."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; any other name or address counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, credentials: Credentials) -> bool:
    """Whether the Authorization header carries the bearer token or the basic credentials.

    Any bytes at all are a yes or a no, never an error: aiohttp hands header values over decoded
    as UTF-8 with `surrogateescape`, so encoding them back the same way gives the bytes that were
    sent, which are compared with the secret's UTF-8 bytes by hmac.compare_digest (constant time:
    the time taken says nothing about how much matched).
    """
    if credentials.open:
        return True
    if not header:
        return False
    try:
        raw = header.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding of bytes makes: not from the wire
        return False
    scheme, _, value = raw.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer" and credentials.token is not None:
        return hmac.compare_digest(value, credentials.token.get_secret_value().encode())
    if scheme.lower() == b"basic" and credentials.basic is not None:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        expected_user, expected_password = credentials.basic
        user_ok = hmac.compare_digest(user, expected_user.encode())
        password_ok = hmac.compare_digest(password, expected_password.get_secret_value().encode())
        return bool(sep) and user_ok and password_ok
    return False
