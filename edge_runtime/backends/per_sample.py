"""Per-example gradients of the adapter in one batched backward pass, by module hooks (no backward per example).

Each trainable tensor's per-example gradient follows from what its module saw going in and what came back:
- a bias (Linear, GPT-2's Conv1D, LayerNorm): the example's output gradient summed over its positions, so no
  per-example weight gradient is ever formed (DP-BiTFiT's observation);
- LoRA's A and B (y = W x + s·B A x): with u = A x and g the output gradient, ∂B = s·Σ_t g uᵀ and
  ∂A = s·Σ_t (Bᵀ g) xᵀ, an einsum per example over its positions.
Other tensors (whole layers' weights, norms' scales, soft prompts) have no rule here: DP refuses them by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edge_runtime.adapter_modules import LORA_A, LORA_B, LoRALinear
from edge_runtime.errors import ConfigError
from edge_runtime.privacy import DPPlan

_BIAS_OWNERS = ("Linear", "Conv1D", "LayerNorm")


def _owners(model: nn.Module, parameters: dict[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]]:
    """Each named parameter's owning module and its name there; ConfigError for one with no per-example rule."""
    wanted = {id(p): name for name, p in parameters.items()}
    owners: dict[str, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for local, parameter in module.named_parameters(recurse=False):
            if id(parameter) in wanted:
                owners[wanted[id(parameter)]] = (module, local)
    for name, (module, local) in owners.items():
        kind = type(module).__name__
        lora = isinstance(module, LoRALinear) and local in (LORA_A, LORA_B)
        if not (lora or (local == "bias" and kind in _BIAS_OWNERS)):
            raise ConfigError(
                f"differentially private training has no per-example gradient for {name} ({kind}.{local}); DP-SGD "
                "here trains biases (--adapter-kind bias) or LoRA (--adapter-kind lora)"
            )
    return owners


class PerSampleGradients:
    """Hooks on the modules owning `parameters`; inside `capture()`, one backward of a sum of per-example losses
    leaves each example's gradient of each parameter in `grads` ([rows, *shape])."""

    def __init__(self, model: nn.Module, parameters: dict[str, nn.Parameter]) -> None:
        self.owners = _owners(model, parameters)
        self.grads: dict[str, torch.Tensor] = {}
        self._modules = {id(module): module for module, _ in self.owners.values()}
        # Only LoRA's rules read the module's input; a bias's needs none, and holding it would keep a frozen
        # layer's input alive that autograd itself lets go (~50 MiB for SmolLM2's 4 adapter layers at batch 8).
        self._reads_input = {id(module) for module, local in self.owners.values() if local != "bias"}

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.grads = {}
        handles = [module.register_forward_hook(self._forward) for module in self._modules.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            hidden = inputs[0].detach() if id(module) in self._reads_input else None
            output.register_hook(lambda gradient: self._backward(module, hidden, gradient.detach()))

    def _backward(self, module: nn.Module, hidden: torch.Tensor | None, gradient: torch.Tensor) -> None:
        rows, features = gradient.shape[0], gradient.shape[-1]
        flat = gradient.reshape(rows, -1, features)  # [rows, positions, out]
        for name, (owner, local) in self.owners.items():
            if owner is not module:
                continue
            if local == "bias":
                self._add(name, flat.sum(dim=1))
                continue
            assert hidden is not None  # kept for every module owning a LoRA tensor
            x = hidden.reshape(rows, -1, hidden.shape[-1])  # [rows, positions, in]
            if local == LORA_B:
                self._add(name, module.scale * torch.einsum("bto,btr->bor", flat, x @ module.lora_A.detach().t()))
            else:  # LORA_A
                back = flat @ module.lora_B.detach()  # [rows, positions, r]
                self._add(name, module.scale * torch.einsum("btr,bti->bri", back, x))

    def _add(self, name: str, gradient: torch.Tensor) -> None:
        self.grads[name] = self.grads[name] + gradient if name in self.grads else gradient


def clipped_sum(grads: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient (over all tensors together) scaled to L2 norm at most `clip`, summed over examples;
    and the examples' norms before clipping."""
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values()))
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return {name: torch.einsum("b,b...->...", factors, g) for name, g in grads.items()}, norms


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the OS, never from the job: whoever knows DP-SGD's noise can subtract it."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def noised_mean(
    total: torch.Tensor, noise_std: float, expected_rows: float, generator: torch.Generator
) -> torch.Tensor:
    """DP-SGD's gradient from a clipped sum: (sum + N(0, noise_std²) per coordinate) / expected rows (q·N)."""
    noise = torch.normal(0.0, noise_std, size=total.shape, generator=generator, dtype=total.dtype)
    return (total + noise) / expected_rows


def private_gradients(
    per_sample: PerSampleGradients,
    window: dict[str, nn.Parameter],
    row_losses: Iterable[Callable[[], torch.Tensor]],
    plan: DPPlan,
    generator: torch.Generator,
) -> tuple[float, int]:
    """Set each `window` parameter's `.grad` to DP-SGD's: for each micro-batch (a callable giving its rows' losses),
    one backward, each row's gradient clipped to C and summed; then noise of std σ·C, divided by q·N. Returns the
    rows' summed loss and their count (none: the step is noise alone)."""
    total = {name: torch.zeros_like(parameter) for name, parameter in window.items()}
    loss_sum, rows = 0.0, 0
    for losses_of in row_losses:
        with per_sample.capture():
            losses = losses_of()
            losses.sum().backward()
        summed, _ = clipped_sum({n: g for n, g in per_sample.grads.items() if n in window}, plan.target.clip)
        for name, gradient in summed.items():
            total[name] += gradient
        loss_sum, rows = loss_sum + float(losses.detach().sum()), rows + len(losses)
        for parameter in window.values():  # autograd's own (unclipped) sums are not used
            parameter.grad = None
    for name, parameter in window.items():
        parameter.grad = noised_mean(total[name], plan.noise_std, plan.expected_batch, generator)
    return loss_sum, rows
