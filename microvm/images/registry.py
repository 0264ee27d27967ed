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
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from microvm import paths
from microvm.errors import KataError
from microvm.images import store

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
ACCEPT = ", ".join([*INDEX_TYPES, *sorted(store.MANIFEST_TYPES)])
DOCKER_HUB = "registry-1.docker.io"
LOOPBACK = ("localhost", "127.", "[::1]")


def _host(registry: str) -> str:
    return DOCKER_HUB if registry == store.DEFAULT_REGISTRY else registry


def _scheme(registry: str, insecure: tuple[str, ...]) -> str:
    plain = registry.startswith(LOOPBACK) or registry in insecure
    return "http" if plain else "https"


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Registries send blobs to a CDN or object store by redirect: our
    credentials stay with the registry (S3 also refuses a second auth)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != \
                urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_Redirect)


class Client:
    def __init__(self, ref: store.Reference, insecure: tuple[str, ...] = (),
                 credentials: tuple[str, str] | None = None) -> None:
        self.ref = ref
        self.root = f"{_scheme(ref.registry, insecure)}://{_host(ref.registry)}/v2/"
        self.base = self.root + ref.repository
        self.credentials = credentials
        self.auth: str | None = None

    def _open(self, url: str, accept: str = "", headers: dict[str, str] | None = None) -> Any:
        for attempt in range(2):
            req = urllib.request.Request(url, headers=dict(headers or {}))
            if accept:
                req.add_header("Accept", accept)
            if self.auth:
                req.add_header("Authorization", self.auth)
            try:
                return _opener.open(req, timeout=60)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 401 and attempt == 0:
                    self._login(e.headers.get("WWW-Authenticate", ""))
                    continue
                what = self.ref.name if self.ref.repository else self.ref.registry
                if e.code in (401, 403):
                    hint = "wrong credentials" if self.credentials else "microvm login"
                    raise KataError(f"{what}: unauthorized ({hint})") from None
                if e.code == 404:
                    raise KataError(f"{what}: not found in the registry") from None
                raise KataError(f"{what}: registry answered {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                why = e.reason if isinstance(e, urllib.error.URLError) else e
                raise _Transport(f"{self.ref.registry}: cannot reach the registry "
                                 f"({why})") from None
        raise AssertionError("unreachable")

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
        if self.ref.repository:  # a login check asks for no scope, as docker's does
            query.setdefault("scope", f"repository:{self.ref.repository}:pull")
        if self.credentials:
            query["account"] = self.credentials[0]
        req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
        if basic:
            req.add_header("Authorization", basic)
        try:
            with _opener.open(req, timeout=30) as r:
                body = json.loads(r.read(1 << 20))
        except urllib.error.HTTPError as e:
            why = "unauthorized" if e.code in (401, 403) else f"{e.code} {e.reason}"
            raise KataError(f"{self.ref.registry}: token request failed: {why}") from None
        except (urllib.error.URLError, ValueError) as e:
            raise KataError(f"{self.ref.registry}: token request failed ({e})") from None
        if not isinstance(body, dict):
            raise KataError(f"{self.ref.registry}: the token service answered no JSON object")
        token = body.get("token") or body.get("access_token")
        if not token:
            raise KataError(f"{self.ref.registry}: the token service gave no token")
        self.auth = f"Bearer {token}"

    def ping(self) -> None:
        """GET /v2/, answering a challenge: how a login is checked."""
        self._open(self.root).close()

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
        """Fetch one blob into dest, verified.  A pull that was killed leaves
        `.partial-<hex>`: its bytes are hashed again and the rest is asked for
        with Range (a registry that ignores Range sends it all, and we start
        over).  Nothing is trusted before the digest matches."""
        digest, size = store.checked_digest(desc.get("digest")), int(desc.get("size", -1))
        if dest.exists():
            progress.exists(digest)
            return
        partial = dest.with_name(f".partial-{dest.name}")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b") as out:
            h, got = hashlib.sha256(), 0
            while chunk := out.read(1 << 20):
                h.update(chunk)
                got += len(chunk)
            try:
                if size < 0 or got < size:
                    h, got = self._fetch(digest, size, out, h, got, progress)
                if size >= 0 and got != size:
                    raise KataError(f"blob {digest[:19]} is truncated: {got} of {size} bytes")
                if "sha256:" + h.hexdigest() != digest:
                    raise KataError(f"blob digest mismatch: expected {digest}")
            except _Transport:
                raise  # the bytes so far are kept for the next pull to resume (as on ^C)
            except KataError:
                partial.unlink(missing_ok=True)  # the content is wrong: never resume it
                raise
        os.rename(partial, dest)

    def _fetch(self, digest: str, size: int, out: IO[bytes], h: Any, got: int,
               progress: Progress) -> tuple[Any, int]:
        headers = {"Range": f"bytes={got}-"} if got else {}
        progress.update(digest, got, size)
        with self._open(f"{self.base}/blobs/{digest}", headers=headers) as r:
            if got and r.status != 206:
                out.seek(0)
                out.truncate()
                h, got = hashlib.sha256(), 0
            while chunk := _read(r, digest):
                got += len(chunk)
                if size >= 0 and got > size:
                    raise KataError(f"blob {digest[:19]} is larger than its descriptor")
                h.update(chunk)
                out.write(chunk)
                progress.update(digest, got, size)
        return h, got


class _Transport(KataError):
    """The connection failed, not the content: a later pull may resume."""


def _read(r: Any, digest: str) -> bytes:
    try:
        return r.read(1 << 20)  # type: ignore[no-any-return]
    except (OSError, http.client.HTTPException) as e:
        # A connection cut short is IncompleteRead, or a reset or a timeout.
        raise _Transport(f"blob {digest[:19]}: download failed ({type(e).__name__})") \
            from None


class Progress:
    """Per-layer bytes, total and rate on a terminal; nothing otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started: dict[str, tuple[float, int]] = {}
        self.last = 0.0

    def update(self, digest: str, got: int, size: int) -> None:
        """First called before the request: the rate counts only this pull's bytes."""
        now = time.monotonic()
        start, resumed_at = self.started.setdefault(digest, (now, got))
        if got < resumed_at:  # the registry ignored Range: counted from zero again
            start, resumed_at = self.started[digest] = (now, 0)
        if not self.tty or (now - self.last < 0.1 and got != size and now != start):
            return
        self.last = now
        rate = (got - resumed_at) / max(now - start, 1e-3)
        total = _human(size) if size >= 0 else "?"
        self._line(digest, f"{_human(got)}/{total}  {_human(rate)}/s", done=got == size)

    def exists(self, digest: str) -> None:
        if self.tty:
            self._line(digest, "already exists", done=True)

    def _line(self, digest: str, text: str, done: bool) -> None:
        # \x1b[K clears what a longer earlier text left on the line.
        sys.stderr.write(f"\r{digest[7:19]}: {text}\x1b[K" + ("\n" if done else ""))
        sys.stderr.flush()


def _human(n: float) -> str:
    """docker's sizes: 812B, 4.2kB, 106.0MB (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if n < 1000 or unit == "MB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _platform(index: dict[str, Any], name: str) -> str:
    for m in index.get("manifests", []):
        p = m.get("platform") or {}
        if p.get("os") == "linux" and p.get("architecture") == "amd64":
            return store.checked_digest(m.get("digest"))
    raise KataError(f"{name}: no linux/amd64 image in the index")


def pull(ref_text: str, insecure: tuple[str, ...] = (),
         credentials: tuple[str, str] | None = None) -> store.Image:
    ref = store.parse_reference(ref_text)
    client = Client(ref, insecure, credentials or load_credentials(ref.registry))
    doc, media, data = client.manifest(ref.digest or ref.tag)
    if media in INDEX_TYPES or "manifests" in doc:
        doc, media, data = client.manifest(_platform(doc, ref.name))
    if media not in store.MANIFEST_TYPES:
        raise KataError(f"{ref.name}: unsupported manifest media type {media!r}")
    store.check_manifest(doc)  # before a byte is fetched
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    progress = Progress()
    with store.locked():
        blobs = store.store_root() / "blobs/sha256"
        try:
            for desc in [doc["config"], *doc.get("layers", [])]:
                client.blob(desc, blobs / store.checked_digest(desc.get("digest"))[7:], progress)
            store.put_blob(data, digest)
            config = store.read_json(store.blob_path(doc["config"]["digest"]), "image config")
            return store.commit(ref, digest, doc, config)
        except _Transport:
            raise  # what came whole stays, for the next pull to go on from
        except KataError:
            store.collect()  # bad content: the store is as it was before
            raise


# -- credentials -------------------------------------------------------------------


def _auth_file() -> Path:
    return paths.LIB / "auth.json"


def _registry_name(registry: str) -> str:
    """docker's spelling of the default registry is accepted for docker.io."""
    if registry in ("index.docker.io", DOCKER_HUB, "https://index.docker.io/v1/"):
        return store.DEFAULT_REGISTRY
    if not registry or "/" in registry or any(c.isspace() for c in registry):
        raise KataError(f"invalid registry name: {registry!r}")
    return registry


def _write_auth(data: dict[str, str]) -> None:
    path = _auth_file()
    paths.lib()  # made 0711, not world-readable, if this is its first use
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def _read_auth() -> dict[str, str]:
    try:
        data = json.loads(_auth_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def login(registry: str, user: str, password: str, insecure: tuple[str, ...] = ()) -> None:
    """Checked against the registry first, as docker does: a wrong password
    is refused, not stored."""
    registry = _registry_name(registry)
    Client(store.Reference(registry, ""), insecure, (user, password)).ping()
    data = _read_auth()
    data[registry] = base64.b64encode(f"{user}:{password}".encode()).decode()
    _write_auth(data)


def logout(registry: str) -> bool:
    registry = _registry_name(registry)
    data = _read_auth()
    if data.pop(registry, None) is None:
        return False
    _write_auth(data)
    return True


def load_credentials(registry: str) -> tuple[str, str] | None:
    """Ours (microvm login), else the Docker config file's."""
    encoded = _read_auth().get(registry)
    if not encoded:
        try:
            docker = json.loads((Path.home() / ".docker/config.json").read_text())
            encoded = (docker.get("auths", {}).get(registry) or {}).get("auth")
        except (OSError, ValueError, AttributeError):
            return None
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise KataError(f"{registry}: the stored credentials are unreadable "
                        "(microvm login again)") from None
    return user, password
