"""LoraConfig: the dataclass behind adapter_config.json, with PEFT 0.22's field names, defaults and validation."""

from __future__ import annotations

import enum
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .folders import CONFIG_NAME, resolve_file

# The PEFT release whose adapter_config.json layout this project writes byte for byte.
PEFT_FORMAT_VERSION = "0.22.0"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class TaskType(str, enum.Enum):
    """``LoraConfig(task_type=TaskType.CAUSAL_LM)``; equal to its string (``"CAUSAL_LM"``), formatted as peft's
    (``f"{TaskType.CAUSAL_LM}"`` gives ``"TaskType.CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The adapter kinds this project implements: LoRA."""

    LORA = "LORA"


SUPPORTED_INITS = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_K" (randomized SVD, K iterations)


def is_supported_init(value: Any) -> bool:
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        return value.removeprefix("pissa_niter_").isdigit()
    return value in SUPPORTED_INITS and not (isinstance(value, (int, float)) and not isinstance(value, bool))


def decomposes_base(init: Any) -> bool:
    """Whether ``init_lora_weights`` takes A and B out of the base weight, which keeps the residual (PiSSA, OLoRA)."""
    return isinstance(init, str) and init.startswith(("pissa", "olora"))


# Fields PEFT writes for features this project does not implement, with the value that means "not used".
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "astra_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "kasa_config": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# Written verbatim so the file matches PEFT's; ignored on load.
_INERT_DEFAULTS: dict[str, Any] = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_names(v: Any) -> bool:
    """A string, or a list of strings."""
    return isinstance(v, str) or isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _is_regex(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return True


class PeftConfig:
    """PEFT's base config class. ``PeftConfig.from_pretrained(path)`` reads any adapter_config.json this project can
    load and returns its :class:`LoraConfig` (the one adapter kind implemented here)."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> LoraConfig:
        return LoraConfig.from_pretrained(path, subfolder=subfolder, **hub_kwargs)


@dataclass
class LoraConfig(PeftConfig):
    """LoRA hyperparameters; field names and meanings are PEFT's (``peft.LoraConfig``)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None  # nn.Parameters by name or dotted suffix, e.g. "experts.down_proj"
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layer_replication: list[list[int]] | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    eva_config: dict[str, Any] | None = None  # EVA's settings, kept so an EVA adapter's file reads as peft wrote it
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict[str, str] | None = None
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        # As in peft: peft_type is the enum, task_type stays as given (TaskType or str); enums equal their strings.
        if self.peft_type == "LORA":
            self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Collect every problem and raise one ValueError naming each field and the fix."""
        problems = []
        if self.peft_type != "LORA":
            problems.append(f"peft_type={self.peft_type!r}: only 'LORA' adapters are supported")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r={self.r!r}: the rank must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            problems.append(f"lora_alpha={self.lora_alpha!r}: must be a number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout!r}: must be a number in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r}: use 'none', 'all' or 'lora_only'")
        if not (is_supported_init(self.init_lora_weights) or self.init_lora_weights == "eva"):
            problems.append(
                f"init_lora_weights={self.init_lora_weights!r}: this project implements true, false, 'gaussian', "
                "'pissa', 'pissa_niter_K' and 'olora', and loads EVA adapters (LoftQ, CorDA and Astra need peft)"
            )
        if self.eva_config is not None and not isinstance(self.eva_config, dict):
            problems.append(f"eva_config={self.eva_config!r}: a mapping of EVA's settings (as peft writes it) or null")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r}: use one of {', '.join(TASK_TYPES)} or null")
        tokens = self.trainable_token_indices
        rows = tokens.values() if isinstance(tokens, dict) else [tokens]
        if tokens is not None and not (
            (isinstance(tokens, list) or isinstance(tokens, dict) and all(isinstance(k, str) for k in tokens))
            and all(isinstance(r, list) and r and all(_is_int(i) for i in r) for r in rows)
        ):
            problems.append(
                f"trainable_token_indices={tokens!r}: a list of token ids (for the input embedding) or a mapping "
                "of module name to such a list"
            )
        elif isinstance(tokens, dict) and set(tokens) & set(self.modules_to_save or []):
            problems.append(
                f"trainable_token_indices and modules_to_save both name {sorted(set(tokens) & set(self.modules_to_save))}:"
                " train the layer fully (modules_to_save) or some of its rows (trainable_token_indices), not both"
            )
        spans = self.layer_replication
        if spans is not None and not (
            isinstance(spans, (list, tuple)) and spans
            and all(isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(i) for i in x) and 0 <= x[0] < x[1]
                    for x in spans)
        ):  # fmt: skip
            problems.append(f"layer_replication={spans!r}: a list of [start, end) layer ranges, e.g. [[0, 4], [2, 5]]")
        if self.use_dora is True and self.lora_bias is True:
            problems.append("use_dora and lora_bias are both true: DoRA has no lora_bias (as in peft); drop one")
        for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be true or false")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not _is_names(value):
                problems.append(f"{name}={value!r}: must be a list of module names, a regex string or null")
            elif isinstance(value, str) and not _is_regex(value):
                problems.append(f"{name}={value!r}: not a valid regular expression")
        params = self.target_parameters
        if params is not None and not (isinstance(params, list) and _is_names(params)):
            problems.append(
                f"target_parameters={params!r}: must be a list of parameter names, e.g. ['experts.down_proj']"
            )
        saved = self.modules_to_save
        if saved is not None and not (isinstance(saved, list) and _is_names(saved)):
            problems.append(f"modules_to_save={saved!r}: must be a list of module names or null")
        layers = self.layers_to_transform
        indices = layers if isinstance(layers, (list, tuple)) else [layers]
        if layers is not None and not all(_is_int(i) for i in indices):
            problems.append(f"layers_to_transform={layers!r}: must be a layer index, a list of them or null")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(_is_regex(k) for k in value):
                problems.append(f"{name}={value!r}: must be a mapping of module-name regex to number")
            elif name == "rank_pattern" and any(not _is_int(v) or v <= 0 for v in value.values()):
                problems.append(f"rank_pattern={value!r}: ranks must be positive integers")
            elif name == "alpha_pattern" and any(not _is_number(v) for v in value.values()):
                problems.append(f"alpha_pattern={value!r}: alphas must be numbers")
        has_layers = self.layers_to_transform is not None or self.layers_pattern is not None
        if has_layers and isinstance(self.target_modules, str):
            problems.append("layers_to_transform/layers_pattern cannot be combined with a regex target_modules")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not: set both or neither")
        if problems:
            raise ValueError("Invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    @property
    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear"

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT 0.22 writes: all 42 keys, lists sorted where PEFT holds sets."""
        d = {**_UNSUPPORTED_DEFAULTS, **_INERT_DEFAULTS, **asdict(self)}
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(set(d["target_modules"]))
        if isinstance(d["exclude_modules"], list):
            d["exclude_modules"] = sorted(set(d["exclude_modules"]))
        d["peft_version"] = PEFT_FORMAT_VERSION
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> LoraConfig:
        """Build from an adapter_config.json dict; features this project lacks are refused, never dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "peft_type" in data and data["peft_type"] != "LORA":
            raise ValueError(
                f"{source}: peft_type={data['peft_type']!r} is not supported; this project loads LoRA adapters "
                "(peft_type 'LORA') only"
            )
        problems = [
            f"{key}={data[key]!r} (this project implements plain LoRA; retrain without it or load it with peft)"
            for key, default in _UNSUPPORTED_DEFAULTS.items()
            if key in data and data[key] not in (default, None) and not (default == {} and data[key] == {})
        ]
        if problems:
            raise ValueError(
                f"{source} asks for features this project does not implement:\n  - " + "\n  - ".join(problems)
            )
        known = {f.name for f in fields(cls)}
        ignored = set(_UNSUPPORTED_DEFAULTS) | set(_INERT_DEFAULTS) | {"peft_version", "runtime_config"}
        unknown = sorted(set(data) - known - ignored)
        if unknown:
            warnings.warn(f"{source}: unexpected keys {unknown} for LoraConfig are ignored", UserWarning, stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
    ) -> LoraConfig:
        """Read adapter_config.json from a local folder or a Hub repo id."""
        file = resolve_file(path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{file} is not valid JSON ({e}); the adapter config is corrupt") from None
        return cls.from_dict(data, source=str(file))
