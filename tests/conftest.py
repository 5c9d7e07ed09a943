"""Shared fixtures: tiny models built from configs (no downloads) and offline settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory):
    """The session's embedded-model cache (one folder for every module, so models are built once), never ~/.cache."""
    from peft_trainer.models import CACHE_ENV

    root = tmp_path_factory.getbasetemp() / "peft_trainer_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        yield root


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        num_labels=3, max_position_embeddings=64,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}


@pytest.fixture
def inputs() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(1, 100, (3, 10))


def pytest_collection_finish(session: pytest.Session) -> None:
    """One-time builds before any test's clock starts: DeepSpeed compiles its shared-memory op (about 4 minutes on a
    cold 2-core machine) the first time a process group starts on the CPU; afterwards it loads from the cache."""
    if not any("deepspeed" in item.nodeid for item in session.items):
        return
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        return
    print("\nbuilding DeepSpeed's CPU ops once (cached afterwards) ...", flush=True)
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
