"""A minimal Hugging Face Hub-compatible server on 127.0.0.1 for offline round-trip tests.

It speaks just enough of the Hub HTTP API for the real `huggingface_hub` client: `create_repo`, `preupload` (every file
"regular", i.e. inline base64), `commit` (NDJSON), `model_info` / revision info, and `resolve` (HEAD and GET with the
`X-Repo-Commit` / `ETag` headers, `X-Error-Code` on 404). Repositories live in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lock = threading.Lock()

    def commit(self, repo_id: str, files: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos.setdefault(repo_id, {"sha": "0" * 40, "files": {}})
            repo["files"].update(files)
            for path in deleted:
                repo["files"].pop(path, None)
            digest = hashlib.sha1(repo["sha"].encode())
            for path in sorted(repo["files"]):
                digest.update(path.encode() + hashlib.sha1(repo["files"][path]).digest())
            repo["sha"] = digest.hexdigest()
            return repo["sha"]


def make_handler(state: HubState, endpoint: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, data, head: bool = False, error: str | None = None) -> None:
            headers = {"Content-Type": "application/json"}
            if error:
                headers["X-Error-Code"] = error
            self._send(code, json.dumps(data).encode(), headers, head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_POST(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            if path == "/api/repos/create":
                data = json.loads(self._body())
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                with state.lock:
                    state.repos.setdefault(repo_id, {"sha": "0" * 40, "files": {}})
                return self._json(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":  # model card metadata check
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
                files = json.loads(self._body())["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._json(200, {"files": modes})
            if m := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
                files, deleted = {}, []
                for line in self._body().decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        deleted.append(item["value"]["path"])
                    elif item["key"] == "lfsFile":
                        return self._json(400, {"error": "LFS uploads are not supported by the test server"})
                sha = state.commit(unquote(m.group(1)), files, deleted)
                return self._json(200, {"commitUrl": f"{endpoint}/{m.group(1)}/commit/{sha}", "commitOid": sha})
            self._json(404, {"error": f"unknown endpoint {path}"})

        def _repo(self, repo_id: str, head: bool):
            repo = state.repos.get(repo_id)
            if repo is None:
                self._json(404, {"error": "Repository not found"}, head, error="RepoNotFound")
            return repo

        def _get(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                if (repo := self._repo(m.group(1), head)) is None:
                    return
                siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(repo["files"].items())]
                return self._json(200, {"id": m.group(1), "sha": repo["sha"], "siblings": siblings, "private": False},
                                  head)  # fmt: skip
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                if (repo := self._repo(m.group(1), head)) is None:
                    return
                data = repo["files"].get(m.group(3))
                if data is None:
                    return self._json(404, {"error": "Entry not found"}, head, error="EntryNotFound")
                headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._send(200, data, headers, head)
            self._json(404, {"error": f"unknown endpoint {path}"}, head)

        def do_GET(self) -> None:  # noqa: N802
            self._get(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._get(head=True)

    return Handler


class HubServer:
    """`with HubServer() as hub:` — `hub.endpoint` is the base URL, `hub.state.repos` the stored repositories."""

    def __init__(self) -> None:
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: None)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.server.RequestHandlerClass = make_handler(self.state, self.endpoint)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
