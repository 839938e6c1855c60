"""The device's half of each exchange over MQTT, as `train_split` asks for it (torch in and out)."""

from __future__ import annotations

import torch

from edge_runtime.split_client import SplitClient
from edge_runtime.split_device import CutExchange


class RemoteExchange:
    """`ServerExchange`'s two calls, answered by a split server through `client` (`CutExchange` in torch)."""

    def __init__(self, client: SplitClient) -> None:
        self.numpy = CutExchange(client)

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The label words' logits [B, C] for a cut."""
        return torch.from_numpy(self.numpy.logits(hidden.detach().float().numpy(), attention_mask.numpy()))

    def gradient(self, logits_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient at the cut [B, P + T, H] for the device's gradient on the logits."""
        return torch.from_numpy(self.numpy.gradient(logits_gradient.detach().float().numpy()))
