"""The device's half of each exchange over MQTT, as `train_split` asks for it (torch in and out)."""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.split_client import SplitClient
from edge_runtime.split_wire import carries, checked_array


class RemoteExchange:
    """`ServerExchange`'s two calls, answered by a split server through `client`; exchanges numbered from 1."""

    def __init__(self, client: SplitClient) -> None:
        self.client = client
        self.exchange = 0
        self._cut: dict[str, np.ndarray] = {}

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The label words' logits [B, C] for a cut."""
        self.exchange += 1
        self._cut = {"hidden": hidden.detach().float().numpy(), "mask": attention_mask.to(torch.uint8).numpy()}
        answer = self.client.ask(self.exchange, "cut", self._cut)
        carries(answer, {"logits"})
        return torch.from_numpy(checked_array(answer, "logits", "float32", (hidden.shape[0], None)))

    def gradient(self, logits_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient at the cut [B, P + T, H] for the device's gradient on the logits."""
        arrays = {"logits_gradient": logits_gradient.detach().float().numpy()}
        answer = self.client.ask(self.exchange, "gradient", arrays)
        if answer.kind == "unknown_cut":  # the server restarted since the cut: send it again, then the gradient
            self.client.ask(self.exchange, "cut", self._cut)
            answer = self.client.ask(self.exchange, "gradient", arrays)
        carries(answer, {"gradient"})
        return torch.from_numpy(checked_array(answer, "gradient", "float32", self._cut["hidden"].shape))
