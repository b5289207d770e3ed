"""The oracle rule of tests/oracles.py: a missing reference library skips its tests with a reason, except under
CI (MSD_REQUIRE_ORACLES=1, set by .ci/run), where it fails them."""
from pathlib import Path

import pytest
from oracles import oracle

MISSING = "a_reference_library_that_is_not_installed"


def test_a_missing_oracle_skips_with_a_reason(monkeypatch):
    monkeypatch.delenv("MSD_REQUIRE_ORACLES", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"oracle {MISSING} is not installed"):
        oracle(MISSING)


def test_a_missing_oracle_fails_when_ci_requires_them(monkeypatch):
    monkeypatch.setenv("MSD_REQUIRE_ORACLES", "1")
    with pytest.raises(ModuleNotFoundError):
        oracle(MISSING)


def test_ci_requires_them():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "MSD_REQUIRE_ORACLES=1 python3 -m pytest" in ci
