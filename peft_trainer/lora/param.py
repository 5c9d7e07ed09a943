"""LoRA on a module's ``nn.Parameter`` (peft's ``target_parameters``, its ParamWrapper): e.g. MoE expert stacks."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .layer import AdapterState, FactoredLayer, LoraLayer, RowGroups


class ParamLayer(FactoredLayer):
    """Wraps the module holding parameter ``parameter_name`` and runs it with ``W + ΔW`` in that parameter's place.

    ``W`` is a 2-D ``(out, in)`` weight or a 3-D expert stack ``(experts, out, in)`` (``(experts, in, out)`` when
    the module sets ``is_transposed``). As in peft, A is ``(r·experts, in)`` and B ``(out, r·experts)``: expert ``e``
    gets rows ``e·r .. e·r+r`` of A and columns ``e, e+experts, ...`` of B. Several parameters of one module nest:
    each wrapper wraps the previous one, so the inner one's keys read ``<module>.base_layer.lora_A.weight``.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, parameter_name: str) -> None:
        super().__init__(base_layer, state)
        self.parameter_name = parameter_name
        shape = self.param.shape
        if len(shape) not in (2, 3):
            raise ValueError(
                f"target_parameters: {parameter_name} has {len(shape)} dimensions; LoRA adapts 2-D (out, in) and "
                "3-D (experts, out, in) parameters"
            )
        self.transposed = len(shape) == 3 and bool(getattr(self.owner, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.out_features, self.in_features = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])

    @property
    def owner(self) -> nn.Module:
        """The module the parameter belongs to (under any nested wrappers)."""
        return param_layer_owner(self.base_layer)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.owner, self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.param

    def _adapter_dtype(self) -> torch.dtype:
        dtype = self.param.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def update_layer(
        self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
        lora_bias: bool = False, use_dora: bool = False,
    ) -> None:  # fmt: skip
        device, dtype, n = self.param.device, self._adapter_dtype(), r * self.num_experts
        a = nn.Linear(self.in_features, n, bias=False, device=device, dtype=dtype)
        b = nn.Linear(n, self.out_features, bias=False, device=device, dtype=dtype)
        self._add_factors(name, a, b, r, alpha, 0.0, init, use_rslora)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the parameter's layout, float32 (with autograd: the forward uses it)."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        if self.param.dim() == 2:
            return (b @ a) * self.scaling[name]
        a = a.reshape(self.num_experts, -1, a.shape[-1])  # (experts, r, in)
        b = b.reshape(b.shape[0], -1, self.num_experts)  # (out, r, experts)
        layout = "e i o" if self.transposed else "e o i"
        return torch.einsum(f"o r e, e r i -> {layout}", b, a) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        selection = self.state.current()
        if isinstance(selection, RowGroups):
            if any(n in self.r for n, _ in selection.groups):
                raise ValueError(
                    "adapter_names (an adapter per row) does not work with target_parameters layers (as in peft)"
                )
            return self.base_layer(x, *args, **kwargs)  # rows of other adapters: this layer adds nothing
        names = [n for n in selection if n in self.r]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        param = self.param
        weight = param + sum(self.delta_weight(n) for n in names).to(param.dtype)
        depth, module = 0, self.base_layer
        while isinstance(module, ParamLayer):
            depth, module = depth + 1, module.base_layer
        path = "base_layer." * depth + self.parameter_name
        return functional_call(self.base_layer, {path: weight}, (x, *args), kwargs, strict=False)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        self._add_to_param([n for n in names if n in self.r], 1.0, safe_merge)

    def unmerge(self, names: list[str]) -> None:
        self._add_to_param([n for n in reversed(names) if n in self.r], -1.0, False)

    def _add_to_param(self, names: list[str], sign: float, safe_merge: bool) -> None:
        if not names:
            return
        param = self.param
        with torch.no_grad():
            weight = param.float() + sign * sum(self.delta_weight(n) for n in names)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken "
                    "(the base weights were left untouched)"
                )
            param.copy_(weight.to(param.dtype))


def check_param_config(config) -> None:
    """peft's limits for ``target_parameters``: plain LoRA without dropout (x cannot be factored out of W + ΔW)."""
    refused = {
        "lora_dropout": config.lora_dropout > 0, "lora_bias": config.lora_bias, "use_dora": config.use_dora,
        "fan_in_fan_out": config.fan_in_fan_out, "init_lora_weights": config.init_lora_weights not in (True, False, "gaussian"),
    }  # fmt: skip
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ValueError(
            f"target_parameters works with plain LoRA only, as in peft: set {', '.join(bad)} back to the default "
            "(lora_dropout=0.0, init_lora_weights True, False or 'gaussian')"
        )


def param_layer_owner(module: nn.Module) -> nn.Module:
    """The module under a chain of ParamLayers (itself when it is none)."""
    while isinstance(module, ParamLayer):
        module = module.base_layer
    return module


def param_layer(module: nn.Module, parameter: str) -> ParamLayer | None:
    """The wrapper of ``parameter`` in the chain of wrappers at ``module``, if one exists."""
    while isinstance(module, ParamLayer):
        if module.parameter_name == parameter:
            return module
        module = module.base_layer
    return None


def find_param_targets(model: nn.Module, config, adapter: str) -> list[tuple[str, str]]:
    """(module path, parameter name) pairs ``config.target_parameters`` names: a parameter matches by its full name
    or a dotted suffix ("experts.down_proj"), in module then registration order. Raises before any change on a
    misfit, naming the parameters that could be targeted."""
    wanted = config.target_parameters
    if not wanted:
        return []
    check_param_config(config)
    found, candidates = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or any(
            f".{p}" in f".{name}" for p in ("lora_", "modules_to_save", "original_module")
        ):
            continue
        path = name.replace(".base_layer", "")
        for parameter, value in module.named_parameters(recurse=False):
            key = f"{path}.{parameter}"
            if value.dim() in (2, 3):
                candidates.add(".".join(key.split(".")[-2:]))
            if key in wanted or any(key.endswith(f".{t}") for t in wanted):
                if not path:
                    raise ValueError(
                        f"target_parameters: {parameter} is on the top-level module, which cannot be wrapped"
                    )
                found.append((path, parameter))
    if not found:
        raise ValueError(
            f"target_parameters={wanted} match no parameter of the model. Parameters that can be adapted "
            f"(2-D or 3-D, as <module>.<parameter>): {sorted(candidates)[:20]}"
        )
    for path, parameter in found:
        outer = model.get_submodule(path)
        if isinstance(outer, LoraLayer) and not isinstance(outer, ParamLayer):
            raise ValueError(
                f"target_parameters: {path}.{parameter} belongs to {path}, which target_modules already adapts; "
                "target the module or its parameter, not both"
            )
        layer = param_layer(outer, parameter)
        if layer is not None and adapter in layer.r:
            raise ValueError(f"{path}.{parameter} already has a LoRA adapter named {adapter!r}; use another name")
    return found
