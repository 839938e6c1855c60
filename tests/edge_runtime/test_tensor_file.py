"""Streaming safetensors writer: what safetensors reads back, one tensor copied out at a time, bad dtypes named."""

import weakref

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from edge_runtime.bundle import write_adapter_file
from edge_runtime.tensor_file import WeightView, write_safetensors


def _tensors() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    return {
        "model.layers.1.mlp.down_proj.weight": generator.standard_normal((7, 5)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.bias": generator.standard_normal(3).astype(np.float32),
        "half": generator.standard_normal((2, 3)).astype(np.float16),
        "codes": generator.integers(-128, 127, (4, 4), dtype=np.int8),
        "scalar": np.array(2.5, dtype=np.float64),
        "transposed": np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not contiguous
    }


def test_safetensors_reads_back_every_tensor_and_the_metadata(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "test", "note": "ünïcode"})
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name
    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as opened:
        assert opened.metadata() == {"format": "test", "note": "ünïcode"}


def test_a_lazy_view_has_at_most_one_tensor_copied_out_at_a_time(tmp_path):
    source = {f"w{i}": np.full((64, 64), i, dtype=np.float32) for i in range(6)}
    alive, most, reads = set(), [0], []

    def read(name: str) -> np.ndarray:
        copy = source[name].copy()
        token = object()
        alive.add(token)
        most[0] = max(most[0], len(alive))
        weakref.finalize(copy, alive.discard, token)
        reads.append(name)
        return copy

    write_safetensors(tmp_path / "w.safetensors", WeightView(source, read), {})
    assert most[0] == 1
    assert sorted(reads) == sorted([*source, *source])  # each read twice: its shape, then its bytes
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(np.array_equal(loaded[name], value) for name, value in source.items())


def test_a_dtype_safetensors_cannot_hold_here_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'flags' has dtype bool"):
        write_safetensors(tmp_path / "w.safetensors", {"flags": np.zeros(3, dtype=bool)}, {})


def test_an_adapter_file_from_a_view_is_written_whole_and_atomically(tmp_path):
    tensors = {name: value for name, value in _tensors().items() if value.dtype == np.float32}
    write_adapter_file(tmp_path / "adapter.safetensors", WeightView(tensors, tensors.__getitem__), {"bottom": 2})
    assert [path.name for path in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary left beside it
    loaded = load_file(str(tmp_path / "adapter.safetensors"))
    assert all(np.array_equal(loaded[name], value) for name, value in tensors.items())
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="numpy") as opened:
        assert opened.metadata()["bottom"] == "2"


def test_a_view_refuses_a_name_it_does_not_hold():
    view = WeightView(["a"], lambda name: np.zeros(1, np.float32))
    with pytest.raises(KeyError):
        view["b"]
    assert list(view) == ["a"] and len(view) == 1
