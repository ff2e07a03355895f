"""exporter.etcd.connect and exporter.etcd.tls: one client factory, one TLS error naming what to fix."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from exporter.config.settings import ClusterConfig
from exporter.etcd.client import EtcdClient
from exporter.etcd.connect import TlsFileError, client_factory, connection


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a client certificate with its key, and a key of another certificate."""
    ca = trustme.CA()
    mine, other = ca.issue_cert("client"), ca.issue_cert("other")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "client.pem",
        "key": tmp_path / "client-key.pem",
        "other_key": tmp_path / "other-key.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    mine.cert_chain_pems[0].write_to_path(str(files["cert"]))
    mine.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    return files


def cluster(**tls: Path) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "name": "tenant-a",
            "endpoints": ["https://127.0.0.1:2379"],
            "tls": {k: str(v) for k, v in tls.items()},
        }
    )


def test_usable_files_give_a_verifying_context(pki: dict[str, Path]) -> None:
    connected = connection(cluster(ca_file=pki["ca"], cert_file=pki["cert"], key_file=pki["key"]))
    assert connected.ssl_context is not None
    assert connected.ssl_context.check_hostname


def test_no_tls_settings_no_context() -> None:
    plain = ClusterConfig(name="plain", endpoints=["http://127.0.0.1:2379"])
    assert connection(plain).ssl_context is None


def encrypted_key(pki: dict[str, Path], path: Path) -> Path:
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("fault", "setting", "problem"),
    [
        ("missing CA", "ca_file", "no such file or directory"),
        ("key of another certificate", "key_file", "does not belong to the certificate"),
        ("encrypted key", "key_file", "encrypted; need an unencrypted key"),
        ("truncated key", "key_file", "its PEM private key cannot be parsed (truncated or damaged?)"),
    ],
)
def test_an_unusable_file_names_the_cluster_the_setting_and_the_file(
    pki: dict[str, Path], tmp_path: Path, fault: str, setting: str, problem: str
) -> None:
    files = {"ca_file": pki["ca"], "cert_file": pki["cert"], "key_file": pki["key"]}
    if fault == "missing CA":
        files["ca_file"] = tmp_path / "nonexistent.pem"
    elif fault == "key of another certificate":
        files["key_file"] = pki["other_key"]
    elif fault == "encrypted key":
        files["key_file"] = encrypted_key(pki, tmp_path / "encrypted.pem")
    else:
        truncated = tmp_path / "truncated.pem"
        text = pki["key"].read_text()
        truncated.write_text(text[: len(text) // 2] + "\n-----END PRIVATE KEY-----\n")
        files["key_file"] = truncated
    with pytest.raises(TlsFileError) as caught:
        connection(cluster(**files))
    error = caught.value
    assert (error.cluster, error.setting, error.path) == ("tenant-a", setting, files[setting])
    assert problem in error.problem
    assert str(error).startswith(f"cluster tenant-a: tls.{setting} {files[setting]}: ")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize(
    ("request_timeout", "cap", "expected"), [(5.0, 2.0, 2.0), (1.5, 2.0, 1.5), (5.0, None, 5.0)]
)
async def test_the_factory_caps_the_request_timeout(
    session: aiohttp.ClientSession, request_timeout: float, cap: float | None, expected: float
) -> None:
    config = ClusterConfig(
        name="c", endpoints=["http://127.0.0.1:2379"], request_timeout_seconds=request_timeout
    )
    client = client_factory(session, max_timeout_seconds=cap)(config)
    assert isinstance(client, EtcdClient)
    assert client.timeout_seconds == expected
