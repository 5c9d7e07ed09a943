"""LoraModel: peft's level between a PeftModel and the transformers model, so paths and keys read as in peft."""

from __future__ import annotations

from typing import Any

from torch import nn

# What peft's LoraModel offers itself: these act through the PeftModel that owns this one.
OWNER_NAMES = frozenset({
    "peft_config", "active_adapter", "active_adapters", "set_adapter", "delete_adapter", "add_weighted_adapter",
    "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "disable_adapter_layers",
    "enable_adapter_layers", "targeted_module_names", "get_layer_status", "get_model_status",
})  # fmt: skip


class LoraModel(nn.Module):
    """``PeftModel.base_model``: holds the transformers model as ``.model`` (so ``model.base_model.model`` is the
    transformers model and in-memory keys read ``base_model.model.model.layers...`` as in peft). Adapter methods act
    on the owning PeftModel; every other attribute is the transformers model's."""

    def __init__(self, model: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # a plain reference: not a submodule (no module cycle)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in OWNER_NAMES:
                return getattr(self.__dict__["_owner"], name)
            return getattr(self.model, name)
