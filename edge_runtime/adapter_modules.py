"""What the LoRA, bias and soft-prompt adapter kinds add to a model, found again from parameter names; needs torch.

The coordinator adds them when it builds an adapter; the exporter traces the result into the ONNX training graph;
the PyTorch backend adds them to the bundle's plain emulator from the manifest's trainable names, so both
backends train the same parameters under the same names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edge_runtime.manifest import AdapterRecord
from edge_runtime.soft_prompt import SOFT_PROMPT, attach_prompt
from edge_runtime.torch_graph import PREFIX

LORA_A, LORA_B = "lora_A", "lora_B"


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear map whose weight is stored [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear map."""
    if not is_linear(module):
        raise TypeError(f"{type(module).__name__} is not a linear map (nn.Linear or Conv1D)")
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank branch (Hu et al., 2021): y = base(x) + (α/r)·(x Aᵀ) Bᵀ.

    A [r, in] starts Kaiming-uniform, B [out, r] at zero, so an untrained branch changes nothing.

    >>> layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=4.0)
    >>> bool(torch.equal(layer(torch.ones(1, 4)), layer.base(torch.ones(1, 4))))
    True
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        features_in, features_out = linear_features(base)
        self.base, self.r, self.scale = base, r, alpha / r
        weight = base.weight
        bound = 1 / math.sqrt(features_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft initialize A
        initial = torch.rand(r, features_in, generator=generator, dtype=weight.dtype) * 2 * bound - bound
        self.lora_A = nn.Parameter(initial.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(features_out, r, dtype=weight.dtype, device=weight.device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., in] -> [..., out]."""
        return self.base(hidden) + (hidden @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def delta(self) -> torch.Tensor:
        """The branch as a weight update in the base's own layout ([out, in] for Linear, [in, out] for Conv1D)."""
        update = (self.lora_B @ self.lora_A) * self.scale
        return update if isinstance(self.base, nn.Linear) else update.t()


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def attach_lora(model: nn.Module, paths: list[str], r: int, alpha: float, seed: int = 0) -> None:
    """Wrap the linear maps at module `paths` in LoRALinear (each once; A drawn from `seed`, in path order)."""
    generator = torch.Generator().manual_seed(seed)
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            continue
        if not is_linear(module):
            raise TypeError(f"LoRA target {path} is a {type(module).__name__}, not a linear map")
        parent, child = _parent(model, path)
        setattr(parent, child, LoRALinear(module, r, alpha, generator))


def detach_lora(model: nn.Module) -> None:
    """Put every LoRALinear's base map back in its place (the branch is dropped, not merged)."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for path in wrapped:
        parent, child = _parent(model, path)
        setattr(parent, child, getattr(parent, child).base)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA branch into its base weight, then unwrap: a plain model that computes the same."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.base.weight += module.delta()
    detach_lora(model)


def attach_biases(model: nn.Module, paths: list[str]) -> list[str]:
    """Give each linear map at `paths` that has no bias a zero one; the paths that got one."""
    added = []
    for path in paths:
        module = model.get_submodule(path)
        if getattr(module, "bias", None) is None:
            _, features_out = linear_features(module)
            weight = module.weight
            module.bias = nn.Parameter(torch.zeros(features_out, dtype=weight.dtype, device=weight.device))
            added.append(path)
    return added


def remove_biases(model: nn.Module, paths: list[str]) -> None:
    """Take the biases `attach_biases` added at `paths` away again."""
    for path in paths:
        model.get_submodule(path).bias = None


def add_adapter(model: nn.Module, adapter: AdapterRecord) -> dict[str, str]:
    """Add what a manifest's `adapter` trains to `model` (its plain emulator), found from the trainable names alone;
    return each trainable parameter's name in `model` -> its full-model name.

    `layers` adds nothing; `lora` wraps each module named by a `.lora_A` parameter; `bias` adds a zero bias
    wherever a `.bias` parameter is named but missing; `prompt` gives the module named by `.soft_prompt` a zero
    prompt of the recorded length (the bundle's initial adapter holds its starting vectors).
    """
    local = {name.removeprefix(PREFIX): full for name, full in adapter.parameters.items()}
    if adapter.kind == "lora":
        paths = sorted({name.removesuffix(f".{LORA_A}") for name in local if name.endswith(f".{LORA_A}")})
        attach_lora(model, paths, int(adapter.options["r"]), float(adapter.options["alpha"]))
    elif adapter.kind == "bias":
        modules = dict(model.named_modules())
        paths = [name.removesuffix(".bias") for name in local if name.endswith(".bias")]
        attach_biases(model, [path for path in paths if is_linear(modules[path])])
    elif adapter.kind == "prompt":
        for path in (name.removesuffix(f".{SOFT_PROMPT}") for name in local if name.endswith(f".{SOFT_PROMPT}")):
            backbone = model.get_submodule(path)
            width = backbone.get_input_embeddings().embedding_dim
            attach_prompt(backbone, torch.zeros(int(adapter.options["tokens"]), width))
    return local
