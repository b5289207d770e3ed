import subprocess
from pathlib import Path

import pytest
from builders import tiny_pipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny random SD1-style model saved by us in the diffusers layout."""
    folder = tmp_path_factory.mktemp("model") / "ours"
    tiny_pipeline("sd1").save(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory):
    """A tiny random SDXL-style model saved by us in the diffusers layout."""
    folder = tmp_path_factory.mktemp("sdxl-model") / "ours"
    tiny_pipeline("sdxl").save(folder)
    return folder


@pytest.fixture(autouse=True)
def work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: what a script writes relative to where it is started
    (runs/, results/, out/) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


def repository_files() -> str | None:
    """Untracked and changed files of the checkout (git status), or None outside a git checkout."""
    try:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.fixture(scope="session", autouse=True)
def repository_untouched():
    """The test suite writes nothing into the repository (checked once, after the last test)."""
    before = repository_files()
    yield
    after = repository_files()
    if before is not None:  # new files only: a tracked file edited while the tests run is a person at work
        ignore = ("__pycache__", ".pytest_cache", ".egg-info", ".ruff_cache")
        new = [line for line in set(after.splitlines()) - set(before.splitlines())
               if line[:2] in ("??", "!!") and not any(part in line for part in ignore)]
        assert not new, f"the tests wrote into the repository: {sorted(new)}"
