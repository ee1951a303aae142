"""A stand-in for the Hugging Face Hub on loopback, for `crofter models pull` tests.

It serves the two endpoints huggingface_hub uses for a pull: the model-info API
(with per-file checksums) and `resolve` downloads (HEAD and GET, with Range).
Per-file faults simulate the network: `cut_once` drops the first transfer
half-way (a resumable blip), `cut_always` drops it and sends nothing on every retry,
`corrupt` serves bytes that do not match the listed sha256, `slow` trickles the body.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs: set[tuple[str, str]] = set()
        self.faults: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo: str, name: str, data: bytes, lfs: bool | None = None, fault: str | None = None) -> None:
        self.repos.setdefault(repo, {})[name] = data
        if lfs if lfs is not None else len(data) > 4096:
            self.lfs.add((repo, name))
        if fault:
            self.faults[(repo, name)] = fault

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, name: str) -> int:
        return sum(1 for m, p in self.requests if m == "GET" and p.endswith("/" + name))

    def _handler(hub):  # noqa: N805 - the closure keeps `hub` reachable from the handler
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

            def _serve(self, head: bool):
                path = self.path.split("?", 1)[0]
                hub.requests.append(("HEAD" if head else "GET", path))
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
                if m:
                    return self._info(m.group(1))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
                if m and m.group(1) in hub.repos and m.group(2) in hub.repos[m.group(1)]:
                    return self._file(m.group(1), m.group(2), head)
                return self._not_found()

            def _info(self, repo):
                if repo not in hub.repos:
                    return self._not_found()
                siblings = []
                for name, data in hub.repos[repo].items():
                    s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if (repo, name) in hub.lfs:
                        s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                    siblings.append(s)
                self._json({"id": repo, "sha": COMMIT, "siblings": siblings})

            def _file(self, repo, name, head):
                data = hub.repos[repo][name]
                fault = hub.faults.get((repo, name))
                lfs = (repo, name) in hub.lfs
                etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                if lfs:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                first = sum(1 for m, p in hub.requests if m == "GET" and p.endswith("/" + name)) == 1
                if fault == "cut_always" and not first:
                    body = b""  # the link is dead: headers, then nothing
                if (fault == "cut_once" and first) or fault == "cut_always":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "slow":  # a slow link: 32 KiB every 50 ms, for a kill to land mid-transfer
                    for i in range(0, len(body), 32 * 1024):
                        self.wfile.write(body[i:i + 32 * 1024])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        return Handler
