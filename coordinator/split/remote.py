"""The device's half of each exchange over MQTT, as `train_split` asks for it (torch in and out)."""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.split_client import SplitClient
from edge_runtime.split_wire import SplitMessage
from edge_runtime.wire import WireError


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
        return torch.from_numpy(_checked(answer, "logits", (hidden.shape[0], None)))

    def gradient(self, logits_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient at the cut [B, P + T, H] for the device's gradient on the logits."""
        arrays = {"logits_gradient": logits_gradient.detach().float().numpy()}
        answer = self.client.ask(self.exchange, "gradient", arrays)
        if answer.kind == "unknown_cut":  # the server restarted since the cut: send it again, then the gradient
            self.client.ask(self.exchange, "cut", self._cut)
            answer = self.client.ask(self.exchange, "gradient", arrays)
        return torch.from_numpy(_checked(answer, "gradient", self._cut["hidden"].shape))


def _checked(answer: SplitMessage, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """The answer's one array `name`, of `shape` (None: any size) and finite; WireError if the server sent else."""
    array = answer.arrays.get(name)
    fits = array is not None and array.ndim == len(shape) and set(answer.arrays) == {name}
    if not fits or any(want is not None and have != want for have, want in zip(array.shape, shape, strict=True)):
        raise WireError(f"the split server answered {answer.kind} with {sorted(answer.arrays)}, not {name} {shape}")
    if array.dtype != np.float32 or not np.isfinite(array).all():
        raise WireError(f"the split server's {name} is not finite float32")
    return array
