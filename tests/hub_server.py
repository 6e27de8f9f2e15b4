"""A tiny, real HTTP server on loopback that speaks the few Hub endpoints huggingface_hub 2.4 uses to push and pull.

Not a mock of the client: the unmodified ``huggingface_hub`` talks HTTP to it (point ``HF_ENDPOINT``
at :attr:`HubServer.endpoint`, set ``HF_HUB_DISABLE_XET=1`` so uploads use the LFS protocol).
Implemented, as read from ``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``file_download.py`` and
``_snapshot_download.py``:

- ``POST /api/repos/create`` (409 when it exists), ``POST /api/validate-yaml``;
- ``POST /api/models/{repo}/preupload/{rev}`` (``.safetensors`` and large files go to LFS);
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /_lfs/{oid}`` (sha256 checked), ``POST /_lfs/verify``;
- ``POST /api/models/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile);
- ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}[/path]``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and ``Content-Length``.

Blobs are stored in a temporary directory, commits in memory; ``requests`` records every request line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10_000
_REPO = r"(?P<repo>[^/]+/[^/]+?)"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: list[tuple[str, dict[str, dict]]] = []  # (sha, {path: {sha256, size, lfs, blob}})

    def files(self, revision: str) -> tuple[str, dict[str, dict]] | None:
        if not self.commits:
            return ("0" * 40, {}) if revision == "main" else None
        if revision == "main":
            return self.commits[-1]
        for sha, files in self.commits:
            if sha == revision:
                return sha, files
        return None


class HubServer:
    """Start with :meth:`start` (binds 127.0.0.1 on a free port, serves from a daemon thread), stop with :meth:`stop`."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="fake_hub_")
        self.repos: dict[str, _Repo] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256)

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        with open(self.blob_path(sha), "wb") as f:
            f.write(data)
        return sha

    def read(self, sha256: str) -> bytes:
        with open(self.blob_path(sha256), "rb") as f:
            return f.read()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    # --- helpers ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        """The request body, read once (always, before routing, so keep-alive connections stay in sync)."""
        if not hasattr(self, "_data"):
            self._data = self._read_body()
        return self._data

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False, extra: dict | None = None) -> None:
        headers = {
            "X-Error-Code": code,
            "X-Error-Message": message,
            "Content-Type": "application/json",
            **(extra or {}),
        }
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _repo(self, repo_id: str) -> _Repo | None:
        return self.hub.repos.get(repo_id)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append(f"{method} {path}")
        if hasattr(self, "_data"):
            del self._data
        self._body()
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda: self._json(200, {})),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/_lfs/verify", self._lfs_verify),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", self._info),
            ("GET", rf"/api/models/{_REPO}", self._info),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                with self.hub.lock if method in ("POST", "PUT") else contextlib.nullcontext():
                    handler(**match.groupdict())
                return
        self._error(404, "NotFound", f"no route for {method} {path}", head=method == "HEAD")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # --- endpoints -------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        if repo_id in self.hub.repos:
            return self._error(409, "RepoExists", "You already created this model repo")
        self.hub.repos[repo_id] = _Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _preupload(self, repo: str, rev: str) -> None:
        body = json.loads(self._body())
        if self._repo(repo) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD or f["path"].endswith(".safetensors") else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in body["files"]
        ]
        self._json(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, repo: str) -> None:
        body = json.loads(self._body())
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not os.path.exists(self.hub.blob_path(obj["oid"])):
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/_lfs/verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 of the uploaded content does not match the oid")
        self.hub.store(data)
        self._send(200)

    def _lfs_verify(self) -> None:
        body = json.loads(self._body())
        path = self.hub.blob_path(body["oid"])
        if not os.path.exists(path) or os.path.getsize(path) != body["size"]:
            return self._error(404, "NotFound", "object not uploaded")
        self._json(200, {})

    def _commit(self, repo: str, rev: str) -> None:
        record = self._repo(repo)
        if record is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        base = record.files(unquote(rev))
        if base is None:
            return self._error(404, "RevisionNotFound", "Revision not found")
        files = dict(base[1])
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                sha = self.hub.store(data)
                files[value["path"]] = {"sha256": sha, "size": len(data), "lfs": False, "blob": _git_blob_sha1(data)}
            elif key == "lfsFile":
                if not os.path.exists(self.hub.blob_path(value["oid"])):
                    return self._error(422, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                data = self.hub.read(value["oid"])
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {len(data)}\n"
                files[value["path"]] = {
                    "sha256": value["oid"],
                    "size": len(data),
                    "lfs": True,
                    "blob": _git_blob_sha1(pointer.encode()),
                }
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                return self._error(400, "BadRequest", f"unsupported commit operation {key}")
        sha = hashlib.sha1(
            json.dumps(sorted((p, f["sha256"]) for p, f in files.items())).encode() + os.urandom(8)
        ).hexdigest()
        record.commits.append((sha, files))
        self._json(
            200, {"commitUrl": f"{self.hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def _info(self, repo: str, rev: str = "main") -> None:
        record = self._repo(repo)
        if record is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        state = record.files(unquote(rev))
        if state is None:
            return self._error(404, "RevisionNotFound", "Revision not found")
        sha, files = state
        self._json(
            200,
            {"id": repo, "sha": sha, "private": record.private, "siblings": [{"rfilename": p} for p in sorted(files)]},
        )

    def _tree(self, repo: str, rev: str, sub: str | None = None) -> None:
        record = self._repo(repo)
        state = record.files(unquote(rev)) if record else None
        if state is None:
            return self._error(404, "RepoNotFound" if record is None else "RevisionNotFound", "not found")
        entries = []
        for path, info in sorted(state[1].items()):
            if sub and not path.startswith(sub.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": path, "size": info["size"], "oid": info["blob"]}
            if info["lfs"]:
                entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _resolve(self, repo: str, rev: str, file: str) -> None:
        head = self.command == "HEAD"
        record = self._repo(repo)
        state = record.files(unquote(rev)) if record else None
        if state is None:
            return self._error(404, "RepoNotFound" if record is None else "RevisionNotFound", "not found", head=head)
        sha, files = state
        info = files.get(file)
        if info is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist", head=head, extra={"X-Repo-Commit": sha})
        etag = info["sha256"] if info["lfs"] else info["blob"]
        data = self.hub.read(info["sha256"])
        self._send(
            200,
            data,
            {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"},
            head=head,
        )
