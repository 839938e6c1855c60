"""How an emulator's frozen weights are stored on the device: float32, or int8 with a scale per row (for real).

`store=int8` (an emulator spec setting) quantizes every linear map of the kept middle layers, the token embedding
and a head tied to it (edge_runtime/quantized.py); the adapter layers stay float32 whatever the kind trains in
them. A middle layer that layerwise compression fake-quantized to b ≤ 8 bits keeps its own b-bit grid, so its
compressed values are stored exactly; the rest are rounded to 8 bits here, which is itself a (small) compression.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers import PreTrainedModel

from coordinator.architectures import decoder_layers, spec_for
from coordinator.compression.luc import FLOAT_BITS
from coordinator.emulator import Split, emulator_record, set_emulator_record
from edge_runtime.adapter_modules import is_linear
from edge_runtime.quantized import QUANTIZED_RECORD, STORAGE_KINDS, STORED_BITS, quantize_modules, stored_bytes

FLOAT32 = "float32"


def _luc_bits(emulator: PreTrainedModel, split: Split) -> dict[int, int]:
    """Bits layerwise compression chose per emulator layer index (empty for other recipes)."""
    record = emulator_record(emulator)
    chosen = (record.details.get("layers") if record else None) or []
    return {split.bottom + offset: int(layer["bits"]) for offset, layer in enumerate(chosen)}


def frozen_matrix_bits(emulator: PreTrainedModel, split: Split) -> tuple[dict[str, int], str | None]:
    """Module path -> stored bits of every matrix `store=int8` quantizes, and the head tied to the embedding."""
    spec = spec_for(emulator.config.model_type)
    layers = decoder_layers(emulator)
    luc = _luc_bits(emulator, split)
    bits, seen = {}, set()
    for index in range(split.bottom, len(layers) - split.top):
        for name, module in layers[index].named_modules():
            if is_linear(module) and id(module) not in seen:  # a shared layer's maps are stored once
                seen.add(id(module))
                bits[f"{spec.layers}.{index}.{name}"] = min(STORED_BITS, luc.get(index, FLOAT_BITS))
    bits[spec.embeddings[0]] = STORED_BITS
    tied = bool(getattr(emulator.config, "tie_word_embeddings", False))
    if not tied:
        bits[spec.head] = STORED_BITS
    return bits, spec.head if tied else None


def store_frozen(emulator: PreTrainedModel, split: Split, storage: str) -> PreTrainedModel:
    """Put `emulator`'s frozen matrices in `storage` (in place) and record it; returns the emulator."""
    if storage not in STORAGE_KINDS:
        raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGE_KINDS)}")
    if storage == FLOAT32:
        return emulator
    before = stored_bytes(emulator)
    bits, tied_head = frozen_matrix_bits(emulator, split)
    quantize_modules(emulator, bits, tied_head)
    setattr(emulator.config, QUANTIZED_RECORD, {"bits": bits, "tied_head": tied_head})
    record = emulator_record(emulator)
    if record is not None:
        storage_details: dict[str, Any] = {
            "kind": storage,
            "matrices": len(bits),
            "bits": sorted(set(bits.values())),
            "float32_bytes": before,
            "stored_bytes": stored_bytes(emulator),
        }
        details = record.details | {"storage": storage_details}
        if "stored_as" in details:
            details["stored_as"] = f"{storage} (frozen matrices on their chosen grid, one float32 scale per row)"
        set_emulator_record(emulator.config, replace(record, details=details))
    return emulator
