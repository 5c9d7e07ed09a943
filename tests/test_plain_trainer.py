"""A peft + transformers.Trainer script with only the import changed: adapter-only checkpoints and final folder, the
same files as with peft, exact resume, the best checkpoint loaded back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import peft
from transformers import Trainer, TrainingArguments, set_seed

import peft_trainer
from tests import processes
from tests.conftest import tiny_llama
from tests.space_helpers import free_port
from tests.trainer_helpers import adapter_file, assert_same_tensors, fast_args, files_under, token_dataset

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _trainer(library, folder, **overrides) -> Trainer:
    """The same script for peft and for peft_trainer: only the module differs."""
    args = fast_args(folder, cls=TrainingArguments, save_strategy="steps", save_steps=2, **overrides)
    set_seed(args.seed)
    model = library.get_peft_model(tiny_llama(), library.LoraConfig(**LORA))
    return Trainer(model, args, train_dataset=token_dataset(16), eval_dataset=token_dataset(8, seed=1))


def test_checkpoints_and_final_folder_hold_peft_s_files(tmp_path):
    theirs, ours = _trainer(peft, tmp_path / "peft"), _trainer(peft_trainer, tmp_path / "ours")
    theirs.train(), ours.train()
    theirs.save_model(), ours.save_model()
    assert files_under(tmp_path / "ours") == files_under(tmp_path / "peft")
    assert "checkpoint-2/adapter_model.safetensors" in files_under(tmp_path / "ours")
    assert not list((tmp_path / "ours").rglob("model.safetensors"))
    assert_same_tensors(adapter_file(tmp_path / "ours"), adapter_file(tmp_path / "peft"), atol=1e-5)
    peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours" / "checkpoint-4"))  # peft reads them


def test_peft_trainer_writes_the_same_files_and_two_more(tmp_path):
    """The README's table: PeftTrainer adds optimizer_param_names.json to checkpoints and trainer_state.json to the
    final folder, and nothing else differs from peft + Trainer."""
    theirs = _trainer(peft, tmp_path / "peft")
    args = fast_args(tmp_path / "ours", save_strategy="steps", save_steps=2, lora_dropout=0.0)
    ours = peft_trainer.PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16))
    theirs.train(), ours.train()
    theirs.save_model(), ours.save_model()
    extra = {
        "checkpoint-2/optimizer_param_names.json",
        "checkpoint-4/optimizer_param_names.json",
        "trainer_state.json",
    }
    assert set(files_under(tmp_path / "ours")) == set(files_under(tmp_path / "peft")) | extra


def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path):
    whole = _trainer(peft_trainer, tmp_path / "whole")
    whole.train()
    resumed = _trainer(peft_trainer, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert_same_tensors(
        adapter_file(tmp_path / "resumed" / "checkpoint-4"), adapter_file(tmp_path / "whole" / "checkpoint-4")
    )


def test_best_checkpoint_is_loaded_back_at_the_end(tmp_path):
    trainer = _trainer(
        peft_trainer, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,  # the worse loss: not the last checkpoint
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and best.endswith("checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    assert_same_tensors(adapter_file(tmp_path / "final"), adapter_file(best))


def test_other_models_keep_transformers_behaviour(tmp_path):
    """A plain model in a plain Trainer still saves model.safetensors: only peft_trainer models change."""
    args = fast_args(tmp_path, cls=TrainingArguments, max_steps=1)
    Trainer(tiny_llama(), args, train_dataset=token_dataset(4)).save_model()
    assert (tmp_path / "model.safetensors").is_file()


REFUSE_DEEPSPEED = """
import sys
from transformers import Trainer, TrainingArguments
import peft_trainer
from tests.conftest import tiny_llama
from tests.trainer_helpers import token_dataset
ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
args = TrainingArguments(output_dir=sys.argv[1], deepspeed=ds, report_to="none", max_steps=1)
model = peft_trainer.get_peft_model(tiny_llama(), peft_trainer.LoraConfig(r=4, target_modules="all-linear"))
try:
    Trainer(model, args, train_dataset=token_dataset(4))
except ValueError as e:
    print("REFUSED:", e)
"""


def test_deepspeed_in_a_plain_trainer_is_refused_by_name(tmp_path):
    """Under DeepSpeed a plain Trainer would checkpoint the base model: refused when it is built, naming PeftTrainer
    (one DeepSpeed process, as accelerate launch starts each)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    out = processes.run([sys.executable, "-c", REFUSE_DEEPSPEED, str(tmp_path)], check=True, cwd=root, env=env)
    assert "REFUSED: Trainer with FSDP or DeepSpeed" in out.stdout and "peft_trainer.PeftTrainer" in out.stdout
    assert not list(tmp_path.rglob("*.safetensors"))
