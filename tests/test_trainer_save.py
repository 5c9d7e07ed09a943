"""trainer.save_model(): adapter + tokenizer + model card, loadable by peft and by transformers' load_adapter."""

from __future__ import annotations

import peft
import pytest
import torch
import yaml

from peft_trainer import PeftModel, PeftTrainer
from tests.conftest import tiny_llama
from tests.trainer_helpers import fast_args, files_under, tiny_tokenizer, token_dataset

TOKEN = "hf_secret_token_do_not_leak_123"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("save")
    args = fast_args(
        out, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=4,
        base_model_name_or_path="my-org/tiny-llama", dataset_name="my-org/tiny-chat", hub_token=TOKEN,
    )  # fmt: skip
    trainer = PeftTrainer(
        tiny_llama(), args, train_dataset=token_dataset(16), eval_dataset=token_dataset(8, seed=1),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    return trainer, out


def test_folder_holds_adapter_tokenizer_card_and_no_base_weights(trained):
    _, out = trained
    top = [f for f in files_under(out) if "/" not in f]
    assert top == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "trainer_state.json", "training_args.bin",
    ]  # fmt: skip


def test_model_card_metadata_and_training_details(trained):
    trainer, out = trained
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "my-org/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["datasets"] == ["my-org/tiny-chat"]
    assert {"lora", "peft", "generated_from_trainer", "base_model:adapter:my-org/tiny-llama"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    body = text.split("---\n", 2)[2]
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert f"- Loss: {eval_loss:.4f}" in body
    assert "- learning_rate: 0.01" in body and "- training_steps: 4" in body
    assert "r=4, lora_alpha=8" in body


def test_no_file_carries_the_hub_token(trained):
    _, out = trained
    assert files_under(out)  # the root and checkpoint-4/
    for name in files_under(out):
        assert TOKEN.encode() not in (out / name).read_bytes(), name
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.lora_r == 4
    assert trained[0].args.hub_token == TOKEN  # the live arguments keep it


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loads_in_peft_and_transformers_with_identical_logits(trained):
    trainer, out = trained
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = _logits(trainer.model, ids)
    assert not torch.equal(ours, _logits(tiny_llama(), ids))  # the adapter does something
    via_peft = _logits(peft.PeftModel.from_pretrained(tiny_llama(), str(out)), ids)
    base = tiny_llama()
    base.load_adapter(str(out))  # transformers' own PEFT integration
    via_transformers = _logits(base, ids)
    via_ours = _logits(PeftModel.from_pretrained(tiny_llama(), str(out)), ids)
    for other in (via_peft, via_transformers, via_ours):
        assert torch.equal(other, ours)
