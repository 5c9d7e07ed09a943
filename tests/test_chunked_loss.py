"""The chunked causal-LM loss (peft_trainer.loss) against the model's own loss: same value and gradients."""

from __future__ import annotations

import pytest
import torch

from peft_trainer import LoraConfig, PeftTrainer, PeftTrainingArguments, get_peft_model
from peft_trainer.loss import LinearCrossEntropy

from .conftest import tiny_gpt2, tiny_llama


def _loss_and_grads(model, chunked: bool, **kwargs):
    model.chunked_loss = chunked
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("divisor", [None, 37])
def test_chunked_loss_matches_the_models_own_loss(divisor):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=False))  # fmt: skip
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (3, 19))
    labels = ids.clone()
    labels[0, :7] = -100  # prompt tokens out of the loss
    labels[2, 15:] = -100
    extra = {} if divisor is None else {"num_items_in_batch": torch.tensor(divisor)}
    ref, ref_grads = _loss_and_grads(model, False, input_ids=ids, labels=labels, **extra)
    out, grads = _loss_and_grads(model, True, input_ids=ids, labels=labels, **extra)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_rows_are_chunked_and_ignored_rows_get_no_logits(monkeypatch):
    monkeypatch.setattr("peft_trainer.loss.CHUNK_BYTES", 4 * 100 * 5)  # 5 rows of a 100-word vocabulary
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, requires_grad=True)
    weight = torch.randn(100, 8)
    targets = torch.randint(0, 100, (23,))
    loss = LinearCrossEntropy.apply(hidden, weight, targets, torch.tensor(23.0))
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_hidden @ weight.T, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_eval_and_unsupported_models_keep_their_own_loss_and_logits():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.chunked_loss = True
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.eval()
    assert model(input_ids=ids, labels=ids).logits is not None
    with torch.no_grad():
        model.train()
        assert model(input_ids=ids, labels=ids).logits is not None
    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    gpt2.chunked_loss = True
    gpt2.train()
    ids = torch.randint(0, gpt2.config.vocab_size, (2, 9))
    assert gpt2(input_ids=ids, labels=ids).logits is not None  # GPT-2 is not on the list: the model's own loss


def test_peft_trainer_turns_it_on_and_the_argument_turns_it_off(tmp_path):
    for flag in (True, False):
        args = PeftTrainingArguments(output_dir=str(tmp_path / str(flag)), chunked_loss=flag, report_to="none",
                                     lora_target_modules=["q_proj"], use_cpu=True)  # fmt: skip
        trainer = PeftTrainer(tiny_llama(), args)
        assert trainer.model.chunked_loss is flag
