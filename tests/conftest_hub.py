"""Pytest fixture ``hub_server``: a fresh fake Hub on 127.0.0.1 per test, with the real client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import HubServer, client_environment, start_hub_server


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A running ``HubServer`` (free port on 127.0.0.1, storage under ``tmp_path/hub``), always stopped afterwards.

    While the test runs, ``huggingface_hub`` (and transformers' cached ``HfApi``) talk to it: ``HF_ENDPOINT``,
    ``HF_HUB_DISABLE_XET=1``, ``HF_HOME=tmp_path/hf_home``, ``HF_TOKEN=server.token`` and the import-time constants
    are set by ``client_environment`` and restored on teardown; ``HF_HUB_OFFLINE`` is unset for the test.
    """
    with start_hub_server(tmp_path / "hub") as server, client_environment(server, tmp_path / "hf_home"):
        yield server
