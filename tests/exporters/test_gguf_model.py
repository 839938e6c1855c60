"""GGUF writing on tiny LLaMA models: names, types, llama.cpp's rotary row order, metadata, LoRA adapters, refusals."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants
from transformers import LlamaConfig, LlamaForCausalLM

from coordinator.errors import ConfigError, ModelSourceError
from exporters.gguf_model import read_gguf, write_lora_gguf, write_model_gguf
from tests.conftest import make_model

F32, F16, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0


def _source(path, model, **changed):
    """A minimal source GGUF for `model`: the hyper-parameters the writer checks and a tokenizer list to copy."""
    config = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_type("model")
    values = {
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.attention.head_count": config.num_attention_heads,
    } | changed
    for key, value in values.items():
        writer.add_uint32(key, value)
    writer.add_key_value(
        "tokenizer.ggml.tokens", [f"t{i}" for i in range(8)], GGUFValueType.ARRAY, GGUFValueType.STRING
    )
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(path) -> dict:
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def _values(tensor) -> np.ndarray:
    """A tensor's float values in numpy's (rows, columns) order, dequantized."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.tensor_type == Q8_0:
        return quants.dequantize(tensor.data, Q8_0).reshape(shape)
    return np.asarray(tensor.data, dtype=np.float32).reshape(shape)


def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order written out by index: within each head, row 2i+j is transformers' row j*half+i."""
    size = weight.shape[0] // heads
    half = size // 2
    order = [h * size + j * half + i for h in range(heads) for i in range(half) for j in range(2)]
    return weight[order]


def test_a_model_is_written_under_gguf_names_with_llama_cpps_rotary_rows(tmp_path):
    model = make_model("llama", num_layers=2)
    out = write_model_gguf(model, _source(tmp_path / "source.gguf", model), tmp_path / "m.gguf", "f32").path
    tensors = _tensors(out)
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(2) for part in layer}
    assert set(tensors) == expected
    attention = model.model.layers[1].self_attn
    q, k = attention.q_proj.weight.detach().numpy(), attention.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_q.weight"]), _llama_cpp_rows(q, 4))
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_k.weight"]), _llama_cpp_rows(k, 2))  # 2 KV heads
    v = attention.v_proj.weight.detach().numpy()
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_v.weight"]), v)


def test_metadata_and_tokenizer_come_from_the_source_and_the_header_names_the_type(tmp_path):
    model = make_model("llama", num_layers=2)
    out = write_model_gguf(model, _source(tmp_path / "s.gguf", model), tmp_path / "m.gguf", "q8_0").path
    fields = GGUFReader(out).fields
    assert fields["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(8)]
    assert fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q8_0
    assert fields["general.type"].contents() == "model" and fields["general.architecture"].contents() == "llama"


def test_vectors_stay_float32_and_q8_0_keeps_rows_its_blocks_do_not_divide_in_f16(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    source = _source(tmp_path / "s.gguf", model)
    types = {
        name: t.tensor_type
        for name, t in _tensors(write_model_gguf(model, source, tmp_path / "q.gguf", "q8_0").path).items()
    }
    assert types["blk.0.attn_norm.weight"] == F32
    assert types["blk.0.attn_q.weight"] == F16  # rows of 48 values: no whole number of 32-value Q8_0 blocks
    assert types["blk.0.ffn_down.weight"] == Q8_0  # rows of 64
    f16 = write_model_gguf(model, source, tmp_path / "h.gguf", "f16").path
    assert {t.tensor_type for t in _tensors(f16).values()} == {F16, F32}


def test_trained_biases_are_written_in_rotary_order_and_zero_ones_left_out(tmp_path):
    model = make_model("llama", num_layers=2)
    for layer in model.model.layers:
        layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    model.model.layers[0].self_attn.q_proj.bias.data = torch.arange(32, dtype=torch.float32)
    tensors = _tensors(write_model_gguf(model, _source(tmp_path / "s.gguf", model), tmp_path / "m.gguf", "f16").path)
    assert "blk.0.attn_q.bias" in tensors and "blk.1.attn_q.bias" not in tensors
    expected = _llama_cpp_rows(np.arange(32, dtype=np.float32)[:, None], 4)[:, 0]
    np.testing.assert_array_equal(_values(tensors["blk.0.attn_q.bias"]), expected)


def test_a_lora_adapter_is_written_as_llama_cpp_reads_one(tmp_path):
    model = make_model("llama", num_layers=2)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for module, out_features in (("model.layers.1.self_attn.q_proj", 32), ("model.layers.1.self_attn.v_proj", 16)):
        weights[f"{module}.lora_A"] = torch.randn(8, 32, generator=generator)
        weights[f"{module}.lora_B"] = torch.randn(out_features, 8, generator=generator)
    out = write_lora_gguf(model, weights, 16.0, _source(tmp_path / "s.gguf", model), tmp_path / "lora.gguf").path
    reader = GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora" and reader.fields["adapter.lora.alpha"].contents() == 16
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == {f"blk.1.attn_{p}.weight.lora_{x}" for p in ("q", "v") for x in ("a", "b")}
    q_a, q_b = (weights[f"model.layers.1.self_attn.q_proj.lora_{x}"].numpy() for x in "AB")
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_q.weight.lora_a"]), q_a)
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_q.weight.lora_b"]), _llama_cpp_rows(q_b, 4))
    del weights["model.layers.1.self_attn.v_proj.lora_B"]
    with pytest.raises(ConfigError, match=r"only one of model.layers.1.self_attn.v_proj.lora_A and .lora_B"):
        write_lora_gguf(model, weights, 16.0, tmp_path / "s.gguf", tmp_path / "half.gguf")
    assert not (tmp_path / "half.gguf").exists()


def test_a_source_of_another_model_or_a_bad_type_is_refused_and_nothing_is_written(tmp_path):
    model = make_model("llama", num_layers=2)
    other = _source(tmp_path / "other.gguf", model, **{"llama.block_count": 30})
    with pytest.raises(ConfigError, match=r"llama.block_count = 30 but the model has 2"):
        write_model_gguf(model, other, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match=r"--gguf-type 'q4' is not one of f32, f16, q8_0"):
        write_model_gguf(model, other, tmp_path / "m.gguf", "q4")
    with pytest.raises(ConfigError, match=r"knows the llama layout, not 'gpt2'"):
        write_model_gguf(make_model("gpt2", num_layers=2), other, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_a_truncated_or_foreign_file_is_refused_by_name(tmp_path):
    model = make_model("llama", num_layers=2)
    whole = write_model_gguf(model, _source(tmp_path / "s.gguf", model), tmp_path / "m.gguf", "f32").path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) - 100])
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04" + bytes(500))
    with pytest.raises(ModelSourceError, match=r"cut.gguf is truncated or corrupt: its header reads but its tensors"):
        read_gguf(tmp_path / "cut.gguf")
    with pytest.raises(ModelSourceError, match=r"foreign.gguf is not a GGUF file \(it does not start with 'GGUF'\)"):
        read_gguf(tmp_path / "foreign.gguf")
    with pytest.raises(ModelSourceError, match=r"absent.gguf does not exist"):
        read_gguf(tmp_path / "absent.gguf")
