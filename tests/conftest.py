import pytest

import mini_safediff as msd
from tiny_models import saved_diffusers_pipeline


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny random SD1-style model saved by us in the diffusers layout."""
    folder = tmp_path_factory.mktemp("model")
    saved_diffusers_pipeline(folder / "ref", "sd1")
    msd.load_pipeline(folder / "ref", device="cpu").save(folder / "ours")
    return folder / "ours"
