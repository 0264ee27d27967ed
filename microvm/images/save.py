"""`microvm save`: stored images as one tar that is both an OCI image layout
and a `docker save` archive, as docker 25 and later write it.

The blobs go out exactly as stored (manifest digests, and so image IDs, survive
a save and import); index.json names each image for OCI readers and
manifest.json for docker-archive ones.  Layers stay compressed: `docker load`
and `microvm import` both take them so.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from microvm import linux
from microvm.errors import KataError
from microvm.images import store

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def familiar_name(ref: store.Reference) -> str:
    """docker's short form: busybox:latest, 127.0.0.1:5000/bb:1."""
    repo = ref.repository
    if ref.registry == store.DEFAULT_REGISTRY:
        repo = repo.removeprefix("library/")
    else:
        repo = f"{ref.registry}/{repo}"
    return f"{repo}@{ref.digest}" if ref.digest else f"{repo}:{ref.tag}"


def _lost(digest: str) -> KataError:
    return KataError(f"the store has lost blob {digest}; pull the image again")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, digest: str, written: set[str],
              data: bytes | None = None) -> str:
    """The stored blob, once per archive; data: its bytes, if read already."""
    name = "blobs/sha256/" + store.checked_digest(digest)[7:]
    if name in written:
        return name
    if data is not None:
        _add_bytes(tar, name, data)
    else:
        info = tarfile.TarInfo(name)
        info.mode = 0o644
        try:
            with open(store.blob_path(digest), "rb") as f:
                info.size = os.fstat(f.fileno()).st_size
                tar.addfile(info, f)
        except FileNotFoundError:
            raise _lost(digest) from None
    written.add(name)
    return name


def write(refs: list[str], out: IO[bytes]) -> list[store.Image]:
    """Write the images named by refs (references or IDs) to out as a tar."""
    with store.locked():
        chosen: list[store.Image] = []
        for wanted in refs:
            found = store.find(wanted)
            if not found:
                raise KataError(f"no such image: {wanted}")
            chosen += [i for i in found if i.ref not in {c.ref for c in chosen}]
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            written: set[str] = set()
            index: list[dict[str, Any]] = []
            docker: dict[str, dict[str, Any]] = {}
            for img in chosen:
                try:
                    manifest_bytes = store.blob_path(img.manifest).read_bytes()
                except FileNotFoundError:
                    raise _lost(img.manifest) from None
                manifest_path = _add_blob(tar, img.manifest, written, manifest_bytes)
                manifest = json.loads(manifest_bytes)
                config = _add_blob(tar, img.config_digest, written)
                layers = [_add_blob(tar, d["digest"], written) for d in manifest["layers"]]
                ref = store.parse_reference(img.ref)
                annotations = {"io.containerd.image.name": img.ref}
                if not ref.digest:
                    annotations["org.opencontainers.image.ref.name"] = ref.tag
                index.append({"mediaType": manifest.get("mediaType", _OCI_MANIFEST),
                              "digest": img.manifest, "size": len(manifest_bytes),
                              "annotations": annotations})
                entry = docker.setdefault(manifest_path, {
                    "Config": config, "RepoTags": [], "Layers": layers})
                if not ref.digest:
                    entry["RepoTags"].append(familiar_name(ref))
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            _add_bytes(tar, "index.json", json.dumps(
                {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": index}).encode())
            _add_bytes(tar, "manifest.json", json.dumps(list(docker.values())).encode())
    return chosen


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears at path whole, or not at all.

    An unnamed O_TMPFILE is written and linked in at the end, so even a
    SIGKILLed save leaves nothing; filesystems without it get a named
    temporary that only an interrupted save can leave.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        anonymous = True
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        anonymous = False
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            if anonymous:
                linux.link_fd(fd, str(tmp))
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(refs: list[str], output: Path | None, stdout: IO[bytes],
         stdout_is_tty: bool) -> list[store.Image]:
    if output is None:
        if stdout_is_tty:
            raise KataError("refusing to write an image archive to a terminal; "
                            "use -o FILE or redirect")
        return write(refs, stdout)
    if output.is_dir():
        raise KataError(f"{output}: is a directory")
    try:
        with _replacing(output) as f:
            return write(refs, f)
    except OSError as e:
        raise KataError(f"{output}: {e.strerror}") from None
