"""Hub faults during PeftTrainer pushes (HTTP 500, a timed-out request, HTTP 401, a dropped connection), injected by
the local Hub-API server: training finishes, the local adapter is intact, the error names the cause, and a later
`peft-trainer push` (a separate process) uploads the adapter, which then loads back from the Hub.

huggingface_hub 2.4 sends uploads with no timeout at all (its shared httpx client has ``timeout=None``; the
HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT settings only cover downloads), so a client timeout is set the way the
library offers: ``huggingface_hub.set_client_factory``.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import httpx2
import pytest
import torch
from huggingface_hub import set_client_factory
from huggingface_hub.utils import _http

from peft_trainer import PeftModel, PeftTrainer
from tests import conftest_hub, processes
from tests.conftest import tiny_llama
from tests.trainer_helpers import adapter_file, assert_same_tensors, fast_args, tiny_tokenizer, token_dataset

hub_server = conftest_hub.hub_server  # the fixture

CLIENT_TIMEOUT = 2.0
ROOT_FILES = [
    ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "trainer_state.json",
]  # fmt: skip
# fault kind, hub_strategy, what every reported error must say
FAULTS = [
    ("500", "every_save", r"\b500\b"),
    ("timeout", "every_save", r"timed out"),
    ("401", "end", r"\b401\b"),
    ("drop", "end", r"disconnected|connection"),
]


@pytest.fixture
def client_timeout():
    """The shared huggingface_hub HTTP client with a CLIENT_TIMEOUT-second timeout; the default one afterwards."""

    def factory() -> httpx2.Client:
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(CLIENT_TIMEOUT)
        return client

    set_client_factory(factory)
    yield
    set_client_factory(_http.default_client_factory)


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind, strategy, cause", FAULTS, ids=[f"{k}-{s}" for k, s, _ in FAULTS])
def test_push_fault_keeps_training_and_local_adapter_then_cli_push_works(
    hub_server, client_timeout, tmp_path, caplog, kind, strategy, cause
):
    out = tmp_path / "out"
    # Every commit of the run fails; a timed-out request is held by the server (delay None) until it stops.
    hub_server.inject(r"/commit/", kind, count=100, method="POST", delay=None)
    args = fast_args(
        out, max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id="tiny-lora",
        hub_token=hub_server.token, hub_strategy=strategy, hub_always_push=True,
    )  # fmt: skip
    trainer = PeftTrainer(tiny_llama(), args, train_dataset=token_dataset(16), processing_class=tiny_tokenizer())
    with caplog.at_level(logging.ERROR, logger="peft_trainer"):
        result = trainer.train()
    assert result.global_step == 4

    # The fault reached the client, every push failed and each failure says why.
    commits = hub_server.requests("POST", r"/commit/")
    assert commits and all(r.fault == kind for r in commits), [(r.status, r.fault) for r in commits]
    errors = trainer.hub_push_errors
    assert any("final push" in e for e in errors), errors
    if strategy == "every_save":
        assert any("Training in progress, step 2" in e for e in errors), errors
    assert all(re.search(cause, e, re.IGNORECASE) for e in errors), errors
    assert re.search(cause, caplog.text, re.IGNORECASE) and "intact" in caplog.text, caplog.text
    repo = trainer.hub_model_id
    assert hub_server.repo_files(repo).keys() == {".gitattributes"}  # nothing got through

    # The local adapter is the trained one and loads.
    live = {k: v.detach() for k, v in trainer.model.adapter_tensors("default").items()}
    assert_same_tensors(adapter_file(out), live)
    assert_same_tensors(adapter_file(out / "checkpoint-4"), live)
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = _logits(trainer.model, ids)
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), out), ids), expected)

    # A later push from the command line, in its own process, works and the adapter loads back from the Hub.
    hub_server.clear_faults()
    cli = [sys.executable, "-m", "peft_trainer.cli", "push", str(out), "--repo-id", "tiny-lora"]
    done = processes.run(cli, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pushed" in done.stdout
    assert sorted(hub_server.repo_files(repo)) == ROOT_FILES
    pushed = PeftModel.from_pretrained(tiny_llama(), repo)
    assert_same_tensors({k: v.detach() for k, v in pushed.adapter_tensors("default").items()}, live)
    assert torch.equal(_logits(pushed, ids), expected)
