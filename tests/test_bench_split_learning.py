"""bench.split_learning's step costs: FLOPs of forward and backward, the activations saved, weights left out."""

from __future__ import annotations

import torch
from torch import nn

from bench.split_learning import step_cost


def test_a_frozen_layer_costs_its_input_gradient_and_saves_no_weight():
    torch.manual_seed(0)
    prompt = nn.Parameter(torch.randn(2, 4))  # trains: [2, 4] through a frozen [4 -> 3] projection
    layer = nn.Linear(4, 3, bias=False).requires_grad_(False)

    def step() -> None:
        torch.tanh(layer(prompt)).sum().backward()

    forward = 2 * 2 * 4 * 3  # a multiply and an add per weight per row
    tanh_output = 2 * 3 * 4  # float32 bytes autograd keeps for tanh's backward
    assert step_cost(step, layer.parameters()) == (2 * forward, tanh_output)  # no weight gradient
    assert step_cost(step, []) == (2 * forward, tanh_output + 4 * 3 * 4)  # the weight, saved, unless held
    layer.requires_grad_(True)
    assert step_cost(step, layer.parameters()) == (3 * forward, tanh_output + 2 * 4 * 4)  # + the input, saved
