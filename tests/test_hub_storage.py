"""etokit.hub.storage on its own, on a temp folder: the name checks, content-addressed blobs,
repos, commits and their operations, refs, and a restart on the same folder. The server that
speaks HTTP over it, driven by the real clients: tests/test_hub_server.py."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re

import pytest

from etokit.hub.storage import (
    GITATTRIBUTES,
    HubError,
    Storage,
    check_path,
    check_repo_id,
    check_sha256,
    git_blob_sha1,
    lfs_pointer_size,
    now_iso,
)

REPO = "me/repo"


@pytest.fixture
def store(tmp_path):
    s = Storage(tmp_path / "hub")
    s.create_repo("model", REPO, private=False)
    return s


def file_op(path: str, data: bytes) -> tuple[str, dict]:
    return "file", {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}


def commit(store, *ops, branch="main", parent=None, create_pr=False, message="m"):
    return store.commit_ops("model", REPO, branch, list(ops), message, "", parent, create_pr)


def tree(store, revision="main") -> dict:
    return store.commit("model", REPO, store.resolve("model", REPO, revision))["tree"]


def head(store, branch="main") -> str:
    return store.refs("model", REPO)["branches"][branch]


@contextlib.contextmanager
def raises(status: int, message: str, code: str | None = None):
    """pytest.raises for a HubError with this status (and X-Error-Code), its message matching."""
    with pytest.raises(HubError, match=message) as e:
        yield e
    assert (e.value.status, e.value.code) == (status, code), e.value.message


# ------------------------------------------------------------------------------ helpers and checks


def test_git_blob_sha1_is_gits_object_id():
    # `printf 'hello\n' | git hash-object --stdin` and the empty blob's well-known id.
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_lfs_pointer_size_is_the_size_of_the_pointer_file():
    # version line (43) + "oid sha256:" + 64 hex + "\n" (76) + "size 12345\n" (11)
    assert lfs_pointer_size("a" * 64, 12345) == 130
    assert lfs_pointer_size("a" * 64, 1) == 126


def test_now_iso_is_utc_with_milliseconds():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now_iso())


def test_hub_error_carries_status_code_and_headers():
    e = HubError(429, "slow down", "RateLimited", {"Retry-After": "3"})
    assert (str(e), e.status, e.message, e.code, e.headers) == (
        "slow down",
        429,
        "slow down",
        "RateLimited",
        {"Retry-After": "3"},
    )
    assert HubError(400, "x").headers == {} and HubError(400, "x").code is None


@pytest.mark.parametrize("repo_id", ["me/repo", "A.b/c_d-e", "x/" + "n" * 96])
def test_check_repo_id_accepts_namespace_slash_name(repo_id):
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id", ["repo", "a/b/c", "/b", "a/", "a/..", "../b", "a/b..c", "a/b c", "-a/b", "a/.b", "x/" + "n" * 97]
)
def test_check_repo_id_refuses_anything_else(repo_id):
    with raises(400, re.escape(f"Invalid repo id {repo_id!r}: expected 'namespace/name'")):
        check_repo_id(repo_id)


@pytest.mark.parametrize("path", ["a.txt", "dir/sub/a.parquet", ".gitattributes", "a..b"])
def test_check_path_accepts_relative_paths(path):
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a//b", "a/", "./a", "a/./b", "a/../b", "..", "a\\b", "a\0b"])
def test_check_path_refuses_what_could_steer_a_client(path):
    with raises(400, re.escape(f"Invalid tag {path!r}")):
        check_path(path, "tag")


def test_check_sha256():
    good = hashlib.sha256(b"x").hexdigest()
    assert check_sha256(good) == good
    for bad in (good.upper(), good[:-1], good + "0", "g" * 64, None, 7):
        with raises(400, re.escape(f"Invalid sha256 oid {bad!r}")):
            check_sha256(bad)


# ------------------------------------------------------------------------------------------- blobs


def test_blobs_are_stored_once_under_their_sha256(tmp_path):
    s = Storage(tmp_path / "hub")
    sha = s.put_blob(b"payload")
    assert sha == hashlib.sha256(b"payload").hexdigest()
    path = tmp_path / "hub" / "blobs" / sha[:2] / sha
    assert s.blob_path(sha) == path and path.read_bytes() == b"payload"
    inode = path.stat().st_ino
    assert s.put_blob(b"payload") == sha and path.stat().st_ino == inode  # already there: not rewritten
    assert s.has_blob(sha) and s.has_blob(sha, 7) and not s.has_blob(sha, 8)
    assert not s.has_blob(hashlib.sha256(b"other").hexdigest())
    with s.open_blob(sha) as f:
        assert f.read() == b"payload"
    with raises(400, "Invalid sha256 oid"):
        s.blob_path("../../etc/passwd")


def test_a_truncated_blob_is_written_again(tmp_path):
    s = Storage(tmp_path / "hub")
    sha = s.put_blob(b"payload")
    s.blob_path(sha).write_bytes(b"pay")  # what a torn write outside the atomic helper would leave
    s.put_blob(b"payload")
    assert s.blob_path(sha).read_bytes() == b"payload"


def test_put_blob_stream_keeps_an_upload_that_matches(tmp_path):
    s = Storage(tmp_path / "hub")
    data = b"0123456789" * 1000
    sha = hashlib.sha256(data).hexdigest()
    s.put_blob_stream(iter([data[:3000], data[3000:]]), sha, len(data))
    assert s.blob_path(sha).read_bytes() == data
    assert [p.name for p in s.blob_path(sha).parent.iterdir()] == [sha]  # no temp file left


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_put_blob_stream_refuses_an_upload_that_does_not_match(tmp_path, wrong):
    s = Storage(tmp_path / "hub")
    data = b"0123456789"
    sha = hashlib.sha256(data).hexdigest() if wrong == "size" else hashlib.sha256(b"else").hexdigest()
    size = len(data) + 1 if wrong == "size" else len(data)
    got = hashlib.sha256(data).hexdigest()
    with raises(400, re.escape(f"expected sha256 {sha} size {size}, got sha256 {got} size {len(data)}")):
        s.put_blob_stream(iter([data]), sha, size)
    assert not s.has_blob(sha) and list(s.blob_path(sha).parent.iterdir()) == []  # nothing kept, no temp file


def test_put_blob_stream_removes_its_temp_file_when_the_upload_breaks(tmp_path):
    s = Storage(tmp_path / "hub")
    sha = hashlib.sha256(b"ab").hexdigest()

    def chunks():
        yield b"a"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        s.put_blob_stream(chunks(), sha, 2)
    assert list(s.blob_path(sha).parent.iterdir()) == []


# ------------------------------------------------------------------------------------------- repos


def test_create_repo_starts_main_with_the_gitattributes(tmp_path):
    s = Storage(tmp_path / "hub")
    assert not s.exists("dataset", REPO)
    s.create_repo("dataset", REPO, private=True)
    assert s.exists("dataset", REPO) and not s.exists("model", REPO)  # one namespace per repo type
    assert s.repo_dir("dataset", REPO) == tmp_path / "hub" / "repos" / "datasets" / "me" / "repo"
    assert s.repo_meta("dataset", REPO)["private"] is True
    refs = s.refs("dataset", REPO)
    assert set(refs) == {"branches", "tags", "pulls"} and refs["tags"] == refs["pulls"] == {}
    first = s.commit("dataset", REPO, refs["branches"]["main"])
    assert (first["parent"], first["message"], first["author"]) == (None, "initial commit", "etokit-user")
    assert first["tree"] == {
        ".gitattributes": {
            "oid": git_blob_sha1(GITATTRIBUTES),
            "size": len(GITATTRIBUTES),
            "lfs": None,
            "sha256": hashlib.sha256(GITATTRIBUTES).hexdigest(),
        }
    }
    assert b"*.safetensors filter=lfs" in GITATTRIBUTES and b"*.parquet filter=lfs" in GITATTRIBUTES
    with raises(409, "You already created this dataset repo: me/repo"):
        s.create_repo("dataset", REPO, private=False)


def test_a_missing_repo_is_404_repo_not_found(tmp_path):
    s = Storage(tmp_path / "hub")
    for call in (s.require, s.refs, s.repo_meta):
        with raises(404, re.escape("Repository models/me/none not found"), "RepoNotFound"):
            call("model", "me/none")
    with raises(400, "Invalid repo id"):
        s.exists("model", "../../x")


def test_delete_repo_removes_it_whole(store, tmp_path):
    commit(store, file_op("a.txt", b"a"))
    store.delete_repo("model", REPO)
    assert not store.exists("model", REPO)
    assert list((tmp_path / "hub" / "repos" / "models" / "me").iterdir()) == []  # no trash left behind
    with raises(404, "not found", "RepoNotFound"):
        store.delete_repo("model", REPO)
    store.create_repo("model", REPO, private=False)  # the name is free again
    assert set(tree(store)) == {".gitattributes"}


def test_one_lock_per_repo(tmp_path):
    s = Storage(tmp_path)
    assert s.lock("model", "a/b") is s.lock("model", "a/b")
    assert s.lock("model", "a/b") is not s.lock("dataset", "a/b")


# ----------------------------------------------------------------------------------------- commits


def test_a_commit_records_files_and_its_parent(store):
    first = head(store)
    sha, pr = commit(store, file_op("dir/a.txt", b"hello\n"), message="add a")
    assert pr is None and head(store) == sha != first
    c = store.commit("model", REPO, sha)
    assert (c["parent"], c["message"], c["description"]) == (first, "add a", "")
    assert c["tree"]["dir/a.txt"] == {
        "oid": "ce013625030ba8dba906f756967f9e9ca394464a",
        "size": 6,
        "lfs": None,
        "sha256": hashlib.sha256(b"hello\n").hexdigest(),
    }
    assert ".gitattributes" in c["tree"]  # the parent's files carry over
    # Its id is the sha1 of its canonical JSON, as stored.
    raw = (store.repo_dir("model", REPO) / "commits" / f"{sha}.json").read_bytes()
    assert hashlib.sha1(raw).hexdigest() == sha and json.loads(raw) == c
    assert [s for s, _ in store.history("model", REPO, sha)] == [sha, first]


def test_parent_commit_must_be_the_head(store):
    first = head(store)
    sha, _ = commit(store, file_op("a.txt", b"1"), parent=first)
    with raises(412, re.escape(f"(parentCommit {first} is not the head {sha} of main)")):
        commit(store, file_op("a.txt", b"2"), parent=first)
    assert head(store) == sha


def test_commits_go_to_an_existing_branch(store):
    with raises(404, re.escape("Invalid rev id: dev (commits go to a branch)"), "RevisionNotFound"):
        commit(store, file_op("a.txt", b"1"), branch="dev")
    with raises(404, "Invalid rev id: refs/pr/1", "RevisionNotFound"):
        commit(store, file_op("a.txt", b"1"), branch="refs/pr/1")


def test_pull_requests_are_numbered_and_leave_main_alone(store):
    main = head(store)
    one, n1 = commit(store, file_op("a.txt", b"1"), create_pr=True)
    two, n2 = commit(store, file_op("b.txt", b"2"), create_pr=True)
    assert (n1, n2) == (1, 2) and head(store) == main
    assert store.refs("model", REPO)["pulls"] == {"1": one, "2": two}
    more, n = commit(store, file_op("c.txt", b"3"), branch="refs/pr/1")
    assert n is None and store.refs("model", REPO)["pulls"]["1"] == more
    assert set(tree(store, "refs/pr/1")) == {".gitattributes", "a.txt", "c.txt"}
    assert store.commit("model", REPO, more)["parent"] == one


def test_a_failing_operation_commits_nothing(store):
    before = head(store)
    with raises(404, "File not found: nope.txt", "EntryNotFound"):
        commit(store, file_op("a.txt", b"1"), ("deletedFile", {"path": "nope.txt"}))
    assert head(store) == before and "a.txt" not in tree(store)


@pytest.mark.parametrize(
    "op, status, message",
    [
        (
            ("file", {"path": "a.txt", "content": "aGk=", "encoding": "utf-8"}),
            400,
            "a.txt: unsupported encoding 'utf-8'",
        ),
        (("file", {"path": "a.txt", "content": "aGk=*"}), 400, "a.txt: content is not valid base64"),
        (("file", {"path": "../a.txt", "content": "aGk="}), 400, "Invalid path '../a.txt'"),
        (("lfsFile", {"path": "w.bin", "oid": "0" * 64}), 422, f"w.bin: LFS object {'0' * 64} was not uploaded"),
        (("lfsFile", {"path": "w.bin", "oid": "XYZ"}), 400, "Invalid sha256 oid 'XYZ'"),
        (("deletedFolder", {"path": "none/"}), 404, "Folder not found: none"),
        (("copyFile", {"path": "b.txt", "srcPath": "none.txt"}), 404, "copyFile: source not found: none.txt"),
        (("rename", {"path": "a.txt"}), 400, "Unknown commit operation 'rename'"),
    ],
)
def test_bad_operations_are_refused_naming_the_path(store, op, status, message):
    with pytest.raises(HubError, match=re.escape(message)) as e:
        commit(store, op)
    assert e.value.status == status


def test_file_content_defaults_to_base64(store):
    sha, _ = commit(store, ("file", {"path": "a.txt", "content": base64.b64encode(b"hi").decode()}))
    assert store.open_blob(tree(store)["a.txt"]["sha256"]).read() == b"hi"


def test_lfs_files_point_at_an_uploaded_blob(store):
    data = b"weights" * 100
    oid = store.put_blob(data)
    commit(store, ("lfsFile", {"path": "model.safetensors", "oid": oid, "size": len(data)}))
    assert tree(store)["model.safetensors"] == {"oid": oid, "size": len(data), "lfs": oid, "sha256": oid}
    with raises(422, re.escape(f"x.bin: LFS object {oid} has size {len(data)}, not 5")):
        commit(store, ("lfsFile", {"path": "x.bin", "oid": oid, "size": 5}))
    commit(store, ("lfsFile", {"path": "y.bin", "oid": oid}))  # no size announced: the blob's
    assert tree(store)["y.bin"]["size"] == len(data)


def test_deleted_folder_removes_what_is_under_it_only(store):
    commit(
        store,
        file_op("data/a.txt", b"a"),
        file_op("data/sub/b.txt", b"b"),
        file_op("data2/c.txt", b"c"),
        file_op("data.txt", b"d"),
    )
    commit(store, ("deletedFolder", {"path": "data/"}))  # clients send the trailing slash
    assert set(tree(store)) == {".gitattributes", "data2/c.txt", "data.txt"}
    commit(store, ("deletedFile", {"path": "data.txt"}))
    assert set(tree(store)) == {".gitattributes", "data2/c.txt"}


def test_copy_file_from_the_tree_or_an_older_revision(store):
    old, _ = commit(store, file_op("a.txt", b"old"))
    commit(store, file_op("a.txt", b"new"))
    commit(
        store,
        ("copyFile", {"path": "now.txt", "srcPath": "a.txt"}),
        ("copyFile", {"path": "then.txt", "srcPath": "a.txt", "srcRevision": old}),
    )
    t = tree(store)
    assert t["now.txt"] == t["a.txt"] and t["then.txt"] == store.commit("model", REPO, old)["tree"]["a.txt"]
    assert store.open_blob(t["then.txt"]["sha256"]).read() == b"old"


# -------------------------------------------------------------------------------------------- refs


def test_resolve_branches_tags_pull_requests_and_shas(store):
    first = head(store)
    pr, _ = commit(store, file_op("p.txt", b"p"), create_pr=True)
    store.create_branch("model", REPO, "dev", None)
    dev, _ = commit(store, file_op("d.txt", b"d"), branch="dev")
    store.create_tag("model", REPO, "v1", "dev", "first release")

    def r(rev):
        return store.resolve("model", REPO, rev)

    assert r("main") == r("refs/heads/main") == first
    assert r("dev") == r("refs/heads/dev") == r("v1") == r("refs/tags/v1") == dev
    assert r("refs/pr/1") == pr and r(first) == first
    assert store.refs("model", REPO)["tags"]["v1"] == {"target": dev, "message": "first release"}
    for missing in ("nope", "refs/heads/nope", "refs/tags/dev", "refs/pr/2", "f" * 40, first[:7]):
        with raises(404, re.escape(f"Invalid rev id: {missing}"), "RevisionNotFound"):
            r(missing)


def test_a_branch_named_like_a_tag_resolves_to_the_branch(store):
    store.create_tag("model", REPO, "x", "main", None)
    sha, _ = commit(store, file_op("a.txt", b"a"))
    store.create_branch("model", REPO, "x", "main")
    assert store.resolve("model", REPO, "x") == sha != store.resolve("model", REPO, "refs/tags/x")
    assert store.refs("model", REPO)["tags"]["x"]["message"] == ""


def test_branches(store):
    sha, _ = commit(store, file_op("a.txt", b"a"))
    store.create_branch("model", REPO, "from-first", head(store))
    assert head(store, "from-first") == sha
    with raises(409, "Branch from-first already exists"):
        store.create_branch("model", REPO, "from-first", None)
    with raises(400, re.escape("Invalid branch name '../x'")):
        store.create_branch("model", REPO, "../x", None)
    with raises(404, "Invalid rev id: nope", "RevisionNotFound"):
        store.create_branch("model", REPO, "b", "nope")
    store.delete_branch("model", REPO, "from-first")
    assert set(store.refs("model", REPO)["branches"]) == {"main"}
    with raises(404, "Branch from-first not found", "RevisionNotFound"):
        store.delete_branch("model", REPO, "from-first")
    with raises(403, "The main branch cannot be deleted"):
        store.delete_branch("model", REPO, "main")


def test_tags(store):
    store.create_tag("model", REPO, "v1", "main", "m")
    with raises(409, "Tag v1 already exists"):
        store.create_tag("model", REPO, "v1", "main", None)
    with raises(400, re.escape("Invalid tag 'a/../b'")):
        store.create_tag("model", REPO, "a/../b", "main", None)
    store.delete_tag("model", REPO, "v1")
    assert store.refs("model", REPO)["tags"] == {}
    with raises(404, "Tag v1 not found", "RevisionNotFound"):
        store.delete_tag("model", REPO, "v1")


def test_a_restarted_storage_sees_everything_written(store, tmp_path):
    sha, _ = commit(store, file_op("a.txt", b"a"))
    store.create_tag("model", REPO, "v1", "main", "m")
    again = Storage(tmp_path / "hub")
    assert again.resolve("model", REPO, "v1") == sha
    assert again.open_blob(again.commit("model", REPO, sha)["tree"]["a.txt"]["sha256"]).read() == b"a"
    # Only finished files: no temp file of an atomic write left anywhere.
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.name.startswith(".")]
