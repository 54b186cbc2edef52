"""On-disk storage of the embedded Hub: repos, refs, commits and content-addressed blobs.

Layout under ``data_dir``::

    blobs/<sha256[:2]>/<sha256>                 file contents, stored once, shared by all repos
    repos/<type>s/<namespace>/<name>/repo.json  {"createdAt", "private"}
    repos/<type>s/<namespace>/<name>/refs.json  {"branches": {name: sha}, "tags": {name: {...}}, "pulls": {n: sha}}
    repos/<type>s/<namespace>/<name>/commits/<sha1>.json

A commit is ``{parent, message, description, author, date, tree}`` where ``tree`` maps each path
to ``{oid, size, lfs, sha256}``: ``oid`` is what clients compare against (git blob sha1 for a
regular file, the sha256 for an LFS file), ``lfs`` is the sha256 or None, and ``sha256`` always
names the blob. Its id is the sha1 of its canonical JSON. Every write is a temp file + fsync +
``os.replace``, so a crash leaves either the old or the new state and a restarted server on the
same directory sees everything that was acknowledged.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from etokit.durable_io import write_bytes_atomic

USER = "etokit-user"
REPO_TYPES = ("model", "dataset", "space")
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(Exception):
    """An error the server turns into an HTTP status, optionally with an ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer_size(sha256: str, size: int) -> int:
    return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name' of [A-Za-z0-9._-]")
    return repo_id


def check_path(path: str, what: str = "path") -> str:
    """Repo file paths and revisions are keys, never file names, but are refused the way the Hub
    refuses them so that nothing downstream (a client's cache, a local_dir) can be steered."""
    if (
        not path
        or "\0" in path
        or "\\" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise HubError(400, f"Invalid {what} {path!r}")
    return path


def check_sha256(oid: str) -> str:
    if not isinstance(oid, str) or not _SHA256.match(oid):
        raise HubError(400, f"Invalid sha256 oid {oid!r}")
    return oid


def _dump(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Storage:
    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- blobs -------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha, len(data)):
            write_bytes_atomic(self.blob_path(sha), data, point=None)
        return sha

    def put_blob_stream(self, chunks: Iterator[bytes], sha256: str, size: int) -> None:
        """Stream an LFS upload to disk, keeping it only if its sha256 and size are as announced."""
        path = self.blob_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, n = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    n += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if n != size or digest.hexdigest() != sha256:
                raise HubError(
                    400,
                    f"Uploaded object does not match: expected sha256 {sha256} size {size}, "
                    f"got sha256 {digest.hexdigest()} size {n}",
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def open_blob(self, sha256: str) -> BinaryIO:
        return open(self.blob_path(sha256), "rb")

    # -- repos -------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        check_repo_id(repo_id)
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def lock(self, repo_type: str, repo_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((repo_type, repo_id), threading.Lock())

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "refs.json").is_file()

    def require(self, repo_type: str, repo_id: str) -> Path:
        if not self.exists(repo_type, repo_id):
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return self.repo_dir(repo_type, repo_id)

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> None:
        with self.lock(repo_type, repo_id):
            if self.exists(repo_type, repo_id):
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            d = self.repo_dir(repo_type, repo_id)
            write_bytes_atomic(d / "repo.json", _dump({"createdAt": now_iso(), "private": bool(private)}), point=None)
            oid = self.put_blob(GITATTRIBUTES)
            tree = {
                ".gitattributes": {
                    "oid": git_blob_sha1(GITATTRIBUTES),
                    "size": len(GITATTRIBUTES),
                    "lfs": None,
                    "sha256": oid,
                }
            }
            sha = self._write_commit(d, None, "initial commit", "", tree)
            # refs.json last: its presence is what makes the repo exist.
            write_bytes_atomic(d / "refs.json", _dump({"branches": {"main": sha}, "tags": {}, "pulls": {}}), point=None)

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock(repo_type, repo_id):
            d = self.require(repo_type, repo_id)
            trash = d.with_name(f".deleted-{d.name}-{os.getpid()}-{threading.get_ident()}")
            os.replace(d, trash)  # atomic: the repo vanishes at once, then the files go
            shutil.rmtree(trash, ignore_errors=True)

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.require(repo_type, repo_id) / "repo.json").read_bytes())

    # -- refs and commits --------------------------------------------------------------------
    def refs(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.require(repo_type, repo_id) / "refs.json").read_bytes())

    def write_refs(self, repo_type: str, repo_id: str, refs: dict) -> None:
        write_bytes_atomic(self.repo_dir(repo_type, repo_id) / "refs.json", _dump(refs), point=None)

    def commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_bytes())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Branch, tag, ``refs/heads|tags|pr/...`` or a full commit sha -> commit sha."""
        refs = self.refs(repo_type, repo_id)
        rev = revision
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/pr/", "pulls")):
            if rev.startswith(prefix) and rev[len(prefix) :] in refs[table]:
                return self._target(refs[table][rev[len(prefix) :]])
        if rev in refs["branches"]:
            return refs["branches"][rev]
        if rev in refs["tags"]:
            return self._target(refs["tags"][rev])
        if _SHA1.match(rev) and (self.repo_dir(repo_type, repo_id) / "commits" / f"{rev}.json").is_file():
            return rev
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    @staticmethod
    def _target(ref) -> str:
        return ref["target"] if isinstance(ref, dict) else ref

    def _write_commit(self, d: Path, parent: str | None, message: str, description: str, tree: dict) -> str:
        obj = {
            "parent": parent,
            "message": message,
            "description": description,
            "author": USER,
            "date": now_iso(),
            "tree": tree,
        }
        data = _dump(obj)
        sha = hashlib.sha1(data).hexdigest()
        write_bytes_atomic(d / "commits" / f"{sha}.json", data, point=None)
        return sha

    def history(self, repo_type: str, repo_id: str, sha: str) -> Iterator[tuple[str, dict]]:
        while sha:
            c = self.commit(repo_type, repo_id, sha)
            yield sha, c
            sha = c["parent"]

    def commit_ops(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        ops: list[tuple[str, dict]],
        message: str,
        description: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[str, int | None]:
        """Apply NDJSON commit operations on top of ``branch`` (or a new PR ref from it).
        Returns (commit sha, PR number or None). Serialized per repo so heads never fork."""
        with self.lock(repo_type, repo_id):
            d = self.require(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            pr_num = None
            if branch.startswith("refs/pr/") and branch[8:] in refs["pulls"]:
                pr_num = int(branch[8:])
                head = refs["pulls"][branch[8:]]
            elif branch in refs["branches"]:
                head = refs["branches"][branch]
            else:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again. "
                    f"(parentCommit {parent_commit} is not the head {head} of {branch})",
                )
            tree = dict(self.commit(repo_type, repo_id, head)["tree"])
            for key, value in ops:
                self._apply(repo_type, repo_id, tree, key, value)
            sha = self._write_commit(d, head, message, description, tree)
            if create_pr:
                pr_num = max((int(n) for n in refs["pulls"]), default=0) + 1
            if pr_num is not None:
                refs["pulls"][str(pr_num)] = sha
            else:
                refs["branches"][branch] = sha
            self.write_refs(repo_type, repo_id, refs)
            return sha, (pr_num if create_pr else None)

    def _apply(self, repo_type: str, repo_id: str, tree: dict, key: str, v: dict) -> None:
        path = str(v.get("path", ""))
        path = check_path(path.rstrip("/") if key == "deletedFolder" else path)  # clients send "folder/"
        if key == "file":
            if v.get("encoding", "base64") != "base64":
                raise HubError(400, f"{path}: unsupported encoding {v.get('encoding')!r}")
            try:
                data = base64.b64decode(v.get("content", ""), validate=True)
            except ValueError:
                raise HubError(400, f"{path}: content is not valid base64") from None
            tree[path] = {"oid": git_blob_sha1(data), "size": len(data), "lfs": None, "sha256": self.put_blob(data)}
        elif key == "lfsFile":
            oid = check_sha256(v.get("oid", ""))
            if not self.has_blob(oid):
                raise HubError(422, f"{path}: LFS object {oid} was not uploaded")
            size = self.blob_path(oid).stat().st_size
            if v.get("size") is not None and v["size"] != size:
                raise HubError(422, f"{path}: LFS object {oid} has size {size}, not {v['size']}")
            tree[path] = {"oid": oid, "size": size, "lfs": oid, "sha256": oid}
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise HubError(404, f"File not found: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            gone = [p for p in tree if p.startswith(path + "/")]
            if not gone:
                raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
            for p in gone:
                del tree[p]
        elif key == "copyFile":
            src = check_path(v.get("srcPath", ""))
            src_tree = tree
            if v.get("srcRevision"):
                src_tree = self.commit(repo_type, repo_id, self.resolve(repo_type, repo_id, v["srcRevision"]))["tree"]
            if src not in src_tree:
                raise HubError(404, f"copyFile: source not found: {src}", "EntryNotFound")
            tree[path] = dict(src_tree[src])
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def create_branch(self, repo_type: str, repo_id: str, name: str, starting_point: str | None) -> None:
        check_path(name, "branch name")
        with self.lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if name in refs["branches"]:
                raise HubError(409, f"Branch {name} already exists")
            refs["branches"][name] = self.resolve(repo_type, repo_id, starting_point or "main")
            self.write_refs(repo_type, repo_id, refs)

    def delete_branch(self, repo_type: str, repo_id: str, name: str) -> None:
        with self.lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if name not in refs["branches"]:
                raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
            if name == "main":
                raise HubError(403, "The main branch cannot be deleted")
            del refs["branches"][name]
            self.write_refs(repo_type, repo_id, refs)

    def create_tag(self, repo_type: str, repo_id: str, tag: str, revision: str, message: str | None) -> None:
        check_path(tag, "tag")
        with self.lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if tag in refs["tags"]:
                raise HubError(409, f"Tag {tag} already exists")
            refs["tags"][tag] = {"target": self.resolve(repo_type, repo_id, revision), "message": message or ""}
            self.write_refs(repo_type, repo_id, refs)

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        with self.lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if refs["tags"].pop(tag, None) is None:
                raise HubError(404, f"Tag {tag} not found", "RevisionNotFound")
            self.write_refs(repo_type, repo_id, refs)
