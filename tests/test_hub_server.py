"""The fake Hub in tests/hub_server.py driven by the real huggingface_hub client over HTTP (no mocks)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from tests import conftest_hub
from tests.hub_server import HubServer, client_environment, start_hub_server

hub_server = conftest_hub.hub_server  # the fixture; an assignment, so parameters named hub_server are not F811

WEIGHTS = random.Random(0).randbytes(2 * 1024 * 1024)  # 2 MiB binary: must take the LFS path
NOTES = "LoRA adapter trained offline.\n"


def _adapter_folder(root: Path, notes: str = NOTES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text(notes)
    (root / "weights.bin").write_bytes(WEIGHTS)
    return root


def _statuses(server: HubServer, method: str, path_regex: str) -> list[int]:
    return [r.status for r in server.requests(method, path_regex)]


def test_client_environment_points_client_at_server_and_restores(tmp_path: Path) -> None:
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_DISABLE_XET)
    with start_hub_server() as server, client_environment(server, tmp_path / "home"):
        assert HfApi().endpoint == server.url
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(server.url + "/")
        assert constants.HF_HUB_DISABLE_XET is True and constants.HF_HUB_OFFLINE is False
        assert HfApi().whoami()["name"] == server.user  # HF_TOKEN is picked up implicitly
        root = server.root
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_DISABLE_XET) == before
    assert not root.exists()  # a server-owned temp root is removed on stop


def test_private_repo_upload_list_and_snapshot_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("tiny-lora", private=True).repo_id
    assert repo_id == f"{hub_server.user}/tiny-lora"

    commit = api.upload_folder(repo_id=repo_id, folder_path=_adapter_folder(tmp_path / "out"), commit_message="v1")

    # LFS path, not Xet: one PUT of the 2 MiB file to the storage origin without auth; the text file went inline
    puts = hub_server.requests("PUT")
    assert [(p.origin, p.status, p.authorized) for p in puts] == [("storage", 200, False)]
    assert _statuses(hub_server, "POST", r"/info/lfs/objects/(batch|verify)$") == [200, 200]
    assert _statuses(hub_server, "POST", r"/commit/main$") == [200]
    assert api.list_repo_files(repo_id) == [".gitattributes", "notes.txt", "weights.bin"]
    info = api.model_info(repo_id, files_metadata=True)
    assert info.private is True and info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["notes.txt"].lfs is None
    assert siblings["weights.bin"].lfs is not None and siblings["weights.bin"].lfs.size == len(WEIGHTS)

    # a private repo is invisible without a token
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "notes.txt", token=False, cache_dir=tmp_path / "anon-cache")

    local = Path(snapshot_download(repo_id, cache_dir=tmp_path / "fresh-cache"))
    assert local.name == commit.oid
    assert (local / "notes.txt").read_text() == NOTES
    assert (local / "weights.bin").read_bytes() == WEIGHTS
    assert _statuses(hub_server, "HEAD", r"/resolve/[0-9a-f]{40}/weights\.bin$") == [302]  # CDN-style redirect
    blob_gets = hub_server.requests("GET", r"^/blob/")
    assert [(g.origin, g.status, g.authorized) for g in blob_gets] == [("storage", 200, False)]
    assert hub_server.repo_files(repo_id)["weights.bin"] == WEIGHTS
    assert hub_server.commit_titles(repo_id) == ["v1", "initial commit"]


def test_bad_token_gets_401_naming_the_cause(hub_server: HubServer, tmp_path: Path) -> None:
    repo_id = HfApi().create_repo("guarded").repo_id
    bad = HfApi(token="hf_not_a_real_token")
    with pytest.raises(HfHubHTTPError) as caught:
        bad.upload_folder(repo_id=repo_id, folder_path=_adapter_folder(tmp_path / "out"))
    assert caught.value.response.status_code == 401
    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert "Invalid credentials in Authorization header" in str(caught.value)
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        bad.whoami()
    assert _statuses(hub_server, "POST", r"/preupload/") == [401]
    assert not hub_server.requests("POST", r"/commit/")
    assert list(hub_server.repo_files(repo_id)) == [".gitattributes"]

    # the injected "401" looks the same to the client, even with a valid token
    hub_server.inject(r"/preupload/", "401")
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as caught:
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert caught.value.response.status_code == 401


def test_injected_500_on_commit_is_not_retried_then_next_upload_succeeds(
    hub_server: HubServer, tmp_path: Path
) -> None:
    api = HfApi()
    repo_id = api.create_repo("flaky").repo_id
    folder = _adapter_folder(tmp_path / "out")
    hub_server.inject(r"/commit/main$", "500")
    with pytest.raises(HfHubHTTPError) as caught:
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert caught.value.response.status_code == 500
    assert [(r.status, r.fault) for r in hub_server.requests("POST", r"/commit/")] == [(500, "500")]  # one attempt
    assert list(hub_server.repo_files(repo_id)) == [".gitattributes"]

    api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert _statuses(hub_server, "POST", r"/commit/") == [500, 200]
    assert len(hub_server.requests("PUT")) == 1  # the blob stored before the failed commit is not sent again
    assert hub_server.repo_files(repo_id)["weights.bin"] == WEIGHTS


def test_injected_503_on_preupload_is_retried(hub_server: HubServer) -> None:
    api = HfApi()
    repo_id = api.create_repo("busy").repo_id
    hub_server.inject(r"/preupload/", "503")
    start = time.monotonic()
    api.upload_file(path_or_fileobj=NOTES.encode(), path_in_repo="notes.txt", repo_id=repo_id)
    assert time.monotonic() - start >= 1.0  # Retry-After: 0 still means one second of backoff
    assert _statuses(hub_server, "POST", r"/preupload/") == [503, 200]
    assert hub_server.repo_files(repo_id)["notes.txt"] == NOTES.encode()


def test_dropped_connection_surfaces_then_upload_recovers(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("dropped").repo_id
    folder = _adapter_folder(tmp_path / "out")
    hub_server.inject(r"/commit/", "drop")
    with pytest.raises(httpx2.RemoteProtocolError) as caught:  # not wrapped: the commit POST has no retry
        api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert not isinstance(caught.value, HfHubHTTPError)
    assert [(r.status, r.fault) for r in hub_server.requests("POST", r"/commit/")] == [(0, "drop")]
    assert list(hub_server.repo_files(repo_id)) == [".gitattributes"]

    # after the fault is used up, the same upload goes through (the blob stored before the drop is not re-sent)
    api.upload_folder(repo_id=repo_id, folder_path=_adapter_folder(tmp_path / "out2", notes="second\n"))
    assert _statuses(hub_server, "POST", r"/commit/") == [0, 200]
    assert len(hub_server.requests("PUT")) == 1

    # a drop on the LFS PUT is retried by http_backoff (1 s) and the upload succeeds
    hub_server.clear_log()
    hub_server.inject(r"^/upload/", "drop")
    big = random.Random(1).randbytes(3 * 1024 * 1024)
    api.upload_file(path_or_fileobj=big, path_in_repo="more.bin", repo_id=repo_id)
    assert [(r.status, r.fault) for r in hub_server.requests("PUT")] == [(0, "drop"), (200, None)]
    files = hub_server.repo_files(repo_id)
    assert files["notes.txt"] == b"second\n" and files["weights.bin"] == WEIGHTS and files["more.bin"] == big


def test_held_head_times_out_and_download_falls_back(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("slow").repo_id
    api.upload_file(path_or_fileobj=NOTES.encode(), path_in_repo="notes.txt", repo_id=repo_id)
    hub_server.inject(r"/resolve/", "timeout", method="HEAD")  # held until release()/stop()
    path = hf_hub_download(repo_id, "notes.txt", cache_dir=tmp_path / "cache", etag_timeout=0.5)
    assert Path(path).read_text() == NOTES
    heads = hub_server.requests("HEAD", r"/resolve/")
    assert [(r.status, r.fault) for r in heads] == [(0, "timeout"), (200, None)]


def test_repo_lifecycle_exist_ok_conflict_and_delete(hub_server: HubServer) -> None:
    api = HfApi()
    url = api.create_repo("life")
    assert api.create_repo("life", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("life")
    assert caught.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("elsewhere", repo_type="model", token="hf_test_read")
    assert caught.value.response.status_code == 403
    api.delete_repo(url.repo_id)
    assert not api.repo_exists(url.repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(url.repo_id)


def test_branch_tag_and_pull_request_revisions(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("revs").repo_id
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="dev/x")  # "/" in a revision travels percent-encoded
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id, revision="dev/x")
    api.create_tag(repo_id, tag="v2.0", revision="dev/x")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev/x"} and [t.name for t in refs.tags] == ["v2.0"]
    got = {
        rev: Path(hf_hub_download(repo_id, "f.txt", revision=rev, cache_dir=tmp_path / "cache")).read_bytes()
        for rev in ("main", "dev/x", "v2.0", "refs/pr/1")
    }
    assert got == {"main": b"v1", "dev/x": b"v2", "v2.0": b"v2", "refs/pr/1": b"pr"}
