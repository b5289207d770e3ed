"""The reference libraries the parity tests compare against (diffusers, transformers, nudenet, ...: the
oracles). Missing, their tests skip with a one-line reason, so `pip install -e . pytest && pytest` runs every
test that needs only the package. CI sets MSD_REQUIRE_ORACLES=1: then a missing oracle fails instead."""
import importlib
import os

import pytest

INSTALL = 'pip install -e ".[test,eval]"'


def oracle(module: str):
    """Import an oracle module, or skip the calling test (module) when it is not installed."""
    if os.environ.get("MSD_REQUIRE_ORACLES") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"oracle {module} is not installed ({INSTALL})")
