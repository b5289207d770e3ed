"""Weight files: bad input gives a clear error that names the problem, and nothing is half-loaded."""
import os

import pytest
import torch
from safetensors.torch import save_file

from mini_safediff.io import atomic_write
from mini_safediff.models.weights import WeightsError, load_strict, read_state_dict, save_state_dict


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)


def test_missing_unexpected_and_wrong_shape_keys_are_named_and_nothing_is_loaded():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"proj.weight": torch.ones(4, 5), "proj.bias": torch.ones(4), "norm.weight": torch.ones(4),
           "extra.weight": torch.ones(1)}
    with pytest.raises(WeightsError) as err:
        load_strict(model, bad, "model.safetensors")
    message = str(err.value)
    assert "model.safetensors" in message
    assert "missing keys (1)" in message and "norm.bias" in message
    assert "unexpected keys (1)" in message and "extra.weight" in message
    assert "proj.weight: file (4, 5) vs model (4, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_strict_load_round_trip(tmp_path):
    model, other = Tiny(), Tiny()
    save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    load_strict(other, read_state_dict(tmp_path / "w.safetensors"), "w")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"unet\.safetensors: not a readable safetensors file, truncated or corrupt"):
        read_state_dict(path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode()}, path)
    with pytest.raises(WeightsError, match=r"evil\.ckpt: refused: this pickle needs arbitrary code"):
        read_state_dict(path)


def test_plain_ckpt_is_read_through_the_safe_loader(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "global_step": 7}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))


def test_truncated_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.ckpt: not a readable checkpoint, truncated or corrupt"):
        read_state_dict(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(WeightsError, match="weight file not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weight file type '.onnx'"):
        read_state_dict(tmp_path / "w.onnx")


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.zeros(2)}, path)

    def crash_midway(tmp):
        open(tmp, "wb").write(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_midway)
    assert torch.equal(read_state_dict(path)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
