"""A Hugging Face Hub-compatible HTTP server on the standard library, for tests and offline use.

It speaks the subset of the Hub protocol that huggingface_hub, datasets and transformers use to
create repos, upload (regular and LFS), branch, tag, list and download; ``PROTOCOL.md`` next to
this file lists the routes and which client call uses which. Xet is not implemented: clients run with
``HF_HUB_DISABLE_XET=1``. A request no route matches is answered 404 and recorded in
``HubServer.unknown_routes`` so that tests notice when a client upgrade needs something new.

    with HubServer("/tmp/hub") as server:
        os.environ["HF_ENDPOINT"] = server.endpoint  # before importing huggingface_hub
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

from etokit.hub.storage import (
    REPO_TYPES,
    USER,
    HubError,
    Storage,
    check_path,
    check_repo_id,
    check_sha256,
    lfs_pointer_size,
)

logger = logging.getLogger("etokit.hub")

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's rule: files from 10 MB go through LFS
BINARY_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".parquet",
    ".arrow",
    ".tar",
    ".gz",
    ".zip",
    ".zst",
    ".7z",
    ".png",
    ".jpg",
    ".jpeg",
    ".wav",
    ".mp3",
    ".mp4",
    ".model",
)
_PLURAL = {f"{t}s": t for t in REPO_TYPES}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_TRUE = ("1", "true", "True")


class HubServer:
    """The embedded Hub. ``token``: if set, every request must send ``Authorization: Bearer <token>``
    (LFS uploads instead carry a signature issued by the authenticated batch call)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        max_body_bytes: int = 8 << 30,
        max_json_bytes: int = 256 << 20,
    ):
        self.storage = Storage(data_dir)
        self.host, self.port, self.token = host, port, token
        self.max_body_bytes, self.max_json_bytes = max_body_bytes, max_json_bytes
        self.unknown_routes: list[str] = []
        self._unknown_lock = threading.Lock()
        self._secret = secrets.token_bytes(32)  # signs LFS upload hrefs; new per process
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "HubServer":
        self._httpd = _HTTPServer((self.host, self.port), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="etokit-hub", daemon=True
        )
        self._thread.start()
        logger.info("etokit hub serving %s at %s", self.storage.root, self.endpoint)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record_unknown(self, route: str) -> None:
        with self._unknown_lock:
            self.unknown_routes.append(route)
        logger.warning("etokit hub: no route for %s (answered 404)", route)

    def sign(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # parallel uploads (threads, datasets' workers) must not hit a full backlog
    hub: HubServer
    linger_s = 2.0

    def shutdown_request(self, request):
        # Lingering close (RFC 9112 section 9.6): a connection answered early (413 to a body still
        # being sent) and then closed with unread input is reset by the kernel, and the client gets
        # a broken pipe or a reset instead of the answer. Send FIN, read what is still coming for a
        # moment, then close.
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_s
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(1 << 16):
                    break
        except OSError:
            pass
        self.close_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections across the many small calls
    server_version = "etokit-hub"
    timeout = 300  # a stalled client frees its thread eventually

    # -- plumbing ------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.base = f"http://{self.headers.get('Host') or self.hub.endpoint[7:]}"
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length") or "0"
        self._left = int(length) if length.isdigit() else 1  # nonzero: the connection is closed after
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            if not length.isdigit():
                self.close_connection = True
                raise HubError(400, f"Invalid Content-Length {length!r}")
            if self.hub.token is not None and not (method == "PUT" and segs[:2] == ["api", "lfs-upload"]):
                self._check_token()
            handler = self._route(method, segs)
            if handler is None:
                self.hub._record_unknown(f"{method} {url.path}")
                raise HubError(404, f"No route for {method} {url.path}")
            handler()
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a server bug: answer 500 rather than drop the connection
            logger.exception("etokit hub: error handling %s %s", method, self.path)
            self._error(HubError(500, f"Internal error: {type(e).__name__}: {e}"))

    def _check_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            raise HubError(401, "Authorization required: send 'Authorization: Bearer <token>'")
        given = auth[7:] if auth.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.hub.token.encode()):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _error(self, e: HubError) -> None:
        headers = dict(e.headers)
        message = " ".join(e.message.split()).encode("latin-1", "replace").decode("latin-1")
        headers["X-Error-Message"] = message
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.status == 413:
            self.close_connection = True
        self._send_json({"error": e.message}, e.status, headers)

    def _discard_body(self) -> None:
        """Before answering: drop a small unread body (an error answered early) so the client may
        reuse the connection; after a big or malformed one, tell it the connection closes."""
        if not self._chunked and 0 < self._left <= 1 << 20 and not self.close_connection:
            self._left -= len(self.rfile.read(self._left))
        if self._left or self._chunked:
            self.close_connection = True

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        self._discard_body()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: dict | None = None, content_type="application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _body_chunks(self, limit: int) -> Iterator[bytes]:
        """The request body, Content-Length or chunked, refused with 413 past ``limit`` bytes."""
        if not self._chunked:
            if self._left > limit:
                raise HubError(413, f"Request body of {self._left} bytes exceeds the limit of {limit} bytes")
            while self._left:
                chunk = self.rfile.read(min(self._left, 1 << 20))
                if not chunk:
                    raise HubError(400, "Request body ended early")
                self._left -= len(chunk)
                yield chunk
            return
        total = 0
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise HubError(400, f"Invalid chunk size {line[:20]!r}") from None
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._chunked = False
                return
            total += size
            if total > limit:
                raise HubError(413, f"Request body exceeds the limit of {limit} bytes")
            chunk = self.rfile.read(size)
            self.rfile.readline()
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._body_chunks(self.hub.max_json_bytes))

    def _json(self) -> dict:
        raw = self._body()
        try:
            obj = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise HubError(400, "Request body must be a JSON object")
        return obj

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0] in _TRUE

    # -- routing -------------------------------------------------------------------------------
    def _route(self, method: str, s: list[str]):
        """Return a bound handler (closure) for the request, or None for an unknown route."""
        method = "GET" if method == "HEAD" else method  # HEAD = GET without the body (see _send)
        if s[:1] == ["api"]:
            if s == ["api", "whoami-v2"] and method == "GET":
                return self.whoami
            if s == ["api", "repos", "create"] and method == "POST":
                return self.create_repo
            if s == ["api", "repos", "delete"] and method == "DELETE":
                return self.delete_repo
            if s == ["api", "validate-yaml"] and method == "POST":
                return self.validate_yaml
            if s == ["api", "agent-harnesses"] and method == "GET":
                # huggingface_hub >= 2.x fetches this registry to tag its user agent; none here
                return lambda: self._send_json({"standardEnvVars": [], "harnesses": {}})
            if len(s) == 3 and s[1] == "lfs-upload" and method == "PUT":
                return lambda: self.lfs_upload(s[2])
            if len(s) >= 4 and s[1] in _PLURAL:
                return self._route_repo_api(method, _PLURAL[s[1]], f"{s[2]}/{s[3]}", s[4:])
            return None
        repo_type = "model"
        if s[:1] in (["datasets"], ["spaces"]) and len(s) >= 4 and (s[3] == "resolve" or s[2].endswith(".git")):
            repo_type, s = _PLURAL[s[0]], s[1:]
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return lambda: self.lfs_batch(repo_type, f"{s[0]}/{s[1][:-4]}")
        if len(s) >= 5 and s[2] == "resolve" and method == "GET":
            rev, rest = _take_rev(s, 3)
            return lambda: self.resolve_file(repo_type, f"{s[0]}/{s[1]}", rev, "/".join(rest))
        return None

    def _route_repo_api(self, method: str, t: str, repo: str, rest: list[str]):
        op = rest[0] if rest else ""
        if not rest and method == "GET":
            return lambda: self.repo_info(t, repo, None)
        if op == "revision" and len(rest) >= 2 and method == "GET":
            return lambda: self.repo_info(t, repo, "/".join(rest[1:]))
        if op == "refs" and len(rest) == 1 and method == "GET":
            return lambda: self.list_refs(t, repo)
        if op == "tree" and len(rest) >= 2 and method == "GET":
            rev, path = _take_rev(rest, 1)
            return lambda: self.list_tree(t, repo, rev, "/".join(path).strip("/"))
        if op == "commits" and len(rest) >= 2 and method == "GET":
            return lambda: self.list_commits(t, repo, "/".join(rest[1:]))
        if op == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            return lambda: self.branch(method, t, repo, "/".join(rest[1:]))
        if op == "tag" and len(rest) >= 2 and method in ("POST", "DELETE"):
            return lambda: self.tag(method, t, repo, "/".join(rest[1:]))
        if method == "POST" and len(rest) >= 2 and op in ("preupload", "commit", "paths-info"):
            handler = {"preupload": self.preupload, "commit": self.commit, "paths-info": self.paths_info}[op]
            return lambda: handler(t, repo, "/".join(rest[1:]))
        return None

    # -- account and repos ---------------------------------------------------------------------
    def whoami(self):
        self._send_json(
            {
                "type": "user",
                "id": "etokit-user-id",
                "name": USER,
                "fullname": "etokit local user",
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "etokit", "role": "write"}},
            }
        )

    def _repo_from_body(self, body: dict) -> tuple[str, str]:
        t = body.get("type") or "model"
        if t not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {t!r}")
        name, org = body.get("name") or "", body.get("organization")
        repo_id = check_repo_id(name if "/" in name else f"{org or USER}/{name}")
        return t, repo_id

    def _repo_url(self, t: str, repo: str) -> str:
        return f"{self.base}/{_URL_PREFIX[t]}{repo}"

    def create_repo(self):
        body = self._json()
        t, repo = self._repo_from_body(body)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        try:
            self.hub.storage.create_repo(t, repo, private)
        except HubError as e:
            if e.status == 409:  # create_repo(exist_ok=True) still reads `url` from a 409
                self._send_json(
                    {"error": e.message, "url": self._repo_url(t, repo)}, 409, {"X-Error-Message": e.message}
                )
                return
            raise
        self._send_json({"url": self._repo_url(t, repo), "name": repo, "id": repo})

    def delete_repo(self):
        t, repo = self._repo_from_body(self._json())
        self.hub.storage.delete_repo(t, repo)
        self._send_json({})

    def validate_yaml(self):
        try:
            _front_matter(str(self._json().get("content", "")))
        except yaml.YAMLError as e:
            message = f"Invalid YAML metadata: {' '.join(str(e).split())}"
            self._send_json({"errors": [{"message": message}], "warnings": []}, 400, {"X-Error-Message": message})
            return
        self._send_json({"errors": [], "warnings": []})

    def _tree(self, t: str, repo: str, rev: str) -> tuple[str, dict]:
        check_path(rev, "revision")
        sha = self.hub.storage.resolve(t, repo, rev)
        return sha, self.hub.storage.commit(t, repo, sha)

    def repo_info(self, t: str, repo: str, rev: str | None):
        st = self.hub.storage
        meta = st.repo_meta(t, repo)
        sha, commit = self._tree(t, repo, rev or "main")
        info = {
            "id": repo,
            "_id": hashlib.sha1(f"{t}/{repo}".encode()).hexdigest()[:24],
            "author": repo.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [_sibling(p, e) for p, e in sorted(commit["tree"].items())],
            "cardData": self._card_data(commit["tree"]),
        }
        if t == "model":
            info["modelId"] = repo
        self._send_json(info)

    def _card_data(self, tree: dict) -> dict | None:
        entry = tree.get("README.md")
        if entry is None:
            return None
        with self.hub.storage.open_blob(entry["sha256"]) as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
        try:
            return _front_matter(text)
        except yaml.YAMLError:
            return None

    # -- refs ----------------------------------------------------------------------------------
    def list_refs(self, t: str, repo: str):
        refs = self.hub.storage.refs(t, repo)
        self._send_json(
            {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in refs["branches"].items()
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": v["target"]} for n, v in refs["tags"].items()
                ],
                "converts": [],
                "pullRequests": [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s} for n, s in refs["pulls"].items()
                ],
            }
        )

    def branch(self, method: str, t: str, repo: str, name: str):
        check_path(name, "branch name")
        if method == "POST":
            start = self._json().get("startingPoint")
            if start is not None:
                check_path(start, "startingPoint")
            self.hub.storage.create_branch(t, repo, name, start)
        else:
            self.hub.storage.delete_branch(t, repo, name)
        self._send_json({})

    def tag(self, method: str, t: str, repo: str, rev: str):
        check_path(rev, "revision")
        if method == "POST":
            body = self._json()
            if not isinstance(body.get("tag"), str):
                raise HubError(400, "Missing 'tag' in request body")
            self.hub.storage.create_tag(t, repo, body["tag"], rev, body.get("message"))
        else:
            self.hub.storage.delete_tag(t, repo, rev)
        self._send_json({})

    # -- listing -------------------------------------------------------------------------------
    def list_tree(self, t: str, repo: str, rev: str, path: str):
        if path:
            check_path(path)
        sha, commit = self._tree(t, repo, rev)
        tree, recursive, prefix = commit["tree"], self._flag("recursive"), f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        entries: dict[str, dict] = {}
        for p, e in sorted(tree.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            if recursive:  # every parent folder, then the file
                for i in range(1, len(parts)):
                    folder = prefix + "/".join(parts[:i])
                    entries.setdefault(folder, _folder(folder, tree))
                entries[p] = _file(p, e)
            elif len(parts) == 1:
                entries[p] = _file(p, e)
            else:
                entries.setdefault(prefix + parts[0], _folder(prefix + parts[0], tree))
        items = list(entries.values())
        if self._flag("expand"):
            self._add_last_commits(t, repo, sha, items)
        self._send_page(items)

    def paths_info(self, t: str, repo: str, rev: str):
        form = parse_qs(self._body().decode(), keep_blank_values=True)
        sha, commit = self._tree(t, repo, rev)
        tree, items = commit["tree"], []
        for path in filter(None, (p.strip("/") for p in form.get("paths", []))):
            check_path(path)
            if path in tree:
                items.append(_file(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                items.append(_folder(path, tree))
        if form.get("expand", [""])[0] in _TRUE:
            self._add_last_commits(t, repo, sha, items)
        self._send_json(items)

    def _add_last_commits(self, t: str, repo: str, head: str, items: list[dict]) -> None:
        """lastCommit of a path = the oldest commit of the unbroken run, from head back, in which
        the path's content is what it is at head."""

        def state(tree: dict, path: str):
            if path in tree:
                return tree[path]["oid"]
            return sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/")) or None

        pending = {it["path"]: state(self.hub.storage.commit(t, repo, head)["tree"], it["path"]) for it in items}
        found: dict[str, dict] = {}
        prev = None
        for sha, c in self.hub.storage.history(t, repo, head):
            for path in [p for p in pending if state(c["tree"], p) != pending[p]]:
                found[path] = prev
                del pending[path]
            if not pending:
                break
            prev = {"id": sha, "title": c["message"], "date": c["date"]}
        for path in pending:
            found[path] = prev
        for it in items:
            it["lastCommit"] = found[it["path"]]

    def list_commits(self, t: str, repo: str, rev: str):
        sha, _ = self._tree(t, repo, rev)
        formatted = "formatted" in self.query.get("expand[]", [])
        items = []
        for cid, c in self.hub.storage.history(t, repo, sha):
            item = {
                "id": cid,
                "title": c["message"],
                "message": c["description"],
                "date": c["date"],
                "authors": [{"user": c["author"]}],
            }
            if formatted:
                item["formatted"] = {"title": c["message"], "message": c["description"]}
            items.append(item)
        self._send_page(items)

    def _send_page(self, items: list) -> None:
        """Cursor pagination with a GitHub-style ``Link: <...>; rel="next"`` header, as the Hub."""
        try:
            limit = max(1, int(self.query.get("limit", ["1000"])[0]))
            start = int(self.query.get("cursor", ["0"])[0])
        except ValueError:
            raise HubError(400, "limit and cursor must be integers") from None
        headers = {}
        if start + limit < len(items):
            query = {k: v for k, v in self.query.items() if k != "cursor"} | {"cursor": [str(start + limit)]}
            next_url = f"{self.base}{urlsplit(self.path).path}?{urlencode(query, doseq=True)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(items[start : start + limit], headers=headers)

    # -- upload --------------------------------------------------------------------------------
    def preupload(self, t: str, repo: str, rev: str):
        body = self._json()
        _, commit = self._tree(t, repo, rev)
        files = []
        for f in body.get("files", []):
            path, size = check_path(f.get("path", "")), int(f.get("size", 0))
            try:
                sample = base64.b64decode(f.get("sample", ""))
            except ValueError:
                raise HubError(400, f"{path}: sample is not valid base64") from None
            lfs = size >= LFS_THRESHOLD or path.lower().endswith(BINARY_SUFFIXES) or b"\0" in sample
            item = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in commit["tree"]:
                item["oid"] = commit["tree"][path]["oid"]
            files.append(item)
        self._send_json({"files": files, "commitOid": None})

    def lfs_batch(self, t: str, repo: str):
        self.hub.storage.require(t, repo)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported (downloads use /resolve)")
        objects = []
        for obj in body.get("objects", []):
            oid, size = check_sha256(obj.get("oid")), obj.get("size")
            if not isinstance(size, int) or size < 0:
                raise HubError(400, f"LFS object {oid}: invalid size {size!r}")
            item = {"oid": oid, "size": size}
            if not self.hub.storage.has_blob(oid, size):
                query = urlencode({"size": size, "sig": self.hub.sign(oid, size)})
                item["authenticated"] = True
                item["actions"] = {"upload": {"href": f"{self.base}/api/lfs-upload/{oid}?{query}", "expires_in": 3600}}
            objects.append(item)
        self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str):
        check_sha256(oid)
        try:
            size = int(self.query.get("size", [""])[0])
        except ValueError:
            raise HubError(400, "Missing or invalid 'size' in the upload URL") from None
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self.hub.sign(oid, size)):
            raise HubError(403, "Invalid or missing upload signature: get the upload href from the LFS batch API")
        if not self.hub.storage.has_blob(oid, size):
            self.hub.storage.put_blob_stream(self._body_chunks(self.hub.max_body_bytes), oid, size)
        self._send(200, b"", content_type="text/plain")

    def commit(self, t: str, repo: str, rev: str):
        check_path(rev, "revision")
        header, ops = None, []
        for n, line in enumerate(self._body().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Commit payload line {n}: expected a JSON object with 'key' and 'value'") from None
            if key == "header":
                header = value
            elif not isinstance(value, dict):
                raise HubError(400, f"Commit payload line {n}: 'value' must be an object")
            else:
                ops.append((key, value))
        if not isinstance(header, dict) or not header.get("summary"):
            raise HubError(400, "Commit payload needs a 'header' line with a 'summary'")
        sha, pr = self.hub.storage.commit_ops(
            t,
            repo,
            rev,
            ops,
            header["summary"],
            header.get("description") or "",
            header.get("parentCommit"),
            create_pr=self._flag("create_pr"),
        )
        url = self._repo_url(t, repo)
        out = {"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}", "pullRequestUrl": None}
        if pr is not None:
            out["pullRequestUrl"] = f"{url}/discussions/{pr}"
        self._send_json(out)

    # -- download ------------------------------------------------------------------------------
    def resolve_file(self, t: str, repo: str, rev: str, path: str):
        check_path(path)
        sha, commit = self._tree(t, repo, rev)
        entry = commit["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": size})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            parsed = _parse_range(rng, size)
            if parsed is None:
                raise HubError(
                    416,
                    f"Range {rng!r} not satisfiable for {size} bytes",
                    headers={"Content-Range": f"bytes */{size}", **headers},
                )
            (start, end), status = parsed, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        self._discard_body()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, str(v))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with self.hub.storage.open_blob(entry["sha256"]) as f:
            f.seek(start)
            while length:
                chunk = f.read(min(length, 1 << 20))
                self.wfile.write(chunk)
                length -= len(chunk)


def _front_matter(text: str) -> dict | None:
    """The YAML block between a leading ``---`` line and the next one (a model/dataset card's
    metadata); raises ``yaml.YAMLError`` when it is not valid YAML."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return None
    data = yaml.safe_load("\n".join(lines[1:end]))
    return data if isinstance(data, dict) else None


def _take_rev(segs: list[str], i: int) -> tuple[str, list[str]]:
    """A revision is one URL segment when quoted (``refs%2Fpr%2F1``); an unquoted ``refs/pr/1``
    spans three."""
    if segs[i] == "refs" and len(segs) >= i + 3:
        return "/".join(segs[i : i + 3]), segs[i + 3 :]
    return segs[i], segs[i + 1 :]


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if 0 <= start <= end else None


def _file(path: str, e: dict) -> dict:
    item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e["lfs"]:
        item["lfs"] = {"oid": e["lfs"], "size": e["size"], "pointerSize": lfs_pointer_size(e["lfs"], e["size"])}
    return item


def _folder(path: str, tree: dict) -> dict:
    listing = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(), "size": 0, "path": path}


def _sibling(path: str, e: dict) -> dict:
    item = {"rfilename": path, "size": e["size"], "blobId": e["oid"]}
    if e["lfs"]:
        item["lfs"] = {"sha256": e["lfs"], "size": e["size"], "pointerSize": lfs_pointer_size(e["lfs"], e["size"])}
    return item
