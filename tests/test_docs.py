"""The reference docs that describe code are generated from it, and fail here when stale.

docs/configuration.md comes from the settings model, docs/metrics.md from a real scrape of `serve`
against real etcd. `make docs` (REGENERATE_DOCS=1) rewrites both instead of failing.
"""

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster

from exporter.config.settings import ClusterConfig, Settings
from exporter.service.app import create_app

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = os.environ.get("REGENERATE_DOCS") == "1"

_spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
assert _spec is not None
assert _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def check(path: Path, text: str) -> None:
    if REGENERATE:
        path.write_text(text)
        return
    assert path.read_text() == text, f"{path.name} is stale: run `make docs`"


def test_configuration_reference_is_generated_from_the_settings_model() -> None:
    check(generate.CONFIGURATION, generate.configuration_markdown())


def test_configuration_reference_names_every_setting() -> None:
    text = generate.configuration_markdown()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
    for name in ClusterConfig.model_fields:
        assert f"| `clusters[].{name}` |" in text


@pytest.mark.etcd
async def test_metrics_reference_is_generated_from_a_real_scrape(
    etcd: EtcdCluster, aiohttp_client: Callable[..., Any]
) -> None:
    cluster = ClusterConfig(name="main", endpoints=etcd.endpoints[:1])
    app = create_app(Settings(executor={"dry_run": True}), clusters=[cluster])
    client: TestClient = await aiohttp_client(app)
    response = await client.get("/metrics")
    assert response.status == 200
    text = generate.metrics_markdown(await response.text())
    assert "| `etcd_autodefrag_db_free_bytes` | gauge |" in text
    check(generate.METRICS, text)
