"""The benchmarks' physical memory floor: its parts are what they claim, and no runtime's prediction goes below it."""

import pytest

from bench.floor import full_model_shape, memory_floor
from edge_runtime.memory import FLOAT_BYTES, estimate
from tests.conftest import SMOLLM2_EMULATOR as EMULATOR


def test_weights_and_trainable_state_are_float32_weights_gradient_and_two_moments():
    floor = memory_floor(EMULATOR, 8, 128)
    assert floor["weights"] == FLOAT_BYTES * (EMULATOR.frozen_parameters + EMULATOR.trainable_parameters)
    assert floor["trainable_state"] == 3 * FLOAT_BYTES * EMULATOR.trainable_parameters
    assert floor["total"] == floor["weights"] + floor["trainable_state"] + floor["activations"]


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("sequence", [32, 128, 512])
def test_every_backends_prediction_without_its_runtime_stays_above_the_floor(backend, sequence):
    predicted = estimate(EMULATOR, 8, sequence, "classification", backend)
    assert memory_floor(EMULATOR, 8, sequence)["total"] < predicted.total - predicted.runtime


def test_activations_grow_with_sequence_faster_than_linearly_and_with_depth():
    short, long = (memory_floor(EMULATOR, 8, n)["activations"] for n in (256, 512))
    assert long > 2 * short  # the attention probabilities grow with the square of the length
    deeper = full_model_shape(EMULATOR, 134_515_008, 30)
    assert deeper.frozen_parameters == 0 and deeper.backprop_layers == 30
    assert memory_floor(deeper, 8, 128)["activations"] > memory_floor(EMULATOR, 8, 128)["activations"]
