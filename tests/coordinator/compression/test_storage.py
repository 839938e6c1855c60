"""`store=int8`: the middle and the embedding held as int8 for real, adapter layers float32, layerwise compression's
grid kept exactly, and the saved emulator loading back to the same logits without float weights."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.compression import EmulatorSpec, luc, make_emulator
from coordinator.compression.storage import store_frozen
from coordinator.emulator import Split, build_emulator, emulator_record, set_emulator_record
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.quantized import QuantizedEmbedding, QuantizedLinear, dequantize, storage_record, stored_bytes
from exporters.device_bundle import _save_emulator
from tests.conftest import make_model

SPLIT = Split(bottom=1, top=1, keep=2)


def tied_llama():
    """A tiny LLaMA whose head is its token embedding, as SmolLM2's is."""
    config = make_model("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_int8_storage_quantizes_the_middle_and_the_embedding_and_leaves_the_adapter_layers_float(tied):
    model = tied_llama() if tied else make_model("llama")
    floats = make_emulator(model, SPLIT, EmulatorSpec.parse("uniform"))
    emulator = make_emulator(model, SPLIT, EmulatorSpec.parse("uniform:store=int8"))
    layers = emulator.model.layers
    assert all(isinstance(layers[i].mlp.up_proj, QuantizedLinear) for i in (1, 2))
    assert all(type(layers[i].mlp.up_proj) is torch.nn.Linear for i in (0, 3))  # the adapter layers
    assert isinstance(emulator.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(emulator.lm_head, QuantizedLinear)
    assert (emulator.lm_head.weight_values is emulator.model.embed_tokens.weight_values) == tied
    assert {p.dtype for p in emulator.parameters()} == {torch.float32}
    middle, float_middle = stored_bytes(emulator.model.layers[1]), stored_bytes(floats.model.layers[1])
    assert middle < 0.3 * float_middle  # a quarter, plus a float scale per row and the float norms
    assert storage_record(emulator)["tied_head"] == ("lm_head" if tied else None)
    assert emulator_record(emulator).details["storage"]["stored_bytes"] == stored_bytes(emulator)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():  # 8-bit rounding moves the logits a little, not a lot
        gap = (emulator(ids).logits - floats(ids).logits).abs().max() / floats(ids).logits.abs().max()
    assert 0 < float(gap) < 0.05


def test_a_layer_layerwise_compression_put_on_a_4_bit_grid_is_stored_on_that_grid_exactly():
    emulator = build_emulator(make_model("llama"), SPLIT)
    compressed = emulator.model.layers[1].mlp.down_proj
    with torch.no_grad():
        compressed.weight.copy_(luc.quantize_rows(compressed.weight, 4))
    expected = compressed.weight.detach().clone()
    record = emulator_record(emulator)
    layers = [{"sparsity": 0.0, "bits": 4}, {"sparsity": 0.0, "bits": 32}]
    set_emulator_record(emulator.config, replace(record, details={"layers": layers}))
    store_frozen(emulator, SPLIT, "int8")
    stored = emulator.model.layers[1].mlp.down_proj
    assert int(stored.weight_values.abs().max()) == 7
    torch.testing.assert_close(dequantize(stored.weight_values, stored.weight_scale), expected, rtol=0, atol=1e-6)
    assert int(emulator.model.layers[2].mlp.down_proj.weight_values.abs().max()) == 127


def test_a_saved_int8_emulator_loads_back_to_the_same_logits_with_int8_tensors(tmp_path):
    emulator = make_emulator(tied_llama(), SPLIT, EmulatorSpec.parse("uniform:store=int8"))
    _save_emulator(emulator, tmp_path)
    loaded = load_causal_lm(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, QuantizedLinear)
    assert loaded.lm_head.weight_values is loaded.model.embed_tokens.weight_values
    assert loaded.model.layers[1].self_attn.q_proj.weight_values.dtype == torch.int8
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, emulator(ids).logits, rtol=0, atol=0)
    assert stored_bytes(loaded) == stored_bytes(emulator)
