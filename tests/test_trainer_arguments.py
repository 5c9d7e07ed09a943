"""PeftTrainingArguments / ModelArguments / DataArguments: defaults, YAML and command-line parsing, validation."""

from __future__ import annotations

import pytest
import torch
from transformers import HfArgumentParser

from peft_trainer import LoraConfig, PeftTrainingArguments
from peft_trainer.arguments import DataArguments, ModelArguments
from peft_trainer.quantization import bitsandbytes_config

ALL = (ModelArguments, DataArguments, PeftTrainingArguments)

YAML = """\
model_name_or_path: my-org/tiny-llama
task: causal-lm
dataset: my-org/chat-data
max_length: 256
packing: true
output_dir: {out}
report_to: none
lora_r: 8
lora_alpha: 16
lora_dropout: 0.1
lora_target_modules: [q_proj, v_proj]
lora_modules_to_save: [lm_head]
lora_bias: lora_only
use_rslora: true
init_lora_weights: gaussian
adapter_name: chat
load_in_4bit: true
bnb_4bit_quant_type: fp4
bnb_4bit_compute_dtype: float32
bnb_4bit_use_double_quant: false
learning_rate: 0.0002
"""


def test_defaults_and_to_lora_config(tmp_path):
    args = PeftTrainingArguments(output_dir=str(tmp_path))
    assert args.ddp_find_unused_parameters is False  # TrainingArguments' default is None -> True for wrappers
    assert args.lora_target_modules == "all-linear"
    # No pinned memory without an accelerator (torch would warn at every DataLoader).
    assert args.dataloader_pin_memory is torch.accelerator.is_available()
    cfg = args.to_lora_config(task_type="CAUSAL_LM")
    assert isinstance(cfg, LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (16, 32, 0.05, "all-linear")
    assert (cfg.bias, cfg.use_rslora, cfg.init_lora_weights, cfg.task_type) == ("none", False, True, "CAUSAL_LM")
    assert bitsandbytes_config(args) is None


def test_yaml_parses_every_field(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(YAML.format(out=tmp_path / "out"))
    model_args, data_args, args = HfArgumentParser(ALL).parse_yaml_file(str(recipe))
    assert model_args.model_name_or_path == "my-org/tiny-llama" and model_args.task_type == "CAUSAL_LM"
    assert (data_args.dataset, args.max_length, args.packing) == ("my-org/chat-data", 256, True)
    assert args.learning_rate == 2e-4 and args.adapter_name == "chat"
    cfg = args.to_lora_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.modules_to_save == ["lm_head"]
    assert (cfg.bias, cfg.use_rslora, cfg.init_lora_weights) == ("lora_only", True, "gaussian")
    bnb = bitsandbytes_config(args)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4"
    assert bnb.bnb_4bit_compute_dtype == torch.float32 and bnb.bnb_4bit_use_double_quant is False


def test_command_line_parses(tmp_path):
    argv = [
        "--model_name_or_path", "m", "--output_dir", str(tmp_path), "--lora_r", "4", "--lora-alpha", "8",
        "--lora_target_modules", "q_proj", "k_proj", "--init_lora_weights", "false", "--load_in_8bit",
        "--no_bnb_4bit_use_double_quant", "--ddp_find_unused_parameters", "true", "--lora_modules_to_save", "score",
    ]  # fmt: skip
    _, _, args = HfArgumentParser(ALL).parse_args_into_dataclasses(args=argv)
    cfg = args.to_lora_config()
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.init_lora_weights) == (4, 8, ["q_proj", "k_proj"], False)
    assert cfg.modules_to_save == ["score"]
    assert args.load_in_8bit and not args.load_in_4bit and args.bnb_4bit_use_double_quant is False
    assert args.ddp_find_unused_parameters is True
    assert bitsandbytes_config(args).load_in_8bit
    # without the flag: the changed default, and a single 'all-linear' on the command line means all-linear
    _, _, args = HfArgumentParser(ALL).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--lora_target_modules", "all-linear"]
    )
    assert args.ddp_find_unused_parameters is False and args.to_lora_config().target_modules == "all-linear"


def test_invalid_combinations_raise_one_error_listing_all(tmp_path):
    with pytest.raises(ValueError) as err:
        PeftTrainingArguments(
            output_dir=str(tmp_path), lora_r=0, lora_alpha=-1, lora_dropout=1.5, lora_target_modules=[],
            lora_bias="some", init_lora_weights="loftq", adapter_name="a/b", load_in_4bit=True, load_in_8bit=True,
            bnb_4bit_quant_type="int4", bnb_4bit_compute_dtype="float8",
            # and one problem that TrainingArguments itself finds
            load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch",
        )  # fmt: skip
    message = str(err.value)
    for name in (
        "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_bias", "init_lora_weights",
        "adapter_name", "load_in_4bit and load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
        "load_best_model_at_end",
    ):  # fmt: skip
        assert name in message, name
    assert message.count("\n  - ") == 11


def test_model_and_data_arguments_validate():
    with pytest.raises(ValueError) as err:
        ModelArguments(task="translation", torch_dtype="float64")
    assert "task=" in str(err.value) and "torch_dtype=" in str(err.value)
    with pytest.raises(ValueError, match="num_labels"):
        ModelArguments(task="seq-cls")
    assert ModelArguments(task="seq-cls", num_labels=3).task_type == "SEQ_CLS"
    with pytest.raises(ValueError) as err:
        DataArguments(eval_dataset="x.jsonl", eval_ratio=0.1)
    assert "eval_dataset and eval_ratio" in str(err.value)
