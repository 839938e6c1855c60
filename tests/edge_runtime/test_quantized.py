"""Frozen weights stored as int8: within half a step of the floats, exact on a coarser grid, and used without a
lasting float copy."""

import pytest
import torch
from torch import nn

from coordinator.compression import luc
from edge_runtime import quantized
from edge_runtime.quantized import QuantizedEmbedding, QuantizedLinear, dequantize, quantize_rows


def test_dequantized_weights_are_within_half_a_step_of_the_floats():
    weights = torch.randn(12, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 12)[:, None]
    values, scale = quantize_rows(weights)
    assert values.dtype == torch.int8 and scale.dtype == torch.float32 and int(values.abs().max()) == 127
    error = (dequantize(values, scale) - weights).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())
    assert float(error.max()) > 0  # it is a real rounding, not a copy


@pytest.mark.parametrize("bits", [4, 8])
def test_a_matrix_already_on_a_compression_grid_is_stored_exactly(bits):
    weights = luc.quantize_rows(torch.randn(8, 24, generator=torch.Generator().manual_seed(1)), bits)
    values, scale = quantize_rows(weights, bits)
    torch.testing.assert_close(dequantize(values, scale), weights, rtol=0, atol=1e-6)
    assert int(values.abs().max()) == 2 ** (bits - 1) - 1


def test_quantized_linear_computes_with_its_dequantized_weight_and_keeps_only_int8_for_backward():
    layer = nn.Linear(16, 8, bias=False)
    stored = QuantizedLinear(*quantize_rows(layer.weight))
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    out = stored(hidden)
    reference = hidden.detach().clone().requires_grad_(True)
    expected = reference @ dequantize(stored.weight_values, stored.weight_scale).t()
    torch.testing.assert_close(out, expected)
    assert {tensor.dtype for tensor in out.grad_fn.saved_tensors} == {torch.int8, torch.float32}
    assert all(tensor.numel() in (8 * 16, 8) for tensor in out.grad_fn.saved_tensors)  # values and scales only
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(hidden.grad, reference.grad)


def test_a_layer_first_used_under_inference_mode_still_trains_after():
    """The dequantization buffer made during an evaluation (inference_mode) is reused by training (was a
    RuntimeError: inplace update to an inference tensor)."""
    stored = QuantizedLinear(*quantize_rows(nn.Linear(24, 12, bias=False).weight))
    with torch.inference_mode():
        evaluated = stored(torch.randn(2, 24))
    hidden = torch.randn(2, 24, requires_grad=True)
    stored(hidden).sum().backward()
    assert evaluated.shape == (2, 12) and hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_a_large_head_is_dequantized_in_slices_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    head = QuantizedLinear(*quantize_rows(torch.randn(50, 16)))
    hidden = torch.randn(4, 16, requires_grad=True)
    whole = head(hidden)
    monkeypatch.setattr(quantized, "CHUNK_BYTES", 4 * 16 * 7)  # 7 rows a slice: 8 slices, the last one short
    sliced = head(hidden)
    assert sliced.grad_fn.name() == "CatBackward0"
    torch.testing.assert_close(sliced, whole)
    (grad_sliced,) = torch.autograd.grad(sliced.square().sum(), hidden)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), hidden)
    torch.testing.assert_close(grad_sliced, grad_whole, rtol=1e-5, atol=1e-4)  # sums in another order


def test_the_quantized_embedding_looks_up_dequantized_rows():
    table = torch.randn(30, 8)
    embedding = QuantizedEmbedding(*quantize_rows(table))
    ids = torch.tensor([[0, 5, 29], [3, 3, 7]])
    expected = dequantize(embedding.weight_values, embedding.weight_scale)[ids]
    torch.testing.assert_close(embedding(ids), expected)
    assert embedding.embedding_dim == 8 and embedding.num_embeddings == 30


def test_bits_outside_int8_are_refused():
    with pytest.raises(ValueError, match=r"must be in 2\.\.8"):
        quantize_rows(torch.ones(2, 2), 16)
