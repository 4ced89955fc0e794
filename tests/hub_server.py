"""A local server speaking the part of the Hugging Face Hub HTTP API that `huggingface_hub`'s client uses to create a
repo, commit files and download them, so that push and load run over a real socket without the internet.

Repos live in memory: each commit is a full snapshot `{path: bytes}`; branches point at commits. Tokens: requests
that write must carry `Authorization: Bearer <token>` with a token from `tokens`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HubState:
    def __init__(self, tokens: set[str]):
        self.tokens = tokens
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
        self.lock = threading.Lock()
        self.requests: list[str] = []

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos[repo_id]
        sha = repo["branches"].get(revision, revision if revision in repo["commits"] else None)
        return None if sha is None else (sha, repo["commits"][sha])


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- helpers ------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            self._json(401, {"error": "Invalid username or password."})
            return False
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo_id: str) -> dict | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        return repo

    def _tree(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """The commit and files of `repo_id` at `revision`, or None after answering 404."""
        if self._repo(repo_id) is None:
            return None
        resolved = self.state.resolve(repo_id, revision)
        if resolved is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return resolved

    # -- routes -------------------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"POST {path}")
        if path == "/api/repos/create":
            if not self._authorized():
                return
            body = json.loads(self._body())
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
                self.state.repos[repo_id] = {"branches": {"main": "0" * 40}, "commits": {"0" * 40: {}}}
            return self._json(200, {"url": self._url(repo_id), "name": repo_id})
        if path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
            content = json.loads(self._body())["content"]
            header = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                metadata = yaml.safe_load(header.group(1)) if header else {}
            except yaml.YAMLError as exc:
                return self._json(400, {"error": f"Invalid metadata in README.md: {exc}"})
            if not isinstance(metadata, dict):
                return self._json(400, {"error": "Invalid metadata in README.md: not a mapping"})
            # as the Hub: base_model names existing models by id, datasets are dataset ids (no local paths)
            bases = metadata.get("base_model")
            for base in bases if isinstance(bases, list) else [] if bases is None else [bases]:
                if not isinstance(base, str) or not REPO_ID.fullmatch(base) or base not in self.state.repos:
                    return self._json(400, {"error": f'"base_model" with value "{base}" is not valid: use a model id'})
            names = metadata.get("datasets")
            for name in names if isinstance(names, list) else [] if names is None else [names]:
                if not isinstance(name, str) or not REPO_ID.fullmatch(name):
                    return self._json(400, {"error": f'"datasets" with value "{name}" is not valid: use dataset ids'})
            return self._json(200, {"warnings": []})
        match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
        if not match:
            return self._error(404, "NotFound", f"Unknown route {path}")
        repo_id, action, revision = match.groups()
        if not self._authorized() or self._repo(repo_id) is None:
            return
        body = self._body()
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        with self.state.lock:
            resolved = self.state.resolve(repo_id, revision)
            if resolved is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            tree = dict(resolved[1])
            summary = ""
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary = value.get("summary", "")
                elif item["key"] == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    tree.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    tree = {p: c for p, c in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    return self._error(400, "BadRequest", f"Unsupported commit operation {item['key']}")
            digest = hashlib.sha1(
                summary.encode()
                + json.dumps(sorted((p, hashlib.sha1(c).hexdigest()) for p, c in tree.items())).encode()
            )
            sha = digest.hexdigest()
            repo = self.state.repos[repo_id]
            repo["commits"][sha] = tree
            repo["branches"][revision if revision in repo["branches"] else "main"] = sha
        return self._json(200, {"commitUrl": f"{self._url(repo_id)}/commit/{sha}", "commitOid": sha})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{self.command} {path}")
        match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
        if match:  # one folder's entries, not recursive (transformers lists additional_chat_templates/)
            repo_id, revision, folder = match.group(1), match.group(2), (match.group(3) or "").strip("/")
            if (resolved := self._tree(repo_id, revision)) is None:
                return
            prefix = f"{folder}/" if folder else ""
            below = [p.removeprefix(prefix) for p in sorted(resolved[1]) if p.startswith(prefix)]
            if folder and not below:
                return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
            files = [
                {"type": "file", "path": prefix + p, "size": len(resolved[1][prefix + p])}
                for p in below
                if "/" not in p
            ]
            folders = sorted({prefix + p.split("/")[0] for p in below if "/" in p})
            return self._json(200, files + [{"type": "directory", "path": f, "oid": "0" * 40} for f in folders])
        match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if match:
            repo_id, revision = match.group(1), match.group(2) or "main"
            if (resolved := self._tree(repo_id, revision)) is None:
                return
            sha, tree = resolved
            siblings = [{"rfilename": p} for p in sorted(tree)]
            return self._json(
                200, {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False}
            )
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if not match:
            return self._error(404, "NotFound", f"Unknown route {path}")
        repo_id, revision, filename = match.groups()
        if (resolved := self._tree(repo_id, revision)) is None:
            return
        sha, tree = resolved
        if filename not in tree:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
        content = tree[filename]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers)

    def _url(self, repo_id: str) -> str:
        return f"http://{self.headers.get('Host')}/{repo_id}"


def serve(tokens: set[str]) -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start the server on a free loopback port; returns it, its state and its endpoint URL."""
    state = HubState(tokens)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"


def client_env(endpoint: str, home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a process whose `huggingface_hub` client talks to the server at `endpoint`: its own cache
    in `home`, online, no telemetry, and `token` (or none) as its login."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    return env if token is None else {**env, "HF_TOKEN": token}
