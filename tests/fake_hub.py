"""A minimal, in-memory Hugging Face Hub for offline tests.

Implements just the HTTP API that huggingface_hub (2.x) uses for
`HfApi.create_repo`, `HfApi.create_branch`, `HfApi.create_commit` (files sent
inline: the preupload endpoint answers uploadMode "regular" for every file,
so no LFS or Xet) and `snapshot_download` / `hf_hub_download`:

  POST /api/repos/create                         create_repo (409 if it exists)
  POST /api/{type}s/{repo}/branch/{branch}       create_branch (409 if exists)
  POST /api/validate-yaml                        README.md metadata check
  POST /api/{type}s/{repo}/preupload/{rev}       upload modes ("regular")
  POST /api/{type}s/{repo}/commit/{rev}          NDJSON commit (base64 files)
  GET  /api/{type}s/{repo}[/revision/{rev}]      repo info: sha, siblings
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]   file listing (oid, size)
  HEAD/GET /{repo}/resolve/{rev}/{path}          file metadata / contents
       (X-Repo-Commit, ETag = git blob sha1, Content-Length)

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions
(RepoNotFound, RevisionNotFound, EntryNotFound). Every commit gets a fresh
40-hex sha; branches point at commits; revisions may be a branch or a sha.
Write endpoints require an `Authorization: Bearer ...` header.

Usage:
    hub = FakeHub().start()      # serves http://127.0.0.1:<random port>
    ... HF_ENDPOINT=hub.url ...
    hub.commit("owner/name", {"evil.pkl": b"..."})   # server-side commit
    hub.files("owner/name")                           # {path: bytes} at main
    hub.requests                                      # [(method, path), ...]
    hub.stop()
"""

import base64
import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs
from urllib.parse import unquote
from urllib.parse import urlsplit

GITATTRIBUTES = b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data):
    """The git object id of a blob: what the Hub reports as a file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


class Repo:
    def __init__(self, repo_id, repo_type, private):
        self.repo_id, self.repo_type = repo_id, repo_type
        self.private = private
        self.commits = {}  # sha -> {"files": {path: bytes}, "message": str}
        self.branches = {}  # name -> sha

    def resolve(self, revision):
        """Commit sha for a branch name or a (full) commit sha."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class FakeHub:
    def __init__(self, user="fake-user"):
        self.user = user
        self.repos = {}  # (repo_type, repo_id) -> Repo
        self.requests = []  # (method, path) of every request received
        self.lock = threading.RLock()
        self.server = None
        self.thread = None

    # -- lifecycle ---------------------------------------------------------
    def start(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="fake-hf-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # -- server-side helpers for tests -------------------------------------
    def create_repo(self, repo_id, repo_type="model", private=False):
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, "You already created this model repo",
                               headers={"url": self.repo_url(repo_id)})
            repo = Repo(repo_id, repo_type, private)
            self.repos[key] = repo
            # The Hub starts every repository with a .gitattributes commit.
            self._new_commit(repo, None, {".gitattributes": GITATTRIBUTES},
                             "initial commit", "main")
            return repo

    def repo(self, repo_id, repo_type="model"):
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def repo_url(self, repo_id):
        return f"{self.url}/{repo_id}"

    def files(self, repo_id, revision="main", repo_type="model"):
        """{path: bytes} of the repository at `revision`."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            return dict(repo.commits[repo.resolve(revision)]["files"])

    def head(self, repo_id, revision="main", repo_type="model"):
        with self.lock:
            return self.repo(repo_id, repo_type).resolve(revision)

    def commit(self, repo_id, changes, branch="main", message="server-side "
               "commit", repo_type="model"):
        """Commits `changes` ({path: bytes, or None to delete}) to `branch`
        directly in storage; returns the new commit's sha."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            return self._new_commit(repo, repo.resolve(branch), changes,
                                    message, branch)

    def _new_commit(self, repo, parent, changes, message, branch):
        files = dict(repo.commits[parent]["files"]) if parent else {}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = bytes(data)
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = {"files": files, "message": message,
                             "parent": parent}
        repo.branches[branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None  # set on the subclass made by FakeHub.start

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing ------------------------------------------------------------
    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status, body=b"", headers=None, head_only=False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _error(self, error, head_only=False):
        headers = dict(error.headers)
        headers.pop("url", None)
        if error.code:
            headers["X-Error-Code"] = error.code
        headers["X-Error-Message"] = error.message
        body = {"error": error.message}
        if "url" in error.headers:
            body["url"] = error.headers["url"]
        self._send(error.status, body, headers, head_only=head_only)

    def _require_auth(self):
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")

    def _dispatch(self, method):
        hub = self.hub
        url = urlsplit(self.path)
        with hub.lock:
            hub.requests.append((method, url.path))
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        head_only = method == "HEAD"
        try:
            if segments[0] == "api":
                self._api(method, segments[1:], query, body)
            else:
                self._resolve(method, segments, head_only)
        except HubError as e:
            self._error(e, head_only=head_only)
        except Exception as e:  # noqa: BLE001 - a server bug: answer 500
            self._error(HubError(500, f"{type(e).__name__}: {e}"),
                        head_only=head_only)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # -- /api ----------------------------------------------------------------
    def _api(self, method, segs, query, body):
        hub = self.hub
        if method == "POST" and segs == ["repos", "create"]:
            self._require_auth()
            payload = json.loads(body or b"{}")
            owner = payload.get("organization") or hub.user
            repo_id = f"{owner}/{payload['name']}"
            repo_type = payload.get("type") or "model"
            hub.create_repo(repo_id, repo_type,
                            payload.get("visibility") == "private")
            return self._send(200, {"url": hub.repo_url(repo_id),
                                    "name": repo_id, "id": uuid.uuid4().hex})
        if method == "POST" and segs == ["validate-yaml"]:
            payload = json.loads(body or b"{}")
            content = payload.get("content", "")
            if content.startswith("---") and content.count("\n---") < 1:
                return self._send(400, {"errors": [
                    {"message": "unterminated YAML front matter"}],
                    "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})
        if len(segs) < 3 or segs[0] not in ("models", "datasets", "spaces"):
            raise HubError(404, f"Unknown API route /api/{'/'.join(segs)}")
        repo_type = segs[0][:-1]
        repo = hub.repo(f"{segs[1]}/{segs[2]}", repo_type)
        rest = segs[3:]
        if method == "GET" and not rest:
            return self._send(200, self._info(repo, "main"))
        if method == "GET" and rest[0] == "revision" and len(rest) == 2:
            return self._send(200, self._info(repo, rest[1]))
        if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
            return self._send(200, self._tree(repo, rest[1], "/".join(
                rest[2:]), query.get("recursive", "").lower()
                in ("1", "true")))
        if method == "POST" and rest[0] == "branch" and len(rest) == 2:
            self._require_auth()
            payload = json.loads(body or b"{}")
            with hub.lock:
                if rest[1] in repo.branches:
                    raise HubError(409, f"Reference {rest[1]} already exists")
                start = repo.resolve(payload.get("startingPoint") or "main")
                repo.branches[rest[1]] = start
            return self._send(200, {})
        if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
            self._require_auth()
            payload = json.loads(body or b"{}")
            with hub.lock:
                files = repo.commits[repo.resolve(rest[1])]["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular",
                 "shouldIgnore": False,
                 "oid": (git_blob_sha1(files[f["path"]])
                         if f["path"] in files else None)}
                for f in payload["files"]]})
        if method == "POST" and rest[0] == "commit" and len(rest) == 2:
            self._require_auth()
            return self._commit(repo, rest[1], body)
        raise HubError(404, f"Unknown API route /api/{'/'.join(segs)}")

    def _info(self, repo, revision):
        with self.hub.lock:
            sha = repo.resolve(revision)
            files = repo.commits[sha]["files"]
        return {"_id": uuid.uuid4().hex[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": sha, "private": repo.private, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "library_name": "keras-e3",
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(files)]}

    def _tree(self, repo, revision, path, recursive):
        with self.hub.lock:
            files = repo.commits[repo.resolve(revision)]["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            if recursive:
                parts = name.split("/")
                folders.update("/".join(parts[:i]) for i in range(
                    len(prefix.split("/")), len(parts)))
            entries.append({"type": "file", "path": name,
                            "size": len(files[name]),
                            "oid": git_blob_sha1(files[name])})
        folders.discard("")
        return [{"type": "directory", "path": f, "oid": hashlib.sha1(
            f.encode()).hexdigest(), "size": 0} for f in sorted(folders)
                ] + entries

    def _commit(self, repo, branch, body):
        header, changes = None, {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 files are supported")
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:  # lfsFile, deletedFolder, copies: not part of this fake
                raise HubError(400, f"unsupported commit operation {key!r}")
        if header is None:
            raise HubError(400, "commit payload has no header")
        hub = self.hub
        with hub.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}",
                               "RevisionNotFound")
            parent = repo.branches[branch]
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "A commit has happened since.")
            sha = hub._new_commit(repo, parent, changes, header["summary"],
                                  branch)
        return self._send(200, {
            "success": True, "commitOid": sha,
            "commitUrl": f"{hub.repo_url(repo.repo_id)}/commit/{sha}",
            "commitMessage": header["summary"], "hookOutput": ""})

    # -- /{repo}/resolve/{revision}/{path} ----------------------------------
    def _resolve(self, method, segs, head_only):
        if method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) < 5 or segs[2] != "resolve":
            raise HubError(404, "Not found")
        hub = self.hub
        repo = hub.repo(f"{segs[0]}/{segs[1]}", repo_type)
        path = "/".join(segs[4:])
        with hub.lock:
            sha = repo.resolve(segs[3])
            data = repo.commits[sha]["files"].get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound",
                           {"X-Repo-Commit": sha})
        etag = f'"{git_blob_sha1(data)}"'
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag,
                               "Content-Type": "application/octet-stream",
                               "Accept-Ranges": "none"},
                   head_only=head_only)
