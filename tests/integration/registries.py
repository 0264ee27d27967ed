"""Registries for the tests, all on 127.0.0.1: Debian's docker-registry with
no auth, htpasswd basic auth or token auth; the token service it trusts; and
a throttling TCP proxy (a slow link, so a pull can be killed mid-blob).

Nothing here stands in for a registry: the registry is the real one, and the
token service signs real JWTs (RS256, x5c) that the registry verifies.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.localregistry import serve as serve_registry

__all__ = ["serve_registry", "SlowProxy", "TokenService", "htpasswd_auth", "stored_blob"]

USER, PASSWORD = "kata", "s3cret-pw"


def stored_blob(root: Path, digest: str) -> Path:
    """Where the registry keeps a blob's bytes (its filesystem driver's layout)."""
    hexd = digest.removeprefix("sha256:")
    return root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def htpasswd_auth(root: Path) -> dict[str, object]:
    root.mkdir(parents=True, exist_ok=True)
    line = subprocess.run(["htpasswd", "-nbB", USER, PASSWORD], capture_output=True,
                          text=True, check=True).stdout.strip()
    (root / "htpasswd").write_text(line + "\n")
    return {"htpasswd": {"realm": "kata-py-test", "path": str(root / "htpasswd")}}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Docker's token protocol: GET realm?service=&scope=[&account=].

    Anonymous callers may pull; USER/PASSWORD may also push; a wrong password
    is refused.  Every request is recorded for the tests to look at."""

    SERVICE, ISSUER = "kata-py-test-registry", "kata-py-test-issuer"

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = root / "key.pem", root / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(self.key), "-out", str(self.cert), "-days", "1",
                        "-subj", "/CN=kata-py token issuer"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict[str, str]] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                service.answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_port}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TokenService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def auth(self) -> dict[str, object]:
        return {"token": {"realm": self.realm, "service": self.SERVICE, "issuer": self.ISSUER,
                          "rootcertbundle": str(self.cert)}}

    def answer(self, req: http.server.BaseHTTPRequestHandler) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(req.path).query))
        header = req.headers.get("Authorization", "")
        account = ""
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (user, password) != (USER, PASSWORD):
                self.requests.append({**query, "result": "refused"})
                req.send_response(401)
                req.end_headers()
                return
            account = user
        self.requests.append({**query, "result": "granted", "account": account})
        access = []
        for scope in query.get("scope", "").split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if a == "pull" or account]
            access.append({"type": kind, "name": name, "actions": allowed})
        body = json.dumps({"token": self.sign(account, access), "expires_in": 300}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def sign(self, subject: str, access: Sequence[Mapping[str, object]]) -> str:
        now = int(time.time())
        head = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": subject, "aud": self.SERVICE, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(head).encode())}." \
                        f"{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), capture_output=True,
                                   check=True).stdout
        return f"{signing_input}.{_b64url(signature)}"


class SlowProxy:
    """A TCP proxy to the registry that sends the registry's answers at
    `rate` bytes/s, counts them, and notes Range requests."""

    def __init__(self, upstream: str, rate: int) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self.sent = 0
        self.ranges: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.conns: list[socket.socket] = []

    def __enter__(self) -> SlowProxy:
        self.threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self.threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.conns += [client, server]
            for args in ((client, server, False), (server, client, True)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                self.threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                data = src.recv(16384 if slow else 65536)
                if not data:
                    break
                if slow:
                    time.sleep(len(data) / self.rate)
                    self.sent += len(data)
                else:
                    self.ranges += [line for line in data.split(b"\r\n")
                                    if line.lower().startswith(b"range:")]
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
