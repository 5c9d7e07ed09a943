"""Stdlib-only fake Hugging Face Hub (HTTP API subset) on 127.0.0.1 for offline tests with the real client.

What it serves (enough for the real, unmodified ``huggingface_hub`` 2.x client without Xet):
``HfApi.create_repo`` / ``delete_repo`` / ``whoami`` / ``repo_info`` / ``model_info`` / ``list_repo_files`` /
``list_repo_tree`` / ``list_repo_refs`` / ``list_repo_commits`` / ``create_branch`` / ``create_tag``,
``upload_file`` / ``upload_folder`` / ``create_commit`` (preupload, regular files inline in the NDJSON commit, LFS
files through the LFS batch API, a ticketed PUT on a separate "storage" origin and the verify call, ``create_pr``,
``parentCommit``), and ``hf_hub_download`` / ``snapshot_download`` (``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
with ``X-Repo-Commit``, ``ETag``, ``Content-Length``; LFS files answer ``302`` to a signed URL on the storage
origin with ``X-Linked-Etag``/``X-Linked-Size``, like the Hub's CDN redirect; ``Range`` is honoured).
Not served: Xet, multipart LFS, ``paths-info`` (copy operations), pagination, YAML validation (always valid).

Storage (``server.root``): content-addressed blobs in ``objects/<sha256>`` and one plain folder per commit in
``repos/<type>s/<ns>/<name>/snapshots/<commit>/`` (hard links), so a test can also assert on files directly.

Pointing the client at it (``client_environment(server, hf_home)`` does all of this and undoes it on exit):

- ``HF_ENDPOINT=server.url``. ``huggingface_hub`` reads it once at import (``constants.ENDPOINT``,
  ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` used by ``hf_hub_url``, and the module-level ``hf_api.api`` behind
  ``huggingface_hub.upload_folder`` & co.), and transformers caches ``transformers.utils.hub._hf_api``. For an
  already imported client the helper patches those attributes and resets the transformers cache.
  ``HfApi(endpoint=server.url)`` / ``hf_hub_download(..., endpoint=server.url)`` also work without any of it.
- ``HF_HUB_DISABLE_XET=1`` (or ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``, read on every call): with
  hf_xet installed and Xet on, the client asks for ``/xet-write-token`` and the upload fails (this fake answers 404).
- ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` unset (and ``constants.HF_HUB_OFFLINE = False``): offline mode
  blocks every request, 127.0.0.1 included. ``HF_OIDC_RESOURCE`` unset (it triggers a token exchange).
- ``HF_HOME=<tmp>`` and ``HF_HUB_CACHE=<tmp>/hub`` (token file, caches), ``HF_TOKEN=server.token``,
  ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_PROGRESS_BARS=1``, ``NO_PROXY`` including 127.0.0.1.

Auth: ``tokens`` maps token -> ``TokenInfo(user, write, orgs)``; defaults: ``hf_test_write`` (user ``testuser``,
write, org ``testorg``) and ``hf_test_read`` (read only). Unknown token on any route -> 401
``{"error": "Invalid credentials in Authorization header"}`` (+ ``X-Error-Message``); anonymous write or anonymous
read of a private repo -> 401 with ``X-Error-Code: RepoNotFound``; other users' private repos -> 404 RepoNotFound;
read token writing -> 403.

Test hooks: ``server.inject(path_regex, kind, count=1, method=None, delay=None)`` makes the next ``count`` matching
requests fail; ``kind`` is an HTTP status (``"500"``, ``"503"``, ``"401"``, ``"429"``, ...; 5xx/429 carry
``Retry-After: 0``), ``"drop"`` (close the connection without any response) or ``"timeout"`` (hold the request for
``delay`` seconds or until ``server.release()``/``stop()``, then answer normally). ``server.log`` lists every request
as ``LoggedRequest(method, path, status, ...)`` (status 0 = no response), recorded before the response is sent.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tar.*", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*",
)  # fmt: skip
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
RETRYABLE = (408, 429, 500, 502, 503, 504)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class TokenInfo:
    """Who a token belongs to: ``user`` namespace, write permission, and organisations it may write to."""

    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


@dataclass
class LoggedRequest:
    """One request as the server saw it; ``status`` 0 means no response was sent (drop / timeout fault)."""

    method: str
    path: str
    status: int
    query: str = ""
    fault: str | None = None
    authorized: bool = False
    origin: str = "hub"  # "hub" or "storage" (LFS PUT and redirected LFS downloads)


@dataclass
class Fault:
    """An injected failure for the next ``remaining`` requests whose raw path matches ``pattern``."""

    pattern: re.Pattern[str]
    kind: str
    remaining: int
    method: str | None = None
    delay: float | None = None


@dataclass(frozen=True)
class _File:
    sha256: str
    size: int
    git_oid: str
    lfs: bool
    pointer_size: int = 0


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, _File]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    pr_count: int = 0


class HubError(Exception):
    """An error answer: ``status``, the ``{"error": message}`` body, optional ``X-Error-Code`` and extra fields."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


_ROUTE_TABLE = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/{T}/{R}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", r"/api/{T}/{R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("GET", r"/api/{T}/{R}/refs", "refs"),
    ("GET", r"/api/{T}/{R}/commits/(?P<rev>[^/]+)", "commits"),
    ("POST", r"/api/{T}/{R}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", r"/api/{T}/{R}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST DELETE", r"/api/{T}/{R}/branch/(?P<ref>[^/]+)", "branch"),
    ("POST DELETE", r"/api/{T}/{R}/tag/(?P<ref>[^/]+)", "tag"),
    ("POST", r"/{P}{R}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", r"/{P}{R}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("GET HEAD", r"/{P}{R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_PARTS = {
    "T": r"(?P<rtype>models|datasets|spaces)",
    "R": r"(?P<ns>[^/]+)/(?P<name>[^/]+)",
    "P": r"(?:(?P<pfx>datasets|spaces)/)?",
}
ROUTES = [
    (method.split(), re.compile(re.sub(r"\{(\w)\}", lambda m: _PARTS[m[1]], pattern)), name)
    for method, pattern, name in _ROUTE_TABLE
]
STORAGE_ROUTES = [
    (["PUT"], re.compile(r"/upload/(?P<ticket>[0-9a-f]+)"), "storage_put"),
    (["GET", "HEAD"], re.compile(r"/blob/(?P<oid>[0-9a-f]{64})"), "storage_get"),
]


class HubServer:
    """The fake Hub: state, fault injection, request log, and the two HTTP listeners (API and LFS storage)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, TokenInfo] | None = None,
        regular_max: int = 10 * 1024 * 1024,
        lfs_redirect: bool = True,
        retry_after: int | None = 0,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="fake-hub-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(exist_ok=True)
        self.host, self.port = host, port
        self.tokens = dict(tokens or {"hf_test_write": TokenInfo("testuser", True, ("testorg",))})
        if tokens is None:
            self.tokens["hf_test_read"] = TokenInfo("testuser", False, ("testorg",))
        self.regular_max, self.lfs_redirect, self.retry_after = regular_max, lfs_redirect, retry_after
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[Fault] = []
        self._log: list[LoggedRequest] = []
        self._tickets: dict[str, tuple[str, int]] = {}
        self._secret = secrets.token_bytes(16)
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        """Bind the API listener (``self.port``, 0 = free port) and the storage listener (free port); serve in threads."""
        for storage, port in ((False, self.port), (True, 0)):
            listener = _Listener((self.host, port), self, storage)
            thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._listeners.append(listener)
            self._threads.append(thread)
        self.port = self._listeners[0].server_address[1]
        return self

    def stop(self) -> None:
        """Stop both listeners, release held requests, close open connections, delete the root if it was ours."""
        self.release()
        for listener in self._listeners:
            listener.shutdown()
            listener.server_close()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listeners.clear()
        self._threads.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self if self._listeners else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. ``http://127.0.0.1:43123`` (use exactly this host)."""
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """The separate LFS storage origin (PUT targets and download redirects), like S3/CDN on the real Hub."""
        return f"http://{self.host}:{self._listeners[1].server_address[1]}"

    @property
    def token(self) -> str:
        """A valid write token (the first write token configured)."""
        return next(tok for tok, info in self.tokens.items() if info.write)

    @property
    def user(self) -> str:
        """The user name behind ``self.token``."""
        return self.tokens[self.token].user

    # -- test hooks ------------------------------------------------------------------------------------------------
    def inject(
        self,
        path_regex: str,
        kind: str | int,
        count: int = 1,
        *,
        method: str | None = None,
        delay: float | None = None,
    ) -> Fault:
        """Fail the next ``count`` requests whose raw path (no query) matches ``path_regex`` (``re.search``).

        ``kind``: an HTTP status (``"500"``, ``503``, ``"401"``, ...), ``"drop"`` (close without a response), or
        ``"timeout"`` (hold for ``delay`` s, or until ``release()``/``stop()`` when ``delay`` is None, then answer
        normally). ``method`` restricts the match (``"POST"``, ``"HEAD"``, ...).
        """
        kind = str(kind)
        if kind not in ("drop", "timeout") and not (kind.isdigit() and 400 <= int(kind) < 600):
            raise ValueError(f"unknown fault kind {kind!r}: use an HTTP status, 'drop' or 'timeout'")
        fault = Fault(re.compile(path_regex), kind, count, method.upper() if method else None, delay)
        with self.lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget all pending faults (requests already held by a ``timeout`` stay held until ``release()``)."""
        with self.lock:
            self._faults.clear()

    def release(self) -> None:
        """Let every request held by a ``timeout`` fault continue."""
        with self.lock:
            event, self._release = self._release, threading.Event()
        event.set()

    @property
    def log(self) -> list[LoggedRequest]:
        """A copy of the request log, oldest first."""
        with self.lock:
            return list(self._log)

    def requests(self, method: str | None = None, path_regex: str | None = None) -> list[LoggedRequest]:
        """Logged requests filtered by method and ``re.search`` on the raw path."""
        return [
            r
            for r in self.log
            if (method is None or r.method == method.upper()) and (path_regex is None or re.search(path_regex, r.path))
        ]

    def clear_log(self) -> None:
        with self.lock:
            self._log.clear()

    def reset(self) -> None:
        """Drop all repos, faults and log entries (blobs stay on disk); for a session-scoped server."""
        with self.lock:
            self.repos.clear()
            self._faults.clear()
            self._log.clear()
            self._tickets.clear()
        self.release()

    def add_token(self, token: str, user: str, *, write: bool = True, orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = TokenInfo(user, write, orgs)

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: bytes}`` of every file at ``revision`` (branch, tag or commit) of a repo, read from storage."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            tree = dict(repo.commits[self._resolve(repo, revision)].tree)
        return {path: self._blob(f.sha256).read_bytes() for path, f in sorted(tree.items())}

    def commit_titles(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit titles from ``revision`` back to the initial commit, newest first."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            oid: str | None = self._resolve(repo, revision)
            titles = []
            while oid is not None:
                titles.append(repo.commits[oid].title)
                oid = repo.commits[oid].parent
        return titles

    # -- internals used by the handler -----------------------------------------------------------------------------
    def _record(self, entry: LoggedRequest) -> None:
        with self.lock:
            self._log.append(entry)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.method in (None, method) and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _blob(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob(sha)
        if not path.exists():
            tmp = path.with_name(f".{sha}.{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def _resolve(self, repo: _Repo, rev: str) -> str:
        for name in (rev, rev.removeprefix("refs/heads/")):
            if name in repo.branches:
                return repo.branches[name]
        tag = rev.removeprefix("refs/tags/")
        if tag in repo.tags:
            return repo.tags[tag]
        if _COMMIT.fullmatch(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, _now())
        self.repos[(repo_type, repo_id)] = repo
        sha = self._store_blob(GITATTRIBUTES)
        attributes = _File(sha, len(GITATTRIBUTES), _git_oid(GITATTRIBUTES), False)
        self._add_commit(repo, "main", {".gitattributes": attributes}, "initial commit", "", author)
        return repo

    def _add_commit(
        self, repo: _Repo, branch: str, tree: dict[str, _File], title: str, message: str, author: str
    ) -> _Commit:
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{secrets.token_hex(8)}".encode())
        commit = _Commit(oid.hexdigest(), parent, title, message, author, _now(), tree)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        snapshot = self._repo_dir(repo) / "snapshots" / commit.oid
        for path, f in tree.items():
            target = snapshot / path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._blob(f.sha256), target)
            except OSError:
                shutil.copyfile(self._blob(f.sha256), target)
        snapshot.mkdir(parents=True, exist_ok=True)
        return commit

    def _repo_dir(self, repo: _Repo) -> Path:
        return self.root / "repos" / f"{repo.repo_type}s" / repo.repo_id

    def _file_for_blob(self, sha256: str, size: int, lfs: bool) -> _File:
        if lfs:
            pointer = _lfs_pointer(sha256, size)
            return _File(sha256, size, _git_oid(pointer), True, len(pointer))
        return _File(sha256, size, _git_oid(self._blob(sha256).read_bytes()), False)

    def _sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()


class _Listener(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer, storage: bool) -> None:
        self.hub, self.storage = hub, storage
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Listener

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub.lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub.lock:
            self.server.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.raw_path, self.raw_query = split.path, split.query
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.fault: str | None = None
        try:
            self.body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        fault = hub._take_fault(self.command, self.raw_path)
        if fault is not None:
            self.fault = fault.kind
            if fault.kind == "drop":
                self._log(0)
                self.close_connection = True
                return
            if fault.kind == "timeout":
                self._log(0)
                with hub.lock:
                    event = hub._release
                event.wait(fault.delay)
                self.fault = None  # the late answer below is logged as a normal request
            else:
                status = int(fault.kind)
                headers = (
                    {"Retry-After": str(hub.retry_after)}
                    if status in RETRYABLE and hub.retry_after is not None
                    else {}
                )
                message = INVALID_CREDENTIALS if status == 401 else f"Injected fault: HTTP {status}"
                self._send_error(HubError(status, message, headers=headers))
                return
        try:
            self._route()
        except HubError as err:
            self._send_error(err)
        except Exception as err:  # a bug in the fake: answer 500 and say what broke
            self._send_error(HubError(500, f"fake hub internal error: {type(err).__name__}: {err}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(self) -> None:
        for methods, pattern, name in STORAGE_ROUTES if self.server.storage else ROUTES:
            match = pattern.fullmatch(self.raw_path)
            if match is None:
                continue
            if self.command not in methods:
                continue
            groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
            getattr(self, f"_h_{name}")(**groups)
            return
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def _log(self, status: int) -> None:
        self.server.hub._record(
            LoggedRequest(
                self.command,
                self.raw_path,
                status,
                self.raw_query,
                self.fault,
                "authorization" in self.headers,
                "storage" if self.server.storage else "hub",
            )
        )

    def _start(self, status: int, headers: dict[str, str], length: int) -> None:
        self._log(status)
        self.send_response(status)
        headers = {"X-Request-Id": secrets.token_hex(8), "Content-Length": str(length), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self._start(status, headers or {}, len(body))
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": content_type})

    def _send_error(self, err: HubError) -> None:
        headers = {
            "Content-Type": "application/json",
            "X-Error-Message": err.message.encode("ascii", "replace").decode(),
        }
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send_blob(self, sha256: str, size: int, headers: dict[str, str]) -> None:
        start, end, status = 0, size - 1, 200
        spec = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if spec and (spec[1] or spec[2]):
            start = int(spec[1]) if spec[1] else max(size - int(spec[2]), 0)
            end = min(int(spec[2]), size - 1) if spec[1] and spec[2] else size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        self._start(status, headers, end - start + 1)
        if self.command == "HEAD":
            return
        with open(self.server.hub._blob(sha256), "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @property
    def _base(self) -> str:
        # URLs handed back must use exactly the host the client used, or RepoUrl raises HfUriError
        return f"http://{self.headers.get('Host') or self.server.hub.url.removeprefix('http://')}"

    # -- auth --------------------------------------------------------------------------------------------------------
    def _token(self) -> TokenInfo | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").removeprefix("bearer ").strip()
        info = self.server.hub.tokens.get(token)
        if info is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return info

    def _require_user(self) -> TokenInfo:
        user = self._token()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    def _repo(self, rtype: str | None, ns: str, name: str, *, write: bool = False, pfx: str | None = None) -> _Repo:
        repo_type = REPO_TYPES[rtype] if rtype else REPO_TYPES.get(f"{pfx}", "model")
        repo_id = f"{ns}/{name}"
        user = self._token()
        repo = self.server.hub.repos.get((repo_type, repo_id))
        member = user is not None and ns in (user.user, *user.orgs)
        if repo is None or (repo.private and not member):
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repository.", "RepoNotFound")
            if not (member and user.write):
                raise HubError(403, f"You don't have the rights to write to {repo_type} {repo_id}")
        return repo

    # -- API routes --------------------------------------------------------------------------------------------------
    def _h_whoami(self) -> None:
        user = self._require_user()
        role = "write" if user.write else "read"
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.user.encode()).hexdigest()[:24],
                "name": user.user,
                "fullname": user.user,
                "email": f"{user.user}@example.invalid",
                "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org in user.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": role}},
            }
        )

    def _h_validate_yaml(self) -> None:
        self._json({"errors": [], "warnings": []})

    def _h_create_repo(self) -> None:
        user = self._require_user()
        body = self._json_body()
        name, ns = str(body.get("name") or ""), body.get("organization") or user.user
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type})")
        if not user.write or ns not in (user.user, *user.orgs):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {ns!r}")
        repo_id = f"{ns}/{name}"
        url = f"{self._base}/{URL_PREFIX[repo_type]}{repo_id}"
        hub = self.server.hub
        with hub.lock:
            if (repo_type, repo_id) in hub.repos:
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            private = body.get("visibility", "private" if body.get("private") else "public") != "public"
            hub._new_repo(repo_type, repo_id, private, user.user)
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _h_delete_repo(self) -> None:
        user = self._require_user()
        body = self._json_body()
        ns = body.get("organization") or user.user
        repo = self._repo(None, ns, str(body.get("name")), write=True, pfx=f"{body.get('type') or 'model'}s")
        hub = self.server.hub
        with hub.lock:
            hub.repos.pop((repo.repo_type, repo.repo_id), None)
        shutil.rmtree(hub._repo_dir(repo), ignore_errors=True)
        self._json({})

    def _h_repo_info(self, rtype: str, ns: str, name: str, rev: str | None) -> None:
        repo = self._repo(rtype, ns, name)
        hub = self.server.hub
        with hub.lock:
            commit = repo.commits[hub._resolve(repo, rev or "main")]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, f in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        self._json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": ns,
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "siblings": siblings,
                "usedStorage": sum(f.size for f in commit.tree.values()),
            }
        )

    def _h_tree(self, rtype: str, ns: str, name: str, rev: str, path: str | None) -> None:
        repo = self._repo(rtype, ns, name)
        hub = self.server.hub
        with hub.lock:
            commit = repo.commits[hub._resolve(repo, rev)]
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        dirs = {str(parent) for p in commit.tree for parent in PurePosixPath(p).parents if str(parent) != "."}
        if prefix and prefix not in dirs:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        start = f"{prefix}/" if prefix else ""

        def wanted(p: str) -> bool:
            return p.startswith(start) and (recursive or "/" not in p[len(start) :])

        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
            if wanted(d)
        ]
        for p, f in sorted(commit.tree.items()):
            if wanted(p):
                entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": p}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries.append(entry)
        self._json(entries)

    def _h_refs(self, rtype: str, ns: str, name: str) -> None:
        repo = self._repo(rtype, ns, name)
        with self.server.hub.lock:
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                for b, c in repo.branches.items()
                if not b.startswith("refs/pr/")
            ]
            prs = [
                {"name": b, "ref": b, "targetCommit": c} for b, c in repo.branches.items() if b.startswith("refs/pr/")
            ]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()]
        out: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if self.query.get("include_prs"):
            out["pullRequests"] = prs
        self._json(out)

    def _h_commits(self, rtype: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(rtype, ns, name)
        out = []
        with self.server.hub.lock:
            oid: str | None = self.server.hub._resolve(repo, rev)
            while oid is not None:
                c = repo.commits[oid]
                out.append(
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": c.author}],
                    }
                )
                oid = c.parent
        self._json(out)

    def _h_branch(self, rtype: str, ns: str, name: str, ref: str) -> None:
        repo = self._repo(rtype, ns, name, write=True)
        hub = self.server.hub
        with hub.lock:
            if self.command == "DELETE":
                if repo.branches.pop(ref, None) is None:
                    raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
            else:
                if ref in repo.branches:
                    raise HubError(409, "Reference already exists")
                repo.branches[ref] = hub._resolve(repo, self._json_body().get("startingPoint") or "main")
        self._json({})

    def _h_tag(self, rtype: str, ns: str, name: str, ref: str) -> None:
        repo = self._repo(rtype, ns, name, write=True)
        hub = self.server.hub
        with hub.lock:
            if self.command == "DELETE":
                if repo.tags.pop(ref, None) is None:
                    raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
            else:
                tag = str(self._json_body().get("tag") or "")
                if not tag:
                    raise HubError(400, "Missing tag name")
                if tag in repo.tags:
                    raise HubError(409, "Tag already exists")
                repo.tags[tag] = hub._resolve(repo, ref)
        self._json({})

    def _h_preupload(self, rtype: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(rtype, ns, name, write=True)
        hub = self.server.hub
        with hub.lock:
            tree = repo.commits[hub._resolve(repo, rev)].tree
        files = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            lfs = (
                size >= hub.regular_max
                or b"\0" in sample
                or any(fnmatch.fnmatch(PurePosixPath(path).name, pattern) for pattern in LFS_PATTERNS)
            )
            out: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in tree:
                out["oid"] = tree[path].sha256 if lfs else tree[path].git_oid
            files.append(out)
        self._json({"files": files, "commitOid": repo.branches.get(rev)})

    def _h_commit(self, rtype: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(rtype, ns, name, write=True)
        user = self._require_user()
        hub = self.server.hub
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        with hub.lock:
            head = hub._resolve(repo, rev)
            if rev not in repo.branches:
                raise HubError(404, f"Cannot commit to {rev}: not a branch", "RevisionNotFound")
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = (
                        base64.b64decode(value["content"])
                        if value.get("encoding") == "base64"
                        else value["content"].encode()
                    )
                    tree[path] = hub._file_for_blob(hub._store_blob(data), len(data), lfs=False)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if not _SHA256.fullmatch(oid) or not hub._blob(oid).exists():
                        raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                    size = hub._blob(oid).stat().st_size
                    if value.get("size") is not None and int(value["size"]) != size:
                        raise HubError(400, f"LFS object {oid} for {path} has size {size}, not {value['size']}")
                    tree[path] = hub._file_for_blob(oid, size, lfs=True)
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(folder)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                elif key != "header":
                    raise HubError(400, f"Unknown commit operation {key!r}")
            branch, pr_url = rev, None
            prefix = f"{self._base}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
            if self.query.get("create_pr") == "1":
                repo.pr_count += 1
                branch = f"refs/pr/{repo.pr_count}"
                repo.branches[branch] = head
                pr_url = f"{prefix}/discussions/{repo.pr_count}"
            title = str(header.get("summary") or "Upload files")
            commit = hub._add_commit(repo, branch, tree, title, str(header.get("description") or ""), user.user)
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{prefix}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    def _h_lfs_batch(self, pfx: str | None, ns: str, name: str) -> None:
        repo = self._repo(None, ns, name, write=True, pfx=pfx)
        hub = self.server.hub
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported by the fake hub")
        verify = f"{self._base}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            if not _SHA256.fullmatch(oid) or size < 0:
                objects.append(
                    {"oid": oid, "size": max(size, 0), "error": {"code": 422, "message": "Invalid oid/size"}}
                )
            elif hub._blob(oid).exists() and hub._blob(oid).stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips the PUT
            else:
                ticket = secrets.token_hex(16)
                with hub.lock:
                    hub._tickets[ticket] = (oid, size)
                actions = {"upload": {"href": f"{hub.storage_url}/upload/{ticket}"}, "verify": {"href": verify}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _h_lfs_verify(self, pfx: str | None, ns: str, name: str) -> None:
        self._repo(None, ns, name, write=True, pfx=pfx)
        body = self._json_body()
        blob = self.server.hub._blob(str(body.get("oid")))
        if not _SHA256.fullmatch(str(body.get("oid"))) or not blob.exists() or blob.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} not found or wrong size")
        self._json({"success": True})

    def _h_resolve(self, pfx: str | None, ns: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(None, ns, name, pfx=pfx)
        hub = self.server.hub
        with hub.lock:
            commit = repo.commits[hub._resolve(repo, rev)]
        f = commit.tree.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.git_oid}"'}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            if hub.lfs_redirect:
                expires = int(time.time()) + 3600
                location = f"{hub.storage_url}/blob/{f.sha256}?expires={expires}&sig={hub._sign(f.sha256, expires)}"
                self._send(302, b"", {**headers, "Location": location})
                return
        self._send_blob(f.sha256, f.size, headers)

    # -- storage origin (no Authorization header is sent here by the client) -----------------------------------------
    def _h_storage_put(self, ticket: str) -> None:
        hub = self.server.hub
        with hub.lock:
            expected = hub._tickets.get(ticket)
        if expected is None:
            raise HubError(403, "Unknown or expired upload ticket")
        oid, size = expected
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        hub._store_blob(self.body)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _h_storage_get(self, oid: str) -> None:
        hub = self.server.hub
        expires = self.query.get("expires", "")
        valid = expires.isdigit() and int(expires) >= time.time()
        if not (valid and hmac.compare_digest(self.query.get("sig", ""), hub._sign(oid, int(expires)))):
            raise HubError(403, "Request has expired or signature does not match")
        blob = hub._blob(oid)
        if not blob.exists():
            raise HubError(404, "NoSuchKey")
        self._send_blob(oid, blob.stat().st_size, {"ETag": f'"{oid}"'})


def start_hub_server(root: str | os.PathLike[str] | None = None, **kwargs: Any) -> HubServer:
    """Start a ``HubServer`` (free port on 127.0.0.1 unless ``port``/``host`` given) and return it, already running.

    Use as ``with start_hub_server() as hub: ...`` (stops on exit) or call ``hub.stop()`` yourself.
    Keyword arguments go to ``HubServer`` (``tokens``, ``regular_max``, ``lfs_redirect``, ``retry_after``, ...).
    """
    return HubServer(root, **kwargs).start()


@contextlib.contextmanager
def client_environment(server: HubServer, hf_home: str | os.PathLike[str], *, token: bool = True) -> Iterator[None]:
    """Point the real ``huggingface_hub`` (and transformers, if imported) at ``server``; undo everything on exit.

    Sets the environment (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN`` if
    ``token``, telemetry/progress bars off, ``NO_PROXY``; unsets ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
    ``HF_OIDC_RESOURCE``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, ``HF_TOKEN_PATH``), then
    imports ``huggingface_hub`` and patches what it computed at import time (``constants.ENDPOINT``,
    ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``, cache/token paths, the module-level
    ``hf_api.api.endpoint``), clears ``transformers.utils.hub._hf_api`` and closes the shared HTTP session so no
    pooled connection to an earlier server is reused.
    """
    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env: dict[str, str | None] = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": server.token if token else None,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        **dict.fromkeys(
            (
                "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE",
                "HF_OIDC_RESOURCE",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN",
                "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH",
                "HUGGINGFACE_CO_STAGING",
            )
        ),
    }
    undo: list[Callable[[], None]] = []

    def set_env(key: str, value: str | None) -> None:
        old = os.environ.get(key)
        undo.append(lambda: os.environ.__setitem__(key, old) if old is not None else os.environ.pop(key, None))
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    def set_attr(obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        undo.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    try:
        for key, value in env.items():
            set_env(key, value)
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _http

        patches = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        }
        for name, value in patches.items():
            if hasattr(constants, name):
                set_attr(constants, name, value)
        set_attr(hf_api.api, "endpoint", server.url)
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            set_attr(transformers_hub, "_hf_api", None)
        _http.close_session()
        yield
    finally:
        with contextlib.suppress(Exception):
            from huggingface_hub.utils import _http

            _http.close_session()
        for restore in reversed(undo):
            restore()
