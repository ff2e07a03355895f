"""The reference docs that describe code are generated from it, and fail here when stale; the README
stays a front door, and every relative link in it and in docs/ resolves.

docs/configuration.md comes from the settings model, docs/metrics.md from a real scrape of `serve`
against real etcd. `make docs` (REGENERATE_DOCS=1) rewrites both instead of failing.
"""

import importlib.util
import os
import re
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


# --- the README as a front door, and links that resolve ------------------------------------------

ROOT = DOCS.parent
README = ROOT / "README.md"
README_MAX_LINES = 200
SET_UP_COMMANDS = ["make demo", "make test"]
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+).+?\1", re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and code spans, where a `[x](y)` is a link."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lowercased, punctuation dropped, spaces to '-'.

    Repeated headings get -1, -2, ... (github/cmark-gfm's anchor rules, as rendered on github.com).
    """
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text()))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("## The quorum gate: refused (exit 3)", "the-quorum-gate-refused-exit-3"),
        ("## From kamaji-etcd's `defrag.sh`", "from-kamaji-etcds-defragsh"),
        (
            "## Behaviour when something goes wrong: our CLI, `etcdctl defrag --cluster` and etcd-defrag",
            "behaviour-when-something-goes-wrong-our-cli-etcdctl-defrag---cluster-and-etcd-defrag",
        ),
        ("## Exporter: 1,000 members in 334 clusters", "exporter-1000-members-in-334-clusters"),
        ("## `clusters[].tls`", "clusterstls"),
    ],
)
def test_anchors_follow_githubs_slug_rules(heading: str, anchor: str) -> None:
    assert github_anchors(heading) == {anchor}


def test_repeated_headings_get_numbered_anchors() -> None:
    assert github_anchors("## Dry run\n\n## Dry run\n\n## Dry run\n") == {"dry-run", "dry-run-1", "dry-run-2"}


def test_readme_is_a_front_door_under_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move reference to docs/"


def test_readme_starts_with_the_two_set_up_commands_then_names_test_all() -> None:
    text = README.read_text()
    first_block = FENCE.search(text)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(0).splitlines()[1:-1]]
    assert [c for c in commands if c] == SET_UP_COMMANDS
    # No other command is named before them, and the full suite is the next one named after them.
    assert not re.findall(r"`make [\w-]+", text[: first_block.start()])
    assert re.findall(r"`make [\w-]+", text[first_block.end() :])[0] == "`make test-all"


def test_readme_links_every_doc() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked)
    assert missing == [], f"README's Documentation list lacks {missing}"


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file_and_anchor(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert broken == []


def test_architecture_names_every_module() -> None:
    """docs/architecture.md's module table lists every module of exporter/ and nothing that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(exporter/[a-z_/]+\.py)`", text))
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "exporter").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "exporter"
    }
    assert modules - listed == set(), "add these to docs/architecture.md"
    assert listed - modules == set(), "these are gone: remove them from docs/architecture.md"
