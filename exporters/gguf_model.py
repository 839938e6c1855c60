"""A tuned model, or a LoRA adapter, as a GGUF file llama.cpp loads, written with the `gguf` package's writer.

The metadata (hyper-parameters, tokenizer, chat template) comes from the model's source GGUF; the tensors from
the plugged-in PyTorch model, renamed by gguf's own tensor map. Two layout rules follow llama.cpp's converter
(`convert_hf_to_gguf.py`, LlamaModel): the query and key rows are permuted back to llama.cpp's rotary layout, and
one-dimensional tensors (norms, biases) stay float32 whatever the file type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    get_tensor_name_map,
    quants,
)
from gguf.constants import MODEL_ARCH
from transformers import PreTrainedModel

from coordinator.errors import ConfigError, ModelSourceError
from edge_runtime.adapter_modules import LORA_A, LORA_B
from edge_runtime.files import atomic_path

# What --gguf-type may name: the type of two-dimensional tensors, and the file type the header declares.
OUT_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# transformers model types whose GGUF layout this writer knows, and llama.cpp's name for the architecture.
ARCHITECTURES = {"llama": ("llama", MODEL_ARCH.LLAMA)}
# Keys the writer sets itself, or that describe the source file's tensors rather than the model.
_OWN_KEYS = ("general.architecture", "general.type", "general.file_type", "general.quantization_version")


@dataclass(frozen=True)
class GgufSummary:
    """What was written: the file, how many tensors it holds, its size in bytes."""

    path: Path
    tensors: int
    bytes: int


def read_gguf(path: Path) -> GGUFReader:
    """The GGUF at `path`, or ModelSourceError naming the file and what is wrong (absent, not GGUF, cut short)."""
    if not path.is_file():
        raise ModelSourceError(f"{path} does not exist; give the path of a .gguf file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as error:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (it does not start with 'GGUF')") from error
        raise ModelSourceError(
            f"{path} is truncated or corrupt: its header reads but its tensors do not ({error}); copy it again or "
            "write it again"
        ) from error


def field_value(reader: GGUFReader, key: str) -> object:
    """The value of metadata `key`, or ModelSourceError if the file lacks it."""
    field = reader.get_field(key)
    if field is None:
        raise ModelSourceError(f"GGUF metadata has no {key!r}: not a model file llama.cpp could load")
    return field.contents()


def _architecture(model: PreTrainedModel, source: GGUFReader) -> tuple[str, MODEL_ARCH]:
    """llama.cpp's architecture for `model`, checked against the source GGUF's hyper-parameters."""
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"writing GGUF knows the {', '.join(ARCHITECTURES)} layout, not {config.model_type!r}; save the model as "
            "a transformers folder (--out) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    name, arch = ARCHITECTURES[config.model_type]
    expected = {
        "general.architecture": name,
        f"{name}.block_count": config.num_hidden_layers,
        f"{name}.embedding_length": config.hidden_size,
        f"{name}.attention.head_count": config.num_attention_heads,
    }
    for key, value in expected.items():
        if field_value(source, key) != value:
            raise ConfigError(
                f"the source GGUF says {key} = {field_value(source, key)!r} but the model has {value!r}: it is not "
                "this model's source; pass the GGUF the model was loaded from"
            )
    return name, arch


def _copy_metadata(source: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in _OWN_KEYS:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' query/key rows in llama.cpp's rotary order (each head's two halves interleaved)."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _heads_of(name: str, model: PreTrainedModel) -> int | None:
    """How many heads a query or key tensor's rows hold; None for every other tensor."""
    if ".self_attn.q_proj." in name:
        return model.config.num_attention_heads
    if ".self_attn.k_proj." in name:
        return model.config.num_key_value_heads
    return None


def _tensors(model: PreTrainedModel, arch: MODEL_ARCH) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor under its GGUF name, float32, in llama.cpp's layout; all-zero biases left out (no bias)."""
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd when output.weight is absent
        if name.endswith(".bias") and not torch.any(tensor):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"{name} has no GGUF name in gguf's {arch.name} tensor map; it cannot be written")
        data = tensor.detach().to(torch.float32).numpy()
        heads = _heads_of(name, model)
        yield gguf_name, _rotary_rows(data, heads) if heads else data


def _encoded(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`data` in `qtype`; vectors stay float32, and rows Q8_0's 32-value blocks do not divide stay float16."""
    if data.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.F16 or data.shape[-1] % 32:
        return data.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(data, qtype), qtype


def _write(writer: GGUFWriter, out: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_gguf(model: PreTrainedModel, source: Path, out: Path, out_type: str = "f16") -> GgufSummary:
    """Write `model` (plugged in, float) as a GGUF model file at `out`, atomically, with `source`'s metadata."""
    if out_type not in OUT_TYPES:
        raise ConfigError(f"--gguf-type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    qtype, file_type = OUT_TYPES[out_type]
    reader = read_gguf(source)
    name, arch = _architecture(model, reader)
    count = 0
    with atomic_path(out) as temporary:
        writer = GGUFWriter(temporary, name)
        writer.add_type(GGUFType.MODEL)
        _copy_metadata(reader, writer)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for gguf_name, data in _tensors(model, arch):
            encoded, encoded_type = _encoded(data, qtype)
            writer.add_tensor(gguf_name, encoded, raw_dtype=encoded_type)
            count += 1
        _write(writer, temporary)
    return GgufSummary(out, count, out.stat().st_size)


def write_lora_gguf(
    model: PreTrainedModel, weights: dict[str, torch.Tensor], alpha: float, source: Path, out: Path
) -> GgufSummary:
    """Write a LoRA adapter (`weights`: `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r], full-model module
    paths) as a GGUF adapter llama.cpp applies to `source`'s model at load time (scale alpha / r, as trained)."""
    reader = read_gguf(source)
    name, arch = _architecture(model, reader)
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    modules = sorted({key.rsplit(".", 1)[0] for key in weights})
    count = 0
    with atomic_path(out) as temporary:
        writer = GGUFWriter(temporary, name)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        for module in modules:
            if f"{module}.{LORA_A}" not in weights or f"{module}.{LORA_B}" not in weights:
                raise ConfigError(
                    f"the adapter holds only one of {module}.{LORA_A} and .{LORA_B}; it is not a LoRA result"
                )
            gguf_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise ConfigError(f"{module} has no GGUF name in gguf's {arch.name} tensor map")
            down = weights[f"{module}.{LORA_A}"].detach().to(torch.float32).numpy()
            up = weights[f"{module}.{LORA_B}"].detach().to(torch.float32).numpy()
            heads = _heads_of(f"{module}.", model)
            writer.add_tensor(f"{gguf_name}.lora_a", down)
            writer.add_tensor(f"{gguf_name}.lora_b", _rotary_rows(up, heads) if heads else up)
            count += 2
        _write(writer, temporary)
    return GgufSummary(out, count, out.stat().st_size)
