"""ruff lints every Python file of the repository, and finds nothing."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ruff = shutil.which("ruff")
pytestmark = pytest.mark.skipif(ruff is None, reason="ruff is not installed (pip install -e '.[dev]')")


def _tracked_python_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {p for p in out.splitlines() if (ROOT / p).exists()}


def test_ruff_covers_every_python_file():
    """A folder that linters take for build output (dist/, build/) would silently drop out of the lint."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    shown = subprocess.run([ruff, "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    linted = {str(Path(line.strip()).resolve().relative_to(ROOT)) for line in shown.splitlines() if line.strip().endswith(".py")}
    tracked = _tracked_python_files()
    assert tracked, "git ls-files found no Python file"
    missing = sorted(tracked - linted)
    assert not missing, f"ruff does not lint {missing}"
    assert {p.split("/")[0] for p in tracked} >= {"ospfn", "kernels", "recipes", "bench", "tests", "setup.py"}


def test_ruff_finds_nothing():
    r = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
