"""Kubernetes' name syntax, checked in one place (exporter/core/names.py)."""

import re
from pathlib import Path

import pytest

from exporter.config.settings import ConfigError, load_settings
from exporter.core.names import is_dns_label, is_dns_subdomain


@pytest.mark.parametrize(
    ("text", "label", "subdomain"),
    [
        ("a", True, True),
        ("tenant-a", True, True),
        ("0abc9", True, True),
        ("a" * 63, True, True),
        ("a" * 64, False, True),
        ("kamaji-etcd.kamaji-system", False, True),
        ("cluster.local", False, True),
        ("", False, False),
        ("-a", False, False),
        ("a-", False, False),
        ("A", False, False),
        ("a_b", False, False),
        ("a..b", False, False),
        (".a", False, False),
        ("a.", False, False),
        ("a\n", False, False),  # `re.match` with `$` let a trailing newline through
        ("tenant-\u0430", False, False),  # a Cyrillic a
        ("a" * 254, False, False),
    ],
)
def test_dns_names(text: str, label: bool, subdomain: bool) -> None:
    assert is_dns_label(text) is label
    assert is_dns_subdomain(text) is subdomain


def test_a_shorter_limit_applies_and_a_longer_one_cannot_widen_kubernetes() -> None:
    assert is_dns_label("a" * 40, max_chars=40)
    assert not is_dns_label("a" * 41, max_chars=40)
    assert not is_dns_label("a" * 64, max_chars=100)
    assert not is_dns_subdomain("a" * 201, max_chars=200)


@pytest.mark.parametrize(
    ("yaml_text", "where"),
    [
        ("clusters: [{name: 'tenant-a\\n', endpoints: [http://127.0.0.1:2379]}]", "clusters[0].name"),
        (
            "clusters: [{name: a, endpoints: [http://127.0.0.1:2379], kubernetes: {namespace: 'etcd\\n'}}]",
            "clusters[0].kubernetes.namespace",
        ),
    ],
)
def test_settings_refuse_a_name_with_a_trailing_newline(yaml_text: str, where: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(f"{where}: must")):
        load_settings(path)
