"""The architecture registry: every declared path exists, unknown types get a helpful error."""

import pytest
from transformers import GPTJConfig

from coordinator.architectures import decoder_layers, spec_for, supported_model_types
from coordinator.errors import ArchitectureError
from tests.conftest import make_model


def test_every_declared_path_resolves(family):
    model = make_model(family, num_layers=3)
    spec = spec_for(model.config.model_type)
    for path in (spec.backbone, spec.layers, spec.final_norm, spec.head, *spec.embeddings):
        model.get_submodule(path)
    assert len(decoder_layers(model)) == 3


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ArchitectureError) as raised:
        spec_for(GPTJConfig().model_type)
    message = str(raised.value)
    assert "'gptj'" in message
    for model_type in ("llama", "gpt2", "opt", "qwen2", "mistral"):
        assert model_type in message
    assert supported_model_types() == sorted(supported_model_types())
