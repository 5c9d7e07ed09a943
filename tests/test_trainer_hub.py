"""Pushing with the real huggingface_hub client over HTTP to the local Hub-API server: hub strategies, allow-listed
files, no token in any file, a final push, failed pushes that keep local files, and loading the pushed adapter."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from huggingface_hub import HfApi

from peft_trainer import PeftModel, PeftTrainer
from tests import conftest_hub
from tests.conftest import tiny_llama
from tests.trainer_helpers import fast_args, files_under, tiny_tokenizer, token_dataset

hub_server = conftest_hub.hub_server  # the fixture

ROOT_FILES = [
    ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "trainer_state.json",
]  # fmt: skip
CHECKPOINT_FILES = [
    "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "optimizer_param_names.json",
    "rng_state.pth", "scheduler.pt", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
    "training_args.bin",
]  # fmt: skip


def _trainer(out, token, **overrides) -> PeftTrainer:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"stale full weights")  # must never be uploaded
    (out / "notes.txt").write_text("private notes")
    args = fast_args(
        out, **{
            "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "push_to_hub": True,
            "hub_model_id": "tiny-lora", "hub_token": token, "hub_always_push": True,
            "base_model_name_or_path": "my-org/tiny-llama", **overrides,
        },
    )  # fmt: skip
    return PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16), processing_class=tiny_tokenizer())


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize(
    "strategy, folders, titles",
    [
        ("end", [], ["End of training"]),
        ("every_save", [], ["Training in progress, step 2", "Training in progress, step 4", "End of training"]),
        ("checkpoint", ["last-checkpoint"], None),
        ("all_checkpoints", ["checkpoint-2", "checkpoint-4"], None),
    ],
)
def test_hub_strategies_push_adapter_files_only(hub_server, tmp_path, strategy, folders, titles):
    trainer = _trainer(tmp_path / "out", hub_server.token, hub_strategy=strategy, hub_private_repo=True)
    trainer.train()
    repo = trainer.hub_model_id
    assert repo == f"{hub_server.user}/tiny-lora" and HfApi().model_info(repo).private is True
    files = hub_server.repo_files(repo)
    expected = ROOT_FILES + [f"{d}/{f}" for d in folders for f in CHECKPOINT_FILES]
    assert sorted(files) == sorted(expected)
    assert not any(hub_server.token.encode() in data for data in files.values())
    history = hub_server.commit_titles(repo)[::-1]  # oldest first
    assert history[-1] == "End of training"
    if titles is not None:
        assert history[1:] == titles  # after the repo's initial commit
    assert b"library_name: peft" in files["README.md"] and b"base_model_relation: adapter" in files["README.md"]
    assert trainer.hub_push_errors == []


def test_pushed_adapter_loads_back_in_ours_and_peft(hub_server, tmp_path):
    trainer = _trainer(tmp_path / "out", hub_server.token, hub_strategy="checkpoint")
    trainer.train()
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = _logits(trainer.model, ids)
    ours = PeftModel.from_pretrained(tiny_llama(), trainer.hub_model_id)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), trainer.hub_model_id)
    assert torch.equal(_logits(ours, ids), expected) and torch.equal(_logits(theirs, ids), expected)
    args = torch.load(tmp_path / "out" / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and trainer.args.hub_token == hub_server.token


def test_bad_token_keeps_local_files_and_says_what_failed(hub_server, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="peft_trainer"):
        trainer = _trainer(out, "hf_not_a_valid_token")
        result = trainer.train()
    assert result.global_step == 4
    assert trainer.hub_push_errors and "repository creation" in trainer.hub_push_errors[0]
    assert "401" in trainer.hub_push_errors[0] and "401" in caplog.text
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "checkpoint-4/optimizer.pt"} <= set(
        files_under(out)
    )
    assert not hub_server.requests("POST", r"/commit/")


def test_server_errors_keep_training_and_local_files_then_a_later_push_works(hub_server, tmp_path, caplog):
    out = tmp_path / "out"
    hub_server.inject(r"/commit/", "500", count=1000, method="POST")
    with caplog.at_level(logging.ERROR, logger="peft_trainer"):
        trainer = _trainer(out, hub_server.token, hub_strategy="checkpoint")
        result = trainer.train()
    assert result.global_step == 4
    failed = "\n".join(trainer.hub_push_errors)
    assert "Training in progress, step 2" in failed and "final push" in failed and "500" in failed
    assert "500" in caplog.text
    local = set(files_under(out))
    assert {"adapter_model.safetensors", "README.md", "checkpoint-2/adapter_model.safetensors"} <= local
    assert {f"checkpoint-4/{f}" for f in CHECKPOINT_FILES if not f.startswith("tokenizer")} <= local
    assert hub_server.repo_files(trainer.hub_model_id).keys() == {".gitattributes"}  # nothing got through

    hub_server.clear_faults()
    trainer.push_to_hub(commit_message="Retry")
    assert hub_server.commit_titles(trainer.hub_model_id)[0] == "Retry"
    assert sorted(hub_server.repo_files(trainer.hub_model_id)) == ROOT_FILES
