"""Property-based checks against peft 0.22.0 (the oracle): target matching on generated module names and specs, and
the adapter key mapping (in-memory names <-> PEFT file keys) on generated module trees and adapter names."""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import peft
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict
from torch import nn

from peft_trainer import LoraConfig, PeftModel, get_peft_model, io
from peft_trainer.lora.inject import _in_modules_to_save, is_excluded, matches_target
from peft_trainer.lora.layer import LoraLayer

# derandomize: the same examples in every run, so CI never meets a new one by chance (explore locally without it)
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(SETTINGS, max_examples=300)  # pure string matching: many more examples in the same time
COMMON = ["model", "layers", "h", "blocks", "layer", "attn", "self_attn", "mlp", "q_proj", "v_proj", "proj", "fc"]
LAYER_PATTERNS = ["layers", "h", "blocks", "layer"]
# Names a module (or a ModuleDict key) cannot have, and LoRA's own submodule names.
RESERVED = {n for n in dir(nn.ModuleDict()) + dir(nn.ParameterDict())} | {"lora_A", "lora_B", "base_layer"}


PEFT_LORA_INTERNALS = ["lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_variant"]


def _usable(name: str) -> bool:
    return name not in RESERVED and not name.startswith("lora_")


segments = st.one_of(
    st.sampled_from(COMMON), st.integers(0, 3).map(str), st.from_regex(r"[a-z][a-z0-9_]{0,4}", fullmatch=True)
).filter(_usable)
layered_keys = st.builds(
    lambda stack, i, tail: ".".join([stack, str(i), *tail]),
    st.sampled_from(["model.layers", "h", "transformer.h", "encoder.layer", "blocks", "model.blocks"]),
    st.integers(0, 3),
    st.lists(segments, min_size=1, max_size=3),
)
module_keys = st.one_of(st.lists(segments, min_size=1, max_size=6).map(".".join), layered_keys)


def _suffixes(keys: list[str]) -> list[str]:
    return sorted({".".join(k.split(".")[i:]) for k in keys for i in range(k.count(".") + 1)})


def _leaf_targets(keys: list[str]) -> list[str]:
    """Full leaf names and their last segments that match no container (a container would be refused)."""
    inner = {p for k in keys for p in _parents(k)}
    leaves = {t for k in keys if k not in inner for t in (k, k.rsplit(".", 1)[-1])}
    return sorted(leaves - set(_suffixes(sorted(inner))))


@st.composite
def regexes(draw, names: list[str]) -> str:
    """A regex built from pieces that often match the given names (full-match semantics)."""
    prefix = draw(st.sampled_from(["", ".*", r".*\.", r"model\."]))
    middle = draw(
        st.one_of(
            st.sampled_from(names).map(re.escape),
            st.lists(st.sampled_from(names).map(re.escape), min_size=1, max_size=3).map(lambda p: f"({'|'.join(p)})"),
            st.sampled_from([r"\d+", r"[a-z_]+", r"(q|v)_proj", r"layers\.\d+\..*"]),
        )
    )
    return prefix + middle + draw(st.sampled_from(["", r"\..*", "_proj", ".*"]))


@st.composite
def matching_cases(draw) -> tuple[list[str], dict]:
    """Module names and a target spec (names/suffixes or regex, layers filter, exclusions, modules_to_save)."""
    keys = draw(st.lists(module_keys, min_size=1, max_size=10, unique=True))
    names = st.one_of(st.sampled_from(_suffixes(keys)), segments)
    spec: dict = {}
    if draw(st.booleans()):
        spec["target_modules"] = draw(st.lists(names, max_size=5))
        layers = draw(st.one_of(st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3)))
        if layers is not None:
            spec["layers_to_transform"] = layers
            spec["layers_pattern"] = draw(
                st.one_of(st.none(), st.sampled_from(["", *LAYER_PATTERNS]), st.lists(st.sampled_from(LAYER_PATTERNS)))
            )
    else:
        spec["target_modules"] = draw(regexes(_suffixes(keys)))
    spec["exclude_modules"] = draw(st.one_of(st.none(), st.lists(names, max_size=3), regexes(_suffixes(keys))))
    spec["modules_to_save"] = draw(st.one_of(st.none(), st.lists(segments, max_size=2)))
    # peft matches modules_to_save by plain suffix, so "r" also hits its own lora_magnitude_vector (a TypeError)
    assume(not any(n.endswith(m) for m in spec["modules_to_save"] or [] for n in PEFT_LORA_INTERNALS))
    return keys, spec


@st.composite
def layer_cases(draw) -> tuple[list[str], dict]:
    """Stacks of numbered layers, targets among their suffixes, and a layer filter (possibly empty)."""
    keys = draw(st.lists(layered_keys, min_size=1, max_size=10, unique=True))
    spec = {
        "target_modules": draw(st.lists(st.sampled_from(_suffixes(keys)), min_size=1, max_size=3)),
        "layers_to_transform": draw(st.one_of(st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3))),
        "layers_pattern": draw(
            st.one_of(st.none(), st.sampled_from(["", *LAYER_PATTERNS]), st.lists(st.sampled_from(LAYER_PATTERNS)))
        ),
    }
    return keys, spec


def _ours_targets(config: LoraConfig, key: str) -> bool:
    """Our matcher as find_targets applies it: modules_to_save and exclusions first, then the target rule."""
    return not _in_modules_to_save(config, key) and not is_excluded(config, key) and matches_target(config, key)


@CHEAP
@given(st.one_of(matching_cases(), layer_cases()))
def test_target_matching_agrees_with_peft(case):
    keys, spec = case
    ours, theirs = LoraConfig(**spec), peft.LoraConfig(**spec)
    for key in keys:
        assert _ours_targets(ours, key) == bool(check_target_module_exists(theirs, key)), (key, spec)


def _tree(keys: list[str], embedding_every: int = 0) -> nn.Module:
    """A module tree with these dotted names: inner nodes are plain containers, leaves Linear (or Embedding)."""
    torch.manual_seed(0)
    root = nn.Module()
    for i, key in enumerate(sorted(set(keys) | {p for k in keys for p in _parents(k)})):
        parent, _, child = key.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        if any(k.startswith(key + ".") for k in keys):
            owner.add_module(child, nn.Module())
        elif embedding_every and i % embedding_every == 0:
            owner.add_module(child, nn.Embedding(7, 4))
        else:
            owner.add_module(child, nn.Linear(4, 3))
    return root


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _outcome(build):
    """Sorted names of the modules that got LoRA, or the error type when injection is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return sorted(build())
        except (ValueError, TypeError, KeyError) as e:
            return type(e).__name__


@st.composite
def tree_cases(draw) -> tuple[list[str], dict]:
    """A module tree's names and a spec whose targets name leaves (so that injection mostly succeeds)."""
    keys = draw(st.lists(module_keys, min_size=1, max_size=10, unique=True))
    options = _leaf_targets(keys)
    assume(options)
    spec: dict = {"target_modules": draw(st.lists(st.sampled_from(options), min_size=1, max_size=4))}
    if draw(st.booleans()):
        spec["layers_to_transform"] = draw(st.one_of(st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3)))
        spec["layers_pattern"] = draw(st.one_of(st.none(), st.sampled_from(LAYER_PATTERNS)))
    spec["exclude_modules"] = draw(st.one_of(st.none(), st.lists(st.sampled_from(_suffixes(keys)), max_size=2)))
    spec["modules_to_save"] = draw(st.one_of(st.none(), st.lists(segments, max_size=2)))
    # peft matches modules_to_save by plain suffix, so "r" also hits its own lora_magnitude_vector (a TypeError)
    assume(not any(n.endswith(m) for m in spec["modules_to_save"] or [] for n in PEFT_LORA_INTERNALS))
    return keys, spec


@SETTINGS
@given(st.one_of(tree_cases(), matching_cases()))
def test_injected_modules_agree_with_peft(case):
    """The whole injection on a generated tree: the same modules get LoRA, or both refuse."""
    keys, spec = case
    if isinstance(spec["target_modules"], list) and len(spec["target_modules"]) >= 20:
        return  # both compress long lists first; that is covered in test_peft_compat
    base = _tree(keys)

    def ours():
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**spec))
        return [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]

    def theirs():
        model = peft.inject_adapter_in_model(peft.LoraConfig(**spec), copy.deepcopy(base))
        return [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]

    mine, oracle = _outcome(ours), _outcome(theirs)
    assert mine == oracle or (isinstance(mine, str) and isinstance(oracle, str)), (keys, spec, mine, oracle)


adapter_names = st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True).filter(lambda n: _usable(n) and n != "__base__")


@st.composite
def mapping_cases(draw) -> tuple[list[str], list[str], str]:
    keys = draw(st.lists(module_keys, min_size=1, max_size=8, unique=True))
    options = _leaf_targets(keys)
    assume(options)
    targets = draw(st.lists(st.sampled_from(options), min_size=1, max_size=4, unique=True))
    return keys, targets, draw(adapter_names)


def _folder(root: str, name: str) -> Path:
    return Path(root) if name == "default" else Path(root) / name


@SETTINGS
@given(mapping_cases())
def test_key_mapping_round_trips_and_equals_peft(case):
    keys, targets, name = case
    base = _tree(keys, embedding_every=3)
    spec = dict(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**spec), adapter_name=name)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**spec), adapter_name=name)
    file_tensors = ours.adapter_tensors(name)

    # In memory -> file: one file key per trainable parameter, and nothing else.
    in_memory = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    by_id = {id(t): k for k, t in file_tensors.items()}
    to_file = {n: by_id[id(p)] for n, p in in_memory.items()}
    assert sorted(to_file.values()) == sorted(file_tensors)
    # File keys are PEFT's: what get_peft_model_state_dict gives, and io.normalize_key of its in-memory names.
    assert sorted(file_tensors) == sorted(get_peft_model_state_dict(theirs, adapter_name=name))
    lora = [k for k in theirs.state_dict() if re.search(rf"\.lora_[AB]\.{re.escape(name)}\.weight$", k)]
    assert {io.normalize_key(k) for k in lora} == {k for k in file_tensors if ".lora_embedding_" not in k}

    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as peft_dir:
        ours.save_pretrained(ours_dir)
        # File -> in memory: a fresh model gets the same names holding the same values.
        other = _tree(keys, embedding_every=3)
        torch.manual_seed(1)  # its own LoRA init differs from ours: only loading can make the values equal
        back = PeftModel.from_pretrained(other, _folder(ours_dir, name), adapter_name=name, is_trainable=True)
        loaded = {n: p for n, p in back.named_parameters() if p.requires_grad}
        assert sorted(loaded) == sorted(in_memory)
        assert all(torch.equal(loaded[n], in_memory[n]) for n in in_memory)
        # peft reads our file with the same values, and we read peft's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_back = peft.PeftModel.from_pretrained(copy.deepcopy(base), _folder(ours_dir, name), adapter_name=name)
            theirs.save_pretrained(peft_dir)
        peft_state = get_peft_model_state_dict(peft_back, adapter_name=name)
        assert all(torch.equal(peft_state[k], t) for k, t in file_tensors.items())
        ours_from_peft = PeftModel.from_pretrained(copy.deepcopy(base), _folder(peft_dir, name), adapter_name=name)
        expected = get_peft_model_state_dict(theirs, adapter_name=name)
        assert all(torch.equal(t, expected[k]) for k, t in ours_from_peft.adapter_tensors(name).items())
