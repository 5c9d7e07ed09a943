"""PeftModel: a transformers model with LoRA adapters beside it; switch, disable, merge, save and load them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import card, io, plain_trainer
from ..config import LoraConfig
from ..folders import adapter_dir, validate_adapter_name
from ..loss import can_chunk, causal_lm_forward
from . import combine
from .inject import factor_numel, inject, set_module
from .layer import AdapterState, Conv, Embedding, Linear, LoraLayer, ModulesToSaveWrapper, RowGroups, TrainableTokens
from .lora_model import LoraModel
from .param import ParamLayer

BASE = "__base__"


class PeftModel(nn.Module):
    """Wraps ``base_model`` (modified in place) and keeps the adapters' configs and the active-adapter state.

    Attribute access falls through to the base model, so the Trainer and user code see ``config``,
    ``generate``, ``get_input_embeddings`` and friends as on the base.
    """

    _hf_peft_config_loaded = True  # lets transformers' Trainer fine-tune quantized bases through this wrapper
    # Training calls with labels compute the loss in chunks from the hidden states (peft_trainer.loss): the
    # output's logits are None. PeftTrainer turns it on (PeftTrainingArguments.chunked_loss).
    chunked_loss = False

    def __new__(cls, base_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> PeftModel:
        return super().__new__(cls if base_model is None else _class_for(cls, type(base_model)))

    def __init__(self, base_model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in base_model.modules()):
            raise ValueError(
                "This model already has LoRA layers: wrap it once and call add_adapter() for more adapters, "
                "or unload() the existing ones first"
            )
        self.base_model = LoraModel(base_model, self)
        self._init_registry()
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        plain_trainer.install()  # transformers.Trainer then saves and resumes this model as adapter files

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickled (and deep-copied) as the PEFT class it was built as; loading makes its typed subclass again."""
        cls = type(self)
        public = cls.__mro__[1] if cls in _CLASSES.values() else cls
        return _rebuild, (public, type(self.get_base_model())), self.__getstate__()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.get_base_model(), name)

    # ---- adapters -------------------------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def get_base_model(self) -> nn.Module:
        """The transformers model the adapters were injected into (``base_model.model``, as in peft)."""
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Inject a new, inactive adapter; a duplicate or failing name leaves the model unchanged."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists.")
        if peft_config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("Only one adapter per model can have bias != 'none'")
        config = copy.deepcopy(peft_config)
        for other, c in self.peft_config.items():
            if (
                config.target_parameters
                and c.target_parameters
                and set(c.target_parameters) != set(config.target_parameters)
            ):
                raise ValueError(
                    f"Adapters with target_parameters must all target the same parameters (as in peft): "
                    f"{sorted(config.target_parameters)} here, {sorted(c.target_parameters)} for adapter {other!r}"
                )
        try:
            layers = inject(self.get_base_model(), config, adapter_name, self.adapter_state)
        except Exception:
            self._remove_adapter_modules(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        params = [p for layer in layers for p in layer.adapter_parameters(adapter_name)]
        params += self._bias_parameters(config)
        self._adapter_params[adapter_name] = params
        self._set_trainable(adapter_name, False)

    def _bias_parameters(self, config: LoraConfig) -> list[nn.Parameter]:
        if config.bias == "none":
            return []
        if config.bias == "lora_only":
            layers = [m for m in self.get_base_model().modules() if isinstance(m, LoraLayer)]
            return [m.base_layer.bias for m in layers if getattr(m.base_layer, "bias", None) is not None]
        return [p for k, p in self._plain_named_parameters() if k.endswith(".bias")]

    def _plain_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Base-model parameters outside LoRA factors and modules_to_save copies."""
        for k, p in self.get_base_model().named_parameters():
            if ".lora_" not in k and ".modules_to_save." not in k and ".original_module." not in k:
                yield k, p

    def _set_trainable(self, name: str, trainable: bool) -> None:
        for p in self._adapter_params.get(name, []):
            p.requires_grad_(trainable)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several, whose deltas add up) active; O(1) for inference-only adapters."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {list(self.peft_config)}")
        state = self.adapter_state
        if state.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.unmerge_adapter()
        for name in state.active:
            if not self.peft_config[name].inference_mode:
                self._set_trainable(name, False)
        state.active = tuple(names)
        state.refresh()
        for name in names:
            if not (inference_mode or self.peft_config[name].inference_mode):
                self._set_trainable(name, True)

    def _layers(self) -> Iterator[tuple[str, LoraLayer | ModulesToSaveWrapper]]:
        for path, module in self.get_base_model().named_modules():
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                yield path, module

    def _remove_adapter_modules(self, name: str) -> None:
        """Drop ``name`` from every layer and put back the plain module where no adapter is left."""
        for path, layer in reversed(list(self._layers())):  # innermost first: nested wrappers unwrap in place
            layer.delete_adapter(name)
            if not layer.adapter_names:
                plain = layer.base_layer if isinstance(layer, LoraLayer) else layer.original_module
                set_module(self.get_base_model(), path, plain)

    def _init_registry(self) -> None:
        """The adapter registry and state (also for :func:`inject_adapter_in_model`'s unregistered holder)."""
        self.peft_config: dict[str, LoraConfig] = {}
        self.adapter_state = AdapterState()
        self._adapter_params: dict[str, list[nn.Parameter]] = {}
        self.loaded_adapters: set[str] = set()  # adapters whose values came from files (load_adapter_tensors)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        state = self.adapter_state
        if adapter_name in state.merged:
            raise ValueError(f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Unmerge them first.")
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name]
        del self._adapter_params[adapter_name]
        self.loaded_adapters.discard(adapter_name)
        if adapter_name in state.active:
            remaining = [a for a in state.active if a != adapter_name]
            if not remaining and self.peft_config:
                remaining = [sorted(self.peft_config)[0]]
                warnings.warn(f"Deleted the active adapter; {remaining[0]!r} is now active", stacklevel=2)
            state.active = tuple(remaining)
            state.refresh()
            for name in remaining:
                self._set_trainable(name, not self.peft_config[name].inference_mode)

    def disable_adapter_layers(self) -> None:
        """Until :meth:`enable_adapter_layers`: the base model's output (merged adapters are unmerged first)."""
        if self.adapter_state.merged:
            warnings.warn("Unmerging the merged adapters to disable them.", stacklevel=2)
            self.unmerge_adapter()
        self.adapter_state.disabled = True
        self.adapter_state.refresh()

    def enable_adapter_layers(self) -> None:
        self.adapter_state.disabled = False
        self.adapter_state.refresh()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside: exactly the base model's output (merged adapters are unmerged first)."""
        if self.adapter_state.merged:
            self.unmerge_adapter()
        if any(c.bias != "none" for c in self.peft_config.values()):
            warnings.warn(
                "Adapters with bias != 'none' changed base biases: disabled output differs from the base", stacklevel=2
            )
        state = self.adapter_state
        previous = state.disabled
        state.disabled = True
        state.refresh()
        try:
            yield
        finally:
            state.disabled = previous
            state.refresh()

    @contextlib.contextmanager
    def use_adapter(self, adapter_names: str | list[str] | None) -> Iterator[None]:
        """Run calls in this thread/task with ``adapter_names`` (None or "__base__" = bare base), leaving the
        model's active adapters, and what other threads see, unchanged."""
        names = (
            []
            if adapter_names in (None, BASE)
            else [adapter_names]
            if isinstance(adapter_names, str)
            else adapter_names
        )
        names = [n for n in names if n != BASE]
        self._check_call_names(names)
        with self.adapter_state.override(tuple(names)):
            yield

    def _check_call_names(self, names: list[str]) -> None:
        unknown = sorted({n for n in names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        if self.adapter_state.merged:
            raise ValueError("Cannot choose adapters per call while adapters are merged; call unmerge_adapter()")

    # ---- forward / generate ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rows(self, adapter_names: list[str] | None, batch_size: int, device: torch.device) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if len(adapter_names) != batch_size:
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {batch_size} respectively."
            )
        self._check_call_names(adapter_names)
        groups = []
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            groups.append((name, torch.tensor(rows, device=device)))
        with self.adapter_state.override(RowGroups(tuple(groups), batch_size)):
            yield

    @staticmethod
    def _batch_of(args: tuple, kwargs: dict) -> tuple[int, torch.device]:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.shape[0], value.device
        raise ValueError("adapter_names needs a tensor input to know the batch size")

    def train(self, mode: bool = True) -> PeftModel:
        plain_trainer.install()  # also when transformers.Trainer was imported after this model was built
        return super().train(mode)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            if self.chunked_loss and self._chunkable(args, kwargs):
                return causal_lm_forward(self.get_base_model(), **kwargs)
            return self.get_base_model()(*args, **kwargs)
        with self._rows(adapter_names, *self._batch_of(args, kwargs)):
            return self.get_base_model()(*args, **kwargs)

    def _chunkable(self, args: tuple, kwargs: dict) -> bool:
        return (
            not args and kwargs.get("labels") is not None and self.training and torch.is_grad_enabled()
            and can_chunk(self.get_base_model())
        )  # fmt: skip

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        beams = kwargs.get("num_beams") or getattr(
            getattr(self.get_base_model(), "generation_config", None), "num_beams", 1
        )
        expanded = [n for n in adapter_names for _ in range(beams or 1)]
        batch, device = self._batch_of(args, kwargs)
        if len(adapter_names) != batch:
            expanded = adapter_names  # let _rows report the length mismatch
        with self._rows(expanded, len(expanded) if expanded is adapter_names else batch * (beams or 1), device):
            return self.get_base_model().generate(*args, **kwargs)

    # ---- merge / unload -------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the given (default: active) adapters into the base weights; per-layer all-or-nothing."""
        state = self.adapter_state
        names = [n for n in (adapter_names or state.active) if n not in state.merged]
        if not names:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {list(self.peft_config)}")
        if getattr(self.get_base_model(), "_peft_trainer_layer_map", None):
            raise ValueError(
                "Cannot merge with layer_replication: the replicated layers share their base weights, so each copy's "
                "update would land in every copy. Keep the adapter unmerged"
            )
        layers = [layer for _, layer in self._layers() if isinstance(layer, LoraLayer)]
        if safe_merge:  # check every layer before touching any weight
            for layer in layers:
                for name in names:
                    if name in layer.r and not torch.isfinite(layer.delta_weight(name)).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                            "(the base weights were left untouched)"
                        )
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)
        state.merged.extend(names)
        state.refresh()

    def unmerge_adapter(self) -> None:
        state = self.adapter_state
        names = list(reversed(state.merged))
        for _, layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.unmerge(names)
        state.merged.clear()
        state.refresh()

    def _unload(self, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        chosen = adapter_names or list(self.adapter_state.active)
        for path, layer in reversed(list(self._layers())):  # innermost first: nested wrappers unwrap in place
            if isinstance(layer, LoraLayer):
                plain = layer.base_layer
            else:
                keep = next((n for n in chosen if n in layer.modules_to_save), None) if merge else None
                plain = layer.modules_to_save[keep] if keep else layer.original_module
            set_module(self.get_base_model(), path, plain)
        self.peft_config.clear()
        self._adapter_params.clear()
        self.adapter_state.active, self.adapter_state.merged = (), []
        self.adapter_state.refresh()
        return self.get_base_model()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the given (default: active) adapters and return the plain base model."""
        return self._unload(True, adapter_names, safe_merge)

    def unload(self) -> nn.Module:
        """Remove all LoRA modules without merging and return the base model."""
        return self._unload(False, None, False)

    # ---- parameters -----------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, adapters included in "all" (as peft counts them)."""
        trainable = total = 0
        for p in self.parameters():
            n = numel(p)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the base model) of the modules that hold LoRA layers, in module order."""
        return [path for path, layer in self._layers() if isinstance(layer, LoraLayer)]

    def get_layer_status(self) -> list[Any]:
        from ..status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        from ..status import get_model_status

        return get_model_status(self)

    # ---- save / load ----------------------------------------------------------------------------------------

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The live tensors of one adapter under their on-disk (PEFT) key names."""
        out: dict[str, torch.Tensor] = {}
        p = io.PREFIX
        for path, layer in self._layers():
            if isinstance(layer, (Linear, Conv, ParamLayer)) and adapter_name in layer.r:
                out[f"{p}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
                out[f"{p}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
                if layer.lora_B[adapter_name].bias is not None:  # lora_bias
                    out[f"{p}{path}.lora_B.bias"] = layer.lora_B[adapter_name].bias
            elif isinstance(layer, Embedding) and adapter_name in layer.r:
                out[f"{p}{path}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
                out[f"{p}{path}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
            elif isinstance(layer, TrainableTokens) and adapter_name in layer.r and not layer.tied:
                out[f"{p}{path}.token_adapter.trainable_tokens_delta"] = layer.trainable_tokens_delta[adapter_name]
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_magnitude_vector:  # DoRA
                out[f"{p}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
            elif isinstance(layer, ModulesToSaveWrapper) and adapter_name in layer.modules_to_save:
                for k, v in layer.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"{p}{path}.{k}"] = v
        bias = self.peft_config[adapter_name].bias
        if bias != "none":
            ids = {id(t) for t in self._bias_parameters(self.peft_config[adapter_name])}
            for k, t in self._plain_named_parameters():
                if id(t) in ids:
                    out[f"{p}{k}"] = t
        return out

    def embedding_tensors(
        self, adapter_name: str, save_embedding_layers: bool | str = "auto"
    ) -> dict[str, torch.Tensor]:
        """The base embedding matrices peft writes beside an adapter (its ``save_embedding_layers``): with "auto",
        those of LoRA-wrapped ``embed_tokens``/``lm_head`` layers when the adapter targets them, or the embedding
        modules themselves when the vocabulary was resized from the base model's ``config.json`` (a local base)."""
        get_in, get_out = (
            getattr(self.get_base_model(), f, None) for f in ("get_input_embeddings", "get_output_embeddings")
        )
        if save_embedding_layers is False or get_in is None:
            return {}
        config = self.peft_config[adapter_name]
        targeted = _targets_embeddings(self.get_base_model(), config) and config.trainable_token_indices is None
        if save_embedding_layers == "auto" and not targeted and not self._vocab_resized(config):
            return {}
        names = {id(m): n for n, m in self.get_base_model().named_modules()}
        out = {}
        for layer in (get_in(), get_out() if get_out else None):
            if layer is None or id(layer) not in names:
                continue
            if targeted and not isinstance(getattr(layer, "base_layer", None), (nn.Linear, nn.Embedding)):
                continue
            module, path = (
                (layer.base_layer, f"{names[id(layer)]}.base_layer") if targeted else (layer, names[id(layer)])
            )
            out.update({f"{io.PREFIX}{path}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        return out

    def _vocab_resized(self, config: LoraConfig) -> bool:
        source = config.base_model_name_or_path or self._name_or_path()
        file = os.path.join(source, "config.json") if source else ""
        if not os.path.isfile(file):  # a Hub id: peft asks the Hub; offline, it assumes no resize, as here
            return False
        import json

        with open(file, encoding="utf-8") as f:
            vocab = json.load(f).get("vocab_size")
        return vocab is not None and vocab != getattr(self.get_base_model().config, "vocab_size", vocab)

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
        is_main_process: bool = True, save_embedding_layers: bool | str = "auto",
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Write each adapter in PEFT's format: "default" at the root, any other name in a subfolder; with the base
        embedding matrices beside it as peft's ``save_embedding_layers`` does (see :meth:`embedding_tensors`).

        ``path_initial_model_for_weight_conversion``: the folder this PiSSA/OLoRA adapter was saved to right after
        ``get_peft_model`` (before training), or those initial factors as ``{file key: tensor}``. The adapter is then
        written as a plain LoRA of rank 2r for the *original* base, ΔW = BA - B₀A₀ = [B | -B₀][A ; A₀] (peft's
        conversion)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} cannot be saved: they do not exist ({list(self.peft_config)})")
        if not is_main_process:
            return
        for name in names:
            tensors = {**self.adapter_tensors(name), **self.embedding_tensors(name, save_embedding_layers)}
            config = self.config_for_saving(name)
            if path_initial_model_for_weight_conversion is not None:
                tensors, config = as_plain_lora(tensors, config, path_initial_model_for_weight_conversion)
            io.save_adapter(adapter_dir(save_directory, name), tensors, config)
        self.create_or_update_model_card(save_directory, {n: self.peft_config[n] for n in names})

    def config_for_saving(self, name: str) -> LoraConfig:
        config = copy.copy(self.peft_config[name])
        config.inference_mode = True
        config.base_model_name_or_path = config.base_model_name_or_path or self._name_or_path()
        if config.task_type is None:
            cls = type(self.get_base_model())
            config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        return config

    def _name_or_path(self) -> str | None:
        return getattr(getattr(self.get_base_model(), "config", None), "_name_or_path", None) or None

    def create_or_update_model_card(self, output_dir: str | os.PathLike, configs: dict | None = None) -> None:
        card.write_card(output_dir, *card.adapter_card(self._name_or_path(), configs or self.peft_config))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: LoraConfig | None = None, **kwargs: Any,
    ) -> PeftModel:  # fmt: skip
        """Load a saved (PEFT-format) adapter from a folder or Hub repo onto ``model``."""
        validate_adapter_name(adapter_name)
        config, tensors = io.read_adapter(model_id, config, is_trainable, **kwargs)
        return attach_adapter(model, adapter_name, config, tensors, str(model_id), class_for(config, cls))

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add a saved adapter, inactive; it stays frozen unless ``is_trainable``."""
        validate_adapter_name(adapter_name)
        config, tensors = io.read_adapter(model_id, kwargs.pop("config", None), is_trainable, **kwargs)
        attach_adapter(self, adapter_name, config, tensors, str(model_id))

    def _base_embedding_keys(self) -> dict[str, torch.Tensor]:
        """File keys of the base embedding parameters (wrapped: ``<m>.base_layer.weight``; or not), to the live ones."""
        out = {}
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            layer = getattr(self.get_base_model(), getter, lambda: None)()
            name = (
                next((n for n, m in self.get_base_model().named_modules() if m is layer), None)
                if layer is not None
                else None
            )
            if name is None:
                continue
            module, path = (layer.base_layer, f"{name}.base_layer") if isinstance(layer, LoraLayer) else (layer, name)
            out.update({f"{io.PREFIX}{path}.{k}": t for k, t in module.named_parameters()})
        return out

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        """Copy on-disk-named tensors into adapter ``adapter_name``; every key and shape must fit."""
        live = self.adapter_tensors(adapter_name)
        tensors = {io.normalize_key(k): v for k, v in tensors.items()}
        # PEFT writes wrapper-internal bias copies with bias="all" + modules_to_save and ignores them on load, as
        # here. The base embedding matrices it writes beside embedding adapters (save_embedding_layers) are loaded
        # into the base, as peft does; any other base-layer weight is ignored.
        ignored = (".modules_to_save.", ".original_module.")
        tensors = {k: v for k, v in tensors.items() if not any(i in k for i in ignored)}
        base_live = self._base_embedding_keys()
        base = {k: v for k, v in tensors.items() if k in base_live}
        tensors = {k: v for k, v in tensors.items() if k not in base and not k.endswith(".base_layer.weight")}
        missing = sorted(set(live) - set(tensors))
        unexpected = sorted(set(tensors) - set(live))
        problems = []
        for key in sorted(set(live) & set(tensors)):
            if tuple(live[key].shape) != tuple(tensors[key].shape):
                layer, _, param = key[len(io.PREFIX) :].rpartition(".lora_")
                problems.append(
                    f"layer {layer or key}: {('lora_' + param) if layer else key} has shape "
                    f"{tuple(tensors[key].shape)} in the file but {tuple(live[key].shape)} in this model"
                )
        if missing:
            problems.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            problems.append(
                f"{len(unexpected)} tensor(s) in the file match no module of this model, e.g. {unexpected[:3]}"
            )
        problems += [
            f"{key[len(io.PREFIX) :]} has shape {tuple(v.shape)} in the file but {tuple(base_live[key].shape)} here: "
            f"the vocabulary was resized for this adapter; call resize_token_embeddings({v.shape[0]}) on the base first"
            for key, v in base.items() if tuple(v.shape) != tuple(base_live[key].shape)
        ]  # fmt: skip
        if problems:
            raise ValueError(
                f"Adapter {source or adapter_name!r} does not fit this base model (is it for another base model or "
                "config?):\n  - " + "\n  - ".join(problems[:10])
            )
        with torch.no_grad():
            for key, target in live.items():
                target.copy_(tensors[key].to(target.dtype))
            for key, value in base.items():  # the embedding matrices saved beside it, as peft loads them
                base_live[key].copy_(value.to(base_live[key].dtype))
        for _, layer in self._layers():  # DoRA's cached weight norms follow the new values
            if isinstance(layer, LoraLayer):
                layer._norm_cache.clear()
        self.loaded_adapters.add(adapter_name)

    # ---- combine --------------------------------------------------------------------------------------------

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
        svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
    ) -> None:  # fmt: skip
        """Create ``adapter_name`` as a weighted combination of ``adapters`` (PEFT's semantics and math; the
        svd family works from the low-rank factors). The new adapter is added frozen and inactive."""
        if adapter_name in self.peft_config:
            return
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {list(self.peft_config)}")
        if len(weights) != len(adapters):
            raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters")
        configs = [self.peft_config[a] for a in adapters]
        convs = {a for _, layer in self._layers() if isinstance(layer, Conv) for a in adapters if a in layer.r}
        variants = [
            a
            for a, c in zip(adapters, configs)
            if c.use_dora or c.lora_bias or c.trainable_token_indices or c.target_parameters or a in convs
        ]
        if variants:
            raise ValueError(
                f"add_weighted_adapter combines plain LoRA factors of linear layers; {variants} use DoRA, lora_bias, "
                "trainable tokens, target_parameters or convolution layers, which it does not combine: merge them one at a time with merge_and_unload"
            )
        if sum(bool(c.modules_to_save) for c in configs) > 1:
            raise ValueError("Cannot add a weighted adapter when several adapters have modules_to_save")
        combination_type = combine.resolve_combination_type(len(adapters), combination_type)
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        rank = combine.new_rank(ranks, combination_type, svd_rank)
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, list) for t in targets):
            merged_targets: list[str] | str = sorted({m for t in targets for m in t})
        elif all(isinstance(t, str) for t in targets):
            merged_targets = "|".join(f"({t})" for t in targets)
        else:
            raise ValueError("all adapter configs should follow the same target modules type (list or regex str)")
        new_config = dataclasses.replace(
            configs[0], r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, target_modules=merged_targets
        )
        new_config.inference_mode = True
        self.add_adapter(adapter_name, new_config)
        with torch.no_grad():
            for _, layer in self._layers():
                if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
                    continue
                present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
                target_a, target_b = _factors(layer, adapter_name)
                target_a.zero_(), target_b.zero_()
                if not present:
                    continue
                factors = [(*_factors(layer, a), layer.scaling[a]) for a, _ in present]
                new_a, new_b = combine.combine_factors(
                    factors, [w for _, w in present], combination_type, rank, svd_clamp=svd_clamp,
                    density=density, majority_sign_method=majority_sign_method,
                )  # fmt: skip
                target_a.copy_(new_a[: target_a.shape[0]]), target_b.copy_(new_b[:, : target_b.shape[1]])


def as_plain_lora(
    tensors: dict[str, torch.Tensor], config: LoraConfig, initial: str | os.PathLike | dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A trained PiSSA/OLoRA adapter as a plain LoRA for the original base: the factors concatenated with the initial
    ones (``initial``: the adapter saved before training, or its tensors), rank and alpha doubled (scaling unchanged)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion does not support rank_pattern/alpha_pattern with use_rslora "
            "(as in peft)"
        )
    if config.use_dora or config.lora_bias:
        raise ValueError(
            "path_initial_model_for_weight_conversion converts plain PiSSA/OLoRA factors, not DoRA/lora_bias"
        )
    if isinstance(initial, dict):
        start, initial = initial, "the initial factors"
    else:
        start = {io.normalize_key(k): v for k, v in io.load_weights(initial).items()}
    converted = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
            if key not in start or start[key].shape != value.shape:
                raise ValueError(
                    f"{initial} is not this adapter's initial state: {key} is missing there or has another shape"
                )
            a = key.endswith(".lora_A.weight")
            initial_value = start[key].to(value)
            converted[key] = torch.cat([value, initial_value] if a else [value, -initial_value], dim=0 if a else 1)
    config = copy.deepcopy(config)
    config.init_lora_weights, config.r = True, 2 * config.r
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return converted, config


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # what peft's save_embedding_layers="auto" looks for


def _targets_embeddings(model: nn.Module, config: LoraConfig) -> bool:
    """Whether ``config`` targets a layer named embed_tokens or lm_head (peft's test for save_embedding_layers)."""
    targets = config.target_modules
    if isinstance(targets, str):
        if config.is_all_linear:
            return False
        return any(
            re.fullmatch(targets, k) and k.split(".")[-1] in EMBEDDING_LAYER_NAMES for k, _ in model.named_modules()
        )
    return any(name in (targets or []) for name in EMBEDDING_LAYER_NAMES)


def numel(p: torch.Tensor) -> int:
    """A parameter's number of values: whole under DeepSpeed ZeRO-3 (which leaves an empty shard in ``p``), and
    unpacked for bitsandbytes 4-bit weights (two values per stored byte)."""
    n = getattr(p, "ds_numel", 0) or p.numel()
    return n * 2 if type(p).__name__ == "Params4bit" else n


def attach_adapter(
    model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str = "",
    peft_class: type[PeftModel] = PeftModel,
) -> PeftModel:  # fmt: skip
    """The one step from read files to a live adapter: ``model`` (a base, or a PeftModel that gets one more adapter)
    with adapter ``name`` holding ``tensors``. A misfit (layer, shape) raises before anything changes; returns the
    PeftModel, in eval mode unless ``config.inference_mode`` is False."""
    peft = model if isinstance(model, PeftModel) else None
    check_file_fits(peft.get_base_model() if peft else model, config, tensors, source)
    if peft is None:
        peft = peft_class(model, config, name)
        undo = peft.unload
    else:
        peft.add_adapter(name, config)
        undo = functools.partial(peft.delete_adapter, name)
    try:
        peft.load_adapter_tensors(name, tensors, source=source)
    except Exception:
        undo()
        raise
    if config.inference_mode:
        peft.eval()
    return peft


def check_file_fits(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Before any allocation: refuse a config whose LoRA factors would hold far more numbers than the file (an absurd
    ``r`` or ``rank_pattern``, hostile or mistaken), which would otherwise allocate r·(in + out) per layer before the
    shapes are compared. Smaller mismatches are left to ``load_adapter_tensors``, which names layers and shapes."""
    planned = factor_numel(model, copy.deepcopy(config))
    held = sum(t.numel() for t in tensors.values())
    if planned > 4 * held + 2**24:
        raise ValueError(
            f"Adapter {source!r} does not fit this base model: its config (r={config.r}, rank_pattern="
            f"{config.rank_pattern}) asks for {planned:,} LoRA parameters here but its weights file holds {held:,}; "
            "r/rank_pattern do not match the tensors, or the adapter is for another (smaller) base model"
        )


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of one adapter: the LoRA factors in the orientation ΔW ∝ B @ A."""
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


_CLASSES: dict[tuple[type, type], type] = {}


def _class_for(cls: type, base_cls: type) -> type:
    """A subclass of ``cls`` (PeftModel or one of PEFT's task classes) whose ``forward`` carries the base model's
    signature, so the Trainer finds the label names, keeps the right dataset columns and knows whether the loss
    accepts extra kwargs. A class with a forward of its own is left as it is."""
    if cls in _CLASSES.values() or any("forward" in c.__dict__ for c in cls.__mro__[: cls.__mro__.index(PeftModel)]):
        return cls
    key = (cls, base_cls)
    if key not in _CLASSES:
        forward = getattr(base_cls, "forward", None)

        def typed_forward(self, *args: Any, **kwargs: Any) -> Any:
            return PeftModel.forward(self, *args, **kwargs)

        if forward is not None:
            typed_forward.__signature__ = inspect.signature(forward)
        _CLASSES[key] = type(cls.__name__, (cls,), {"forward": typed_forward, "__module__": cls.__module__})
    return _CLASSES[key]


def _rebuild(cls: type, base_cls: type) -> PeftModel:
    """An empty instance of ``cls`` for a ``base_cls`` model, for pickle to fill in."""
    return nn.Module.__new__(_class_for(cls, base_cls))


def refuse_eva_start(config: LoraConfig) -> None:
    if config.init_lora_weights == "eva":
        raise ValueError(
            "init_lora_weights='eva' starts lora_A from an SVD of each layer's inputs over a dataloader (peft's "
            "initialize_lora_eva_weights), which this project does not implement: start it with peft and load the "
            "saved adapter here (EVA adapters load), or use init_lora_weights True, 'pissa' or 'olora'"
        )


def get_peft_model(
    model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
    autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False,
) -> PeftModel:  # fmt: skip
    """Inject LoRA adapter ``adapter_name`` into ``model`` (in place) and return the wrapping PeftModel.

    ``autocast_adapter_dtype`` (PEFT's default True): adapters of a float16/bfloat16 base are held in float32; False
    keeps them in the base layer's dtype. ``low_cpu_mem_usage`` is accepted and changes nothing (adapters are small).
    """
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel, several adapter types at once) is not supported: LoRA only")
    refuse_eva_start(peft_config)
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    peft_model = class_for(peft_config)(model, peft_config, adapter_name)
    if not autocast_adapter_dtype:
        for _, layer in peft_model._layers():
            base = getattr(layer, "base_layer", None)
            dtype = getattr(getattr(base, "weight", None), "dtype", None)
            if isinstance(layer, LoraLayer) and dtype in (torch.float16, torch.bfloat16):
                for p in layer.adapter_parameters(adapter_name):
                    p.data = p.data.to(dtype)
    return peft_model


def inject_adapter_in_model(
    peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:  # fmt: skip
    """Add LoRA layers to ``model`` in place, without a PeftModel around it (PEFT's low-level API); the adapter is
    active and trainable, the rest frozen. ``state_dict`` (on-disk keys) fills the adapter."""
    if state_dict is None:
        refuse_eva_start(peft_config)
    for p in model.parameters():
        p.requires_grad_(False)
    holder = PeftModel.__new__(PeftModel)  # the adapter registry and state, not registered as a submodule
    nn.Module.__init__(holder)
    object.__setattr__(holder, "base_model", LoraModel(model, holder))
    holder._init_registry()
    holder.add_adapter(adapter_name, peft_config)
    holder.set_adapter(adapter_name)
    object.__setattr__(model, "_peft_trainer_adapters", holder)
    if state_dict is not None:  # PEFT's keys for an unwrapped model: no base_model.model. prefix
        holder.load_adapter_tensors(adapter_name, {io.PREFIX + k: v for k, v in state_dict.items()}, "state_dict")
    return model


# PEFT's PeftModel subclass per task_type: same behaviour for LoRA, but transformers' pipelines (and user code that
# checks) know a peft model for a task by these class names.
class PeftModelForCausalLM(PeftModel):
    """A PeftModel whose adapter config has task_type CAUSAL_LM."""


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel whose adapter config has task_type SEQ_CLS."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel whose adapter config has task_type TOKEN_CLS."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel whose adapter config has task_type SEQ_2_SEQ_LM."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel whose adapter config has task_type QUESTION_ANS."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel whose adapter config has task_type FEATURE_EXTRACTION."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification, "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "QUESTION_ANS": PeftModelForQuestionAnswering, "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}  # fmt: skip


def class_for(config: LoraConfig, asked: type[PeftModel] = PeftModel) -> type[PeftModel]:
    """The class PEFT builds for ``config``: the task's subclass when ``asked`` is PeftModel itself."""
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel) if asked is PeftModel else asked
