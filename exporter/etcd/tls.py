"""Client TLS for etcd: the cluster's `tls` settings checked and turned into an SSL context.

Every file is read and checked for the PEM block it must hold before OpenSSL sees it, because
OpenSSL's own errors name no file: the user gets the cluster, the setting and the path instead.
"""

import ssl
from pathlib import Path

from exporter.config.settings import TlsConfig


class TlsFileError(ValueError):
    """A TLS file cannot be used: which cluster, which `tls.*` setting, which file, and why."""

    def __init__(self, cluster: str, setting: str, path: Path, problem: str) -> None:
        super().__init__(f"cluster {cluster}: tls.{setting} {path}: {problem}")
        self.cluster = cluster
        self.setting = setting  # ca_file, cert_file or key_file
        self.path = path
        self.problem = problem


# What a PEM file of each kind must contain; checked before OpenSSL, whose errors name no file.
_PEM_MARKERS = {
    "ca_file": (b"-----BEGIN CERTIFICATE-----", "no PEM certificate in it (is it the CA bundle?)"),
    "cert_file": (b"-----BEGIN CERTIFICATE-----", "no PEM certificate in it"),
    "key_file": (b"PRIVATE KEY-----", "no PEM private key in it"),
}


def _pem_problem(setting: str, path: Path) -> str | None:
    """Why `path` is not a readable file holding that kind of PEM block, or None when it is."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    marker, problem = _PEM_MARKERS[setting]
    return None if marker in content else problem


def make_ssl_context(tls: TlsConfig, *, cluster: str) -> ssl.SSLContext:
    """An SSL context verifying members against the CA (or the system store) with the client cert.

    Raises TlsFileError naming the cluster, the setting and the file for a missing, unreadable or
    wrong file.
    """
    files = {"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}
    for setting, path in files.items():
        if path is not None and (problem := _pem_problem(setting, path)) is not None:
            raise TlsFileError(cluster, setting, path, problem)
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except ssl.SSLError:
        raise TlsFileError(
            cluster, "ca_file", tls.ca_file or Path(), "its PEM certificates cannot be parsed"
        ) from None
    if tls.cert_file:

        def no_password() -> str:
            # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
            raise TlsFileError(
                cluster,
                "key_file",
                tls.key_file or tls.cert_file or Path(),
                "encrypted; need an unencrypted key",
            )

        try:
            context.load_cert_chain(
                str(tls.cert_file), str(tls.key_file) if tls.key_file else None, no_password
            )
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problem = f"does not belong to the certificate {tls.cert_file}"
            elif exc.reason is None:  # "[SSL] PEM lib": the marker is there, the key is not
                problem = "its PEM private key cannot be parsed (truncated or damaged?)"
            else:
                problem = f"cannot be used with the certificate {tls.cert_file} ({exc.reason})"
            raise TlsFileError(cluster, "key_file", tls.key_file or tls.cert_file, problem) from None
    return context
