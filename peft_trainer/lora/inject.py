"""Target matching (names, dotted suffixes, regex, "all-linear", exclusions, layer filters) and module replacement."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

from torch import nn

from ..config import LoraConfig
from .layer import AdapterState, Conv, Embedding, Linear, LoraLayer, ModulesToSaveWrapper, TrainableTokens
from .param import ParamLayer, find_param_targets, param_layer, param_layer_owner

# PEFT compresses long target lists to the shortest separating suffixes from this length on.
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
# pre_classifier: DistilBERT-style heads start it at random, so it trains and is saved too (as in peft 0.22).
AUTO_MODULES_TO_SAVE = {task: ["classifier", "score", "pre_classifier"] for task in ("SEQ_CLS", "TOKEN_CLS")}
AUTO_MODULES_TO_SAVE["QUESTION_ANS"] = ["qa_outputs"]
# PEFT's per-architecture defaults when target_modules is None (the common ones).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "t5": ["q", "v"], "bloom": ["query_key_value"],
}  # fmt: skip


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, *CONVS, LoraLayer)) or _is_conv1d(module)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, LoraLayer):
        return isinstance(module, Linear)
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) pairs a config may target: everything except LoRA internals and wrapped copies."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            skip.append(name + ".")
        yield name, module


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:  # None, "" or []: any layer pattern, as in PEFT
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        return int(m.group(1)) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def matches_target(config: LoraConfig, key: str) -> bool:
    """PEFT's rule: regex string = full match; list = exact name, or dotted suffix then the layer filter."""
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not targets:
        return False
    if key in targets:  # named in full: PEFT applies no layer filter
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    if config.layers_to_transform is None or config.layers_to_transform == []:  # [] filters nothing in PEFT
        return True
    index = _layer_index(key, config.layers_pattern)
    wanted = config.layers_to_transform
    return index is not None and index in ([wanted] if isinstance(wanted, int) else wanted)


def is_excluded(config: LoraConfig, key: str) -> bool:
    excl = config.exclude_modules
    if excl is None:
        return False
    if isinstance(excl, str):
        return re.fullmatch(excl, key) is not None
    return any(key == e or key.endswith("." + e) for e in excl)


def _in_modules_to_save(config: LoraConfig, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", key) for name in config.modules_to_save or [])


def pattern_value(patterns: dict, key: str, default):
    """First rank_pattern/alpha_pattern entry whose regex matches a dotted suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def minimal_suffixes(targets: set[str], others: set[str]) -> set[str]:
    """Shortest dotted suffixes that still separate ``targets`` from ``others`` (PEFT's compression)."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for name in others for s in suffixes(name)}
    required: set[str] = set()
    for name, options in sorted(((t, suffixes(t)) for t in targets), key=lambda item: item[1]):
        for suffix in options:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(name.endswith("." + r) for r in required):
                required.add(suffix)
                break
    return required or set(targets)


def resolve_targets(model: nn.Module, config: LoraConfig) -> None:
    """Fill in what PEFT fills in before matching: defaults, "all-linear" expansion, auto modules_to_save."""
    if config.task_type in AUTO_MODULES_TO_SAVE:
        extra = AUTO_MODULES_TO_SAVE[config.task_type]
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *extra]))
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules is not set and there is no default for model type {model_type!r}; "
                f"set target_modules, e.g. to 'all-linear' or some of {_candidate_names(model)}"
            )
        config.target_modules = list(DEFAULT_TARGETS[model_type])
    if config.is_all_linear:
        excluded = set()
        get_out = getattr(model, "get_output_embeddings", None)
        output = get_out() if callable(get_out) else None
        if output is None and config.task_type == "SEQ_CLS":
            output = next((getattr(model, n) for n in ("score", "classifier") if hasattr(model, n)), None)
        for name, module in candidate_modules(model):
            if output is not None and module is output:
                excluded.add(name)
        names = {n for n, m in candidate_modules(model) if _is_linear(m) and n not in excluded}
        config.target_modules = sorted(names)
    targets = config.target_modules
    if isinstance(targets, list) and len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        ends = tuple("." + t for t in targets)
        others = {n for n, _ in candidate_modules(model) if n not in targets and not n.endswith(ends)}
        compressed = minimal_suffixes(set(targets), others)
        if len(compressed) < len(targets):
            config.target_modules = sorted(compressed)


def _candidate_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in candidate_modules(model) if is_supported(m)})


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` adapts; raises ValueError listing the candidates when none match."""
    matched, excluded = [], []
    for name, _module in candidate_modules(model):
        if _in_modules_to_save(config, name):
            continue
        if is_excluded(config, name):
            excluded.append(name)
            continue
        if matches_target(config, name):
            matched.append(name)
    if matched:
        return matched
    hint = f"Modules that can be adapted here: {_candidate_names(model)}."
    if config.layers_to_transform is not None:
        hint += f" layers_to_transform={config.layers_to_transform} and layers_pattern={config.layers_pattern} apply."
    if excluded:
        raise ValueError(f"All modules matching target_modules were excluded by exclude_modules. {hint}")
    raise ValueError(f"Target modules {config.target_modules} not found in the base model. {hint}")


def _module_targets(model: nn.Module, config: LoraConfig, has_params: bool) -> list[str]:
    """The modules to adapt; none needed when target_parameters matched (as in peft, target_modules may be [])."""
    if has_params and not config.target_modules:
        return []
    try:
        return find_targets(model, config)
    except ValueError:
        if not has_params:
            raise
        return []


def factor_numel(model: nn.Module, config: LoraConfig) -> int:
    """How many numbers adapter ``config`` would put in LoRA factors on ``model``: r·(in + out) per target, counted
    without allocating anything. Resolves ``config``'s targets in place (pass a copy)."""
    resolve_targets(model, config)
    params = find_param_targets(model, config, "")
    total = 0
    for path, parameter in params:
        shape = param_layer_owner(model.get_submodule(path)).get_parameter(parameter).shape
        total += (
            pattern_value(config.rank_pattern, f"{path}.{parameter}", config.r)
            * (shape[0] if len(shape) == 3 else 1)
            * sum(shape[-2:])
        )
    for key in _module_targets(model, config, bool(params)):
        module = model.get_submodule(key)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Embedding) or _is_conv1d(base):
            n_in, n_out = base.weight.shape
        elif hasattr(base, "in_features"):
            n_in, n_out = base.in_features, base.out_features
        else:
            continue  # not supported: inject() says so
        total += pattern_value(config.rank_pattern, key, config.r) * (n_in + n_out)
    return total


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject(model: nn.Module, config: LoraConfig, name: str, state: AdapterState) -> list[nn.Module]:
    """Add adapter ``name`` to every target of ``model`` (in place); returns the LoRA layers and wrappers touched.

    Raises before changing anything when a target is unsupported or already holds ``name``. With
    ``layer_replication`` the decoder layers are replicated first (see :func:`replicate_layers`).
    """
    if config.layer_replication:
        replicate_layers(model, config.layer_replication)
    resolve_targets(model, config)
    params = find_param_targets(model, config, name)
    targets = _module_targets(model, config, bool(params))
    for key in targets:
        module = model.get_submodule(key)
        if isinstance(module, LoraLayer) and name in module.r:
            raise ValueError(f"Module {key} already has a LoRA adapter named {name!r}; use another adapter name")
        if config.lora_bias and isinstance(module, (nn.Embedding, Embedding)):
            raise ValueError(
                f"lora_bias=True is not supported for embedding layers ({key}): target linear layers only"
            )
        if not is_supported(module):
            raise ValueError(
                f"Target module {key} ({type(module).__name__}) is not supported; LoRA here adapts "
                "torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d and transformers Conv1D layers"
            )
    tokens = _token_targets(model, config, set(targets))
    # An EVA adapter is only ever loaded here (get_peft_model refuses to start one): its values come from the file.
    init = True if config.init_lora_weights == "eva" else config.init_lora_weights
    touched: list[nn.Module] = []
    for key in targets:
        module = model.get_submodule(key)
        if not isinstance(module, LoraLayer):
            if isinstance(module, nn.Embedding):
                module = Embedding(module, state)
            elif isinstance(module, CONVS):
                module = Conv(module, state)
            else:
                conv1d = _is_conv1d(module)
                if conv1d != config.fan_in_fan_out:
                    warnings.warn(
                        f"fan_in_fan_out is set to {conv1d} for {key} ({type(module).__name__})", UserWarning, 2
                    )
                    config.fan_in_fan_out = conv1d
                module = Linear(module, state, fan_in_fan_out=conv1d)
            set_module(model, key, module)
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        module.update_layer(
            name, r, alpha, config.lora_dropout, init, config.use_rslora,
            lora_bias=config.lora_bias, use_dora=config.use_dora,
        )  # fmt: skip
        touched.append(module)
    for path, parameter in params:
        module = param_layer(model.get_submodule(path), parameter)
        if module is None:
            module = ParamLayer(model.get_submodule(path), state, parameter)
            set_module(model, path, module)
        key = f"{path}.{parameter}"
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        module.update_layer(name, r, alpha, 0.0, init, config.use_rslora)
        touched.append(module)
    for key, module in list(candidate_modules(model)):
        if any(key.endswith(m) for m in config.modules_to_save or []):
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module, state)
                set_module(model, key, module)
            module.update_layer(name)
            touched.append(module)
    wrapped: dict[str, TrainableTokens] = {}
    for key, indices, tied_to in tokens:
        module = model.get_submodule(key)
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module, state, tied=wrapped.get(tied_to) if tied_to else None)
            set_module(model, key, module)
        module.update_layer(name, indices)
        wrapped[key] = module
        touched.append(module)
    return touched


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers and the ModuleList's attribute name (Llama-, BERT- and Falcon-like)."""
    root = model
    while hasattr(root, "model"):
        root = root.model
    root = getattr(root, "bert", root)
    for holder, attr in ((root, "layers"), (getattr(root, "encoder", None), "layer"), (root, "h")):
        if holder is not None and isinstance(getattr(holder, attr, None), nn.ModuleList):
            return holder, attr
    raise ValueError("layer_replication needs a model whose layers are a ModuleList (Llama, BERT or Falcon-like)")


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """peft's layer_replication: the layers become those of each [start, end) range in turn, copies sharing their
    base weights (``[[0, 4], [2, 5]]`` turns 5 layers into 0, 1, 2, 3, 2, 3, 4). Done once per model; each copy
    then gets LoRA layers of its own."""
    done = getattr(model, "_peft_trainer_layer_map", None)
    if done is not None:
        if done != [list(x) for x in layer_map]:
            raise ValueError(f"the layers were replicated with {done}; every adapter must use that layer_replication")
        return
    holder, attr = _decoder_layers(model)
    layers = getattr(holder, attr)
    if max(end for _, end in layer_map) > len(layers):
        raise ValueError(f"layer_replication={layer_map} reaches past the model's {len(layers)} layers")
    copies = []
    for start, end in layer_map:
        for i in range(start, end):
            shared = {id(t): t for t in (*layers[i].parameters(), *layers[i].buffers())}
            copy_ = copy.deepcopy(layers[i], memo=shared)  # a new module tree around the same tensors
            for sub in copy_.modules():
                if hasattr(sub, "layer_idx"):  # the KV cache slot
                    sub.layer_idx = len(copies)
            copies.append(copy_)
    setattr(holder, attr, nn.ModuleList(copies))
    if hasattr(getattr(model, "config", None), "num_hidden_layers"):
        model.config.num_hidden_layers = len(copies)
    model._peft_trainer_layer_map = [list(x) for x in layer_map]


def _token_targets(
    model: nn.Module, config: LoraConfig, lora_targets: set[str]
) -> list[tuple[str, list[int], str | None]]:
    """(module name, row indices, name of the embedding it is tied to) for ``trainable_token_indices``: a list means
    the input embedding (and an output layer whose weight is tied to it); a mapping names modules (dotted suffixes)."""
    tokens = config.trainable_token_indices
    if tokens is None:
        return []
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if get_input else None
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(tokens, dict):
        found = []
        for wanted, indices in tokens.items():
            keys = [n for n, m in model.named_modules() if n == wanted or n.endswith("." + wanted)]
            if not keys:
                embeddings = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, TrainableTokens))]
                raise ValueError(
                    f"trainable_token_indices names {wanted!r}, which matches no module; embedding layers: {embeddings}"
                )
            found += [(k, list(indices)) for k in keys]
    elif embedding is None or id(embedding) not in names:
        raise ValueError("trainable_token_indices as a list needs a model with get_input_embeddings(); name the layer")
    else:
        found = [(names[id(embedding)], list(tokens))]
    out: list[tuple[str, list[int], str | None]] = []
    for key, indices in found:
        module = model.get_submodule(key)
        if key in lora_targets or isinstance(module, LoraLayer) and not isinstance(module, TrainableTokens):
            raise ValueError(f"{key} is both a LoRA target and in trainable_token_indices: choose one for it")
        if not isinstance(module, (nn.Embedding, nn.Linear, TrainableTokens)):
            raise ValueError(
                f"trainable_token_indices targets {key} ({type(module).__name__}): use an embedding layer"
            )
        out.append((key, indices, None))
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if get_output else None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    embedding_key = names.get(id(embedding)) if embedding is not None else None
    if tied and head is not None and id(head) in names and any(k == embedding_key for k, _, _ in out):
        head_key = names[id(head)]
        if head_key not in {k for k, _, _ in out}:
            indices = next(i for k, i, _ in out if k == embedding_key)
            out.append((head_key, indices, embedding_key))  # its weight is the embedding's: the same rows
    return out
