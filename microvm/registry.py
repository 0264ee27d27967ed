"""`microvm pull`: the OCI distribution API v2, as docker speaks it.

Anonymous, Bearer (answering WWW-Authenticate) and Basic auth; image indexes
and Docker manifest lists resolved to linux/amd64; every blob's digest and
size checked while it streams to a temporary file, renamed into the store
only when it matches.  Plain HTTP only for loopback registries or those the
user names insecure, as docker does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import images
from .errors import KataError

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
ACCEPT = ", ".join([*INDEX_TYPES, *sorted(images.MANIFEST_TYPES)])
DOCKER_HUB = "registry-1.docker.io"
LOOPBACK = ("localhost", "127.", "[::1]")


def _host(registry: str) -> str:
    return DOCKER_HUB if registry == images.DEFAULT_REGISTRY else registry


def _scheme(registry: str, insecure: tuple[str, ...]) -> str:
    plain = registry.startswith(LOOPBACK) or registry in insecure
    return "http" if plain else "https"


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class Client:
    def __init__(self, ref: images.Reference, insecure: tuple[str, ...] = (),
                 credentials: tuple[str, str] | None = None) -> None:
        self.ref = ref
        self.base = f"{_scheme(ref.registry, insecure)}://{_host(ref.registry)}/v2/{ref.repository}"
        self.credentials = credentials
        self.auth: str | None = None

    def _open(self, url: str, accept: str = "") -> Any:
        for attempt in range(2):
            req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
            if self.auth:
                req.add_header("Authorization", self.auth)
            try:
                return urllib.request.urlopen(req, timeout=60)  # noqa: S310 - http(s) only
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    self._login(e.headers.get("WWW-Authenticate", ""))
                    continue
                if e.code == 404:
                    raise KataError(f"{self.ref.name}: not found in the registry") from None
                raise KataError(f"{self.ref.name}: registry answered {e.code} {e.reason}") \
                    from None
            except urllib.error.URLError as e:
                raise KataError(f"{self.ref.registry}: cannot reach the registry "
                                f"({e.reason})") from None
        raise KataError(f"{self.ref.name}: unauthorized")

    def _login(self, header: str) -> None:
        scheme, params = _challenge(header)
        basic = None
        if self.credentials:
            basic = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if scheme == "basic":
            if basic is None:
                raise KataError(f"{self.ref.registry}: needs a login (microvm login)")
            self.auth = basic
            return
        if scheme != "bearer" or "realm" not in params:
            raise KataError(f"{self.ref.registry}: unsupported auth challenge {header!r}")
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.ref.repository}:pull")
        req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
        if basic:
            req.add_header("Authorization", basic)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
                body = json.loads(r.read())
        except (urllib.error.URLError, ValueError) as e:
            raise KataError(f"{self.ref.registry}: token request failed ({e})") from None
        token = body.get("token") or body.get("access_token")
        if not token:
            raise KataError(f"{self.ref.registry}: the token service gave no token")
        self.auth = f"Bearer {token}"

    def manifest(self, reference: str) -> tuple[dict[str, Any], str, bytes]:
        with self._open(f"{self.base}/manifests/{reference}", ACCEPT) as r:
            data = r.read(4 << 20)
            media = r.headers.get("Content-Type", "").split(";")[0]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise KataError(f"{self.ref.name}: manifest digest mismatch")
        try:
            doc = json.loads(data)
        except ValueError:
            raise KataError(f"{self.ref.name}: the manifest is not JSON") from None
        return doc, media or doc.get("mediaType", ""), data

    def blob(self, desc: dict[str, Any], dest: Path, progress: Progress) -> None:
        digest, size = images._digest(desc.get("digest")), int(desc.get("size", -1))
        if dest.exists():
            return
        h = hashlib.sha256()
        got = 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".pull-")
        try:
            with os.fdopen(fd, "wb") as out, self._open(f"{self.base}/blobs/{digest}") as r:
                while chunk := r.read(1 << 20):
                    got += len(chunk)
                    if size >= 0 and got > size:
                        raise KataError(f"blob {digest[:19]} is larger than its descriptor")
                    h.update(chunk)
                    out.write(chunk)
                    progress.update(digest, got, size)
            if size >= 0 and got != size:
                raise KataError(f"blob {digest[:19]} is truncated: {got} of {size} bytes")
            if "sha256:" + h.hexdigest() != digest:
                raise KataError(f"blob digest mismatch: expected {digest}")
            os.rename(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class Progress:
    """Per-layer bytes, total and rate on a terminal; nothing otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, digest: str, got: int, size: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self.last < 0.1 and got != size):
            return
        self.last = now
        rate = got / max(now - self.start, 1e-3) / 1e6
        total = f"{size / 1e6:.1f}" if size >= 0 else "?"
        sys.stderr.write(f"\r{digest[7:19]}: {got / 1e6:.1f}/{total} MB  {rate:.1f} MB/s   ")
        if got == size:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _platform(index: dict[str, Any], name: str) -> str:
    for m in index.get("manifests", []):
        p = m.get("platform") or {}
        if p.get("os") == "linux" and p.get("architecture") == "amd64":
            return images._digest(m.get("digest"))
    raise KataError(f"{name}: no linux/amd64 image in the index")


def pull(ref_text: str, insecure: tuple[str, ...] = (),
         credentials: tuple[str, str] | None = None) -> images.Image:
    ref = images.parse_reference(ref_text)
    client = Client(ref, insecure, credentials or load_credentials(ref.registry))
    doc, media, data = client.manifest(ref.digest or ref.tag)
    if media in INDEX_TYPES or "manifests" in doc:
        doc, media, data = client.manifest(_platform(doc, ref.name))
    if media not in images.MANIFEST_TYPES:
        raise KataError(f"{ref.name}: unsupported manifest media type {media!r}")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    progress = Progress()
    with images._locked():
        blobs = images.store_root() / "blobs/sha256"
        for desc in [doc["config"], *doc.get("layers", [])]:
            client.blob(desc, blobs / images._digest(desc.get("digest"))[7:], progress)
        images._put_blob(data, digest)
        config = json.loads(images._blob(doc["config"]["digest"]).read_bytes())
        return images._save(ref, digest, doc, config)


# -- credentials -------------------------------------------------------------------


def _auth_file() -> Path:
    return images.store_root().parent / "auth.json"


def login(registry: str, user: str, password: str) -> None:
    path = _auth_file()
    data = json.loads(path.read_text()) if path.exists() else {}
    data[registry] = base64.b64encode(f"{user}:{password}".encode()).decode()
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.rename(path.with_suffix(".tmp"), path)


def load_credentials(registry: str) -> tuple[str, str] | None:
    """Ours (microvm login), else the Docker config file's."""
    sources = [(_auth_file(), lambda d: d.get(registry)),
               (Path.home() / ".docker/config.json",
                lambda d: (d.get("auths", {}).get(registry) or {}).get("auth"))]
    for path, pick in sources:
        try:
            encoded = pick(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if encoded:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
            return user, password
    return None
