"""PeftTrainer's FSDP save/load paths on an FSDP2-sharded model (one CPU process, gloo): adapter tensors are gathered
by parameter name and written in PEFT format (never the base), and loaded back into the sharded parameters."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from peft_trainer import LoraConfig, PeftTrainer, io
from tests.conftest import tiny_llama
from tests.trainer_helpers import adapter_file, assert_same_tensors, fast_args, files_under


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_save_gathers_adapter_only_and_load_writes_into_shards(tmp_path, monkeypatch, request):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = PeftTrainer(tiny_llama(), fast_args(tmp_path / "run"), lora_config=config)  # before the group exists
    trainer.save_model(str(tmp_path / "plain"), _internal_call=True)
    request.getfixturevalue("process_group")
    model = trainer.model
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight).__name__ == "DTensor"
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    trainer.model_wrapped = model

    trainer.save_model(str(tmp_path / "fsdp"), _internal_call=True)
    assert files_under(tmp_path / "fsdp") == files_under(tmp_path / "plain")
    assert_same_tensors(adapter_file(tmp_path / "fsdp"), adapter_file(tmp_path / "plain"))

    other = {k: torch.full_like(v, 0.5) for k, v in adapter_file(tmp_path / "plain").items()}
    io.save_adapter(tmp_path / "other", other, model.config_for_saving("default"))
    trainer._load_adapters(str(tmp_path / "other"))
    live = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    assert len(live) == len(other) and all(torch.all(v == 0.5) for v in live.values())
