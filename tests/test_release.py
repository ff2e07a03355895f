"""Release artifacts: the wheel and sdist build, pass `twine check`, install into a clean venv and run;
the release workflow passes actionlint (built from its Go module, since the workflow cannot run here).

The artifact test is marked `slow` (a build and an install, about a minute with a warm pip cache):
`make test` leaves it out, `make test-all` (and the release workflow) runs it.
"""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from exporter import __version__

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
ACTIONLINT_VERSION = "v1.7.12"
ACTIONLINT_MODULE = f"github.com/rhysd/actionlint/cmd/actionlint@{ACTIONLINT_VERSION}"
# Outside the work tree, shared by every checkout: built once, then reused.
ACTIONLINT_DIR = Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
    "etcd-autodefrag",
    f"actionlint-{ACTIONLINT_VERSION}",
)


def run(command: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_and_sdist_build_pass_twine_and_install_into_a_clean_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"etcd_autodefrag-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"etcd_autodefrag-{__version__}.tar.gz"]
    checked = run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)], cwd=tmp_path
    )
    assert checked.stdout.count("PASSED") == 2

    # A clean venv (no project, no test tools), from a directory where `exporter/` is not importable.
    clean = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(clean)
    run(
        [str(clean / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheels[0])],
        cwd=tmp_path,
    )
    command = clean / "bin" / "etcd-autodefrag"
    assert run([str(command), "--version"], cwd=tmp_path).stdout.strip() == f"etcd-autodefrag {__version__}"
    usage = run([str(command), "--help"], cwd=tmp_path).stdout
    assert "exit codes:" in usage
    assert "defrag" in usage
    assert "status" in usage
    # The JSON Schemas ship in the wheel, where docs/cli.md says to find them.
    schemas = run(
        [
            str(clean / "bin" / "python"),
            "-c",
            "from importlib import resources; import exporter; "
            "print(sorted(p.name for p in (resources.files('exporter') / 'schemas').iterdir()))",
        ],
        cwd=tmp_path,
    ).stdout
    assert schemas.strip() == "['run-report.schema.json', 'status.schema.json']"
    # Without a target the installed command refuses, as from the source tree.
    refused = subprocess.run(
        [str(command), "defrag"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2
    assert "name the cluster with --cluster NAME" in refused.stderr


def actionlint() -> Path:
    """The actionlint binary, built with `go install` into the cache the first time."""
    binary = ACTIONLINT_DIR / "actionlint"
    if binary.exists():
        return binary
    go = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")  # not always on PATH
    if go is None:
        pytest.skip(f"Go is not installed: it builds actionlint from {ACTIONLINT_MODULE}")
    env = {**os.environ, "GOBIN": str(ACTIONLINT_DIR), "GOFLAGS": "-modcacherw"}
    result = subprocess.run(
        [go, "install", ACTIONLINT_MODULE], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert result.returncode == 0, f"go install {ACTIONLINT_MODULE} failed:\n{result.stderr}"
    return binary


def test_release_workflow_passes_actionlint(tmp_path: Path) -> None:
    linter = actionlint()
    result = subprocess.run(
        [str(linter), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter reads the file, not just its name: a broken copy fails.
    broken = tmp_path / "release.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs: dist", "needs: dsit"))
    result = subprocess.run(
        [str(linter), "-no-color", str(broken)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert 'job "pypi" needs job "dsit" which does not exist' in result.stdout


def test_release_workflow_does_what_a_release_needs() -> None:
    text = WORKFLOW.read_text()
    for part in (
        'tags: ["v*"]',
        "make test-all",
        "make dist",
        "pypa/gh-action-pypi-publish",
        "id-token: write",  # trusted publishing, no stored token
        "docker/setup-buildx-action",
        "platforms: linux/amd64,linux/arm64",
        "push: true",
    ):
        assert part in text, part
    assert "password: ${{ secrets.PYPI" not in text
