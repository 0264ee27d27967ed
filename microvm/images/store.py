"""Images for the CLI: references, a content store, archive import.

Store (under /var/lib/kata-py/images):
  blobs/sha256/<hex>      content-addressed; verified before it is renamed in
  layers/<diff hex>/      each layer unpacked once, shared by every image
  refs/<escaped ref>.json {"ref", "manifest", "config", "layers": [diff ids]}

Every write goes to a temporary name in the same directory and is renamed
into place only when complete and verified, so an interrupted import leaves
nothing a later run would trust; a failed one takes back what it added.  A
lock file serialises writers.  The store is root's alone (paths.private):
layers keep their setuid files and device nodes for the guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from microvm import paths
from microvm.errors import KataError
from microvm.images import unpack

DEFAULT_REGISTRY = "docker.io"
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
# Layers we can unpack (the compression itself is read from the blob's magic).
# Anything else, such as Windows foreign layers or an artifact's blobs, is
# refused before a byte is written.
LAYER_TYPES = {f"application/vnd.oci.image.layer.{kind}v1.{fmt}"
               for kind in ("", "nondistributable.")
               for fmt in ("tar", "tar+gzip", "tar+zstd")} | {
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip"}


def store_root() -> Path:
    return paths.private("images")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str = "latest"
    digest: str = ""

    @property
    def name(self) -> str:
        s = f"{self.registry}/{self.repository}"
        return f"{s}@{self.digest}" if self.digest else f"{s}:{self.tag}"


def parse_reference(ref: str) -> Reference:
    """docker's rules: `busybox` is docker.io/library/busybox:latest."""
    if not isinstance(ref, str) or not ref or ref != ref.strip() \
            or any(c.isspace() for c in ref):
        raise KataError(f"invalid reference format: {ref!r}")
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise KataError(f"invalid digest in reference: {digest!r}")
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DEFAULT_REGISTRY, ref
    tag = "latest"
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if not path or path != path.lower() or not all(c.isalnum() or c in "._-/" for c in path):
        raise KataError(f"invalid reference format: repository name must be lowercase: {ref!r}")
    return Reference(registry, path, tag, digest)


@dataclass
class Image:
    ref: str
    manifest: str
    config: dict[str, Any]
    layers: list[str]          # diff ids, bottom first
    size: int
    created: str
    config_digest: str         # the config blob's, as the manifest names it

    @property
    def id(self) -> str:
        return self.manifest.removeprefix("sha256:")[:12]

    def layer_dirs(self) -> list[Path]:
        return [store_root() / "layers" / d.removeprefix("sha256:") for d in self.layers]


@contextlib.contextmanager
def locked() -> Iterator[None]:
    root = store_root()
    for d in ("blobs/sha256", "layers", "refs", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ref_file(ref: str) -> Path:
    return store_root() / "refs" / (ref.replace("/", "%2F").replace(":", "%3A") + ".json")


def put_blob(data: bytes, digest: str) -> None:
    _put_blob_file(io.BytesIO(data), digest)


def _put_blob_file(f: IO[bytes], digest: str | None = None) -> tuple[str, int]:
    """Copy f into the blob store, hashing it on the way: its digest and size.
    digest: what it must be, or nothing is kept."""
    blobs = store_root() / "blobs/sha256"
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".new-")
    try:
        h = _Hashing(f)
        with open(fd, "wb") as out:
            shutil.copyfileobj(h, out, 1 << 20)
            size = out.tell()
        got = "sha256:" + h.h.hexdigest()
        if digest is not None and got != digest:
            raise KataError(f"blob digest mismatch: expected {digest}")
        if (blobs / got[7:]).exists():
            os.unlink(tmp)
        else:
            os.rename(tmp, blobs / got[7:])
        return got, size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def checked_digest(value: object) -> str:
    """A digest from an untrusted document: it becomes a file name."""
    if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise KataError(f"invalid digest {value!r}")
    return value


def blob_path(digest: str) -> Path:
    return store_root() / "blobs/sha256" / digest.removeprefix("sha256:")


class _Hashing(io.RawIOBase):
    """A read-through stream that hashes what passes (for diff ids)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[:len(data)] = data
        return len(data)


def _unpack_layer(blob: Path, diff_id: str) -> None:
    dest = store_root() / "layers" / diff_id.removeprefix("sha256:")
    if dest.exists():
        return  # unpacked once, shared by every image
    tmp = Path(tempfile.mkdtemp(dir=store_root() / "tmp"))
    try:
        with unpack.open_layer(blob) as f:
            h = _Hashing(f)
            unpack.unpack(io.BufferedReader(h, 1 << 20), tmp)  # type: ignore[arg-type]
            while h.read(1 << 20):  # tar padding after the end marker
                pass
        if f"sha256:{h.h.hexdigest()}" != diff_id:
            raise KataError(f"layer {blob.name[:12]} does not match its diff id {diff_id}")
        tmp.chmod(0o755)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_manifest(doc: object) -> None:
    """An image manifest from an untrusted source: its shape, and layers we can unpack."""
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) \
            or not isinstance(doc.get("layers", []), list) \
            or not all(isinstance(d, dict) for d in doc.get("layers", [])):
        raise KataError("malformed image manifest")
    checked_digest(doc["config"].get("digest"))
    for desc in doc.get("layers", []):
        checked_digest(desc.get("digest"))
        if desc.get("mediaType") not in LAYER_TYPES:
            raise KataError(f"unsupported layer media type {desc.get('mediaType')!r}")


def commit(ref: Reference, manifest_digest: str, manifest: dict[str, Any],
          config: dict[str, Any]) -> Image:
    img = _unpacked(ref, manifest_digest, manifest, config)
    _record(img)
    return img


def _unpacked(ref: Reference, manifest_digest: str, manifest: dict[str, Any],
              config: dict[str, Any]) -> Image:
    """The image, its layers unpacked (its blobs are stored); no ref is written yet."""
    check_manifest(manifest)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids", []) if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise KataError("malformed image config")
    layers = manifest.get("layers", [])
    if len(diff_ids) != len(layers):
        raise KataError("image config and manifest disagree on the number of layers")
    for desc, diff in zip(layers, diff_ids, strict=True):
        _unpack_layer(blob_path(checked_digest(desc.get("digest"))), checked_digest(diff))
    return Image(ref.name, manifest_digest, config, list(diff_ids),
                 sum(int(d.get("size", 0)) for d in layers),
                 str(config.get("created", "")), manifest["config"]["digest"])


def _record(img: Image) -> None:
    record = {"ref": img.ref, "manifest": img.manifest, "layers": img.layers,
              "size": img.size, "created": img.created, "config": img.config_digest}
    tmp = _ref_file(img.ref).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(_ref_file(img.ref))


def get(ref: str) -> Image | None:
    name = parse_reference(ref).name
    try:
        record = json.loads(_ref_file(name).read_text())
    except FileNotFoundError:
        return None
    config = json.loads(blob_path(record["config"]).read_bytes())
    return Image(record["ref"], record["manifest"], config, record["layers"], record["size"],
                 record["created"], record["config"])


def list_images() -> list[Image]:
    refs = store_root() / "refs"
    out = []
    for f in sorted(refs.glob("*.json")) if refs.exists() else []:
        img = get(json.loads(f.read_text())["ref"])
        if img is not None:
            out.append(img)
    return out


def find(ref: str) -> list[Image]:
    """By reference, or by image ID (a prefix of the manifest digest): every
    reference to that image then."""
    img = None
    with contextlib.suppress(KataError):
        img = get(ref)
    if img is not None:
        return [img]
    if re.fullmatch(r"(sha256:)?[0-9a-f]{4,64}", ref):
        hexd = ref.removeprefix("sha256:")
        return [i for i in list_images() if i.manifest[7:].startswith(hexd)]
    return []


def remove(ref: str) -> list[Image]:
    """What find(ref) finds, then the blobs and layers no image uses."""
    with locked():
        found = find(ref)
        if not found:
            raise KataError(f"no such image: {ref}")
        for i in found:
            _ref_file(i.ref).unlink()
        collect()
    return found


def prune(keep: set[str], images: bool) -> list[str]:
    """Interrupted writes, then (images) every image not in keep, then the
    blobs and layers nothing uses.  Returns the references removed."""
    removed = []
    with locked():
        # Under the lock no writer is active: these are interrupted writes.
        root = store_root()
        for leftover in [*(root / "tmp").iterdir(), *(root / "blobs/sha256").glob(".*"),
                         *(root / "refs").glob("*.tmp")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        for img in list_images() if images else []:
            if img.ref not in keep:
                _ref_file(img.ref).unlink()
                removed.append(img.ref)
        collect()
    return removed


def collect(only: set[str] | None = None) -> None:
    """Remove blobs and layers no image refers to any more (only: of these names)."""
    used_layers: set[str] = set()
    used_blobs: set[str] = set()
    for img in list_images():
        used_layers |= {d.removeprefix("sha256:") for d in img.layers}
        used_blobs |= {img.manifest.removeprefix("sha256:"),
                       img.config_digest.removeprefix("sha256:")}
        manifest = json.loads(blob_path(img.manifest).read_bytes())
        used_blobs |= {d["digest"].removeprefix("sha256:") for d in manifest["layers"]}
    for d in (store_root() / "layers").iterdir():
        if d.name not in used_layers and (only is None or d.name in only):
            shutil.rmtree(d, ignore_errors=True)
    for b in (store_root() / "blobs/sha256").iterdir():
        if b.name not in used_blobs and (only is None or b.name in only):
            b.unlink(missing_ok=True)


# -- import ---------------------------------------------------------------------


def import_archive(path: Path) -> list[Image]:
    """docker save archives and OCI image layouts (a directory or a tar).

    All or nothing: the refs are written once every image is in, and a
    failure takes back every blob and layer this import added.
    """
    if not path.exists():
        raise KataError(f"{path}: no such file or directory")
    # The lock covers the extraction too: prune takes what is in tmp/ for
    # an interrupted write.
    with locked(), _all_or_nothing(), _opened(path) as archive:
        if archive.has("index.json"):
            found = _import_oci(archive)
        elif archive.has("manifest.json"):
            found = _import_docker(archive)
        else:
            raise KataError(f"{path}: neither an OCI image layout nor a docker save archive")
        for img in found:
            _record(img)
        return found


@contextlib.contextmanager
def _all_or_nothing() -> Iterator[None]:
    """Under the lock: whatever a failed write added to the store goes again."""
    before = _contents()
    try:
        yield
    except BaseException:
        added = {d: names - before[d] for d, names in _contents().items()}
        for name in added["refs"]:
            (store_root() / "refs" / name).unlink(missing_ok=True)
        # Never hiding the reason: a store broken otherwise keeps the rest.
        with contextlib.suppress(OSError, KataError, ValueError, KeyError):
            collect(only=added["blobs/sha256"] | added["layers"])
        raise


def _contents() -> dict[str, set[str]]:
    return {d: set(os.listdir(store_root() / d)) for d in ("blobs/sha256", "layers", "refs")}


class _Archive:
    """An import's files, opened only inside its root (the directory given, or
    the tar unpacked into the store's tmp/): no symlink is followed out."""

    def __init__(self, root_fd: int, src: Path) -> None:
        self.fd, self.src = root_fd, src

    def _open(self, name: object) -> int:
        if not isinstance(name, str):
            raise KataError(f"{self.src}: hostile file name in image archive: {name!r}")
        try:
            return unpack.open_inside(self.fd, name)
        except KataError as e:  # out of the archive, or not a file
            raise KataError(f"{self.src}: {e}") from None
        except FileNotFoundError:
            raise
        except OSError as e:
            raise KataError(f"{self.src}: {name}: {e.strerror}") from None

    @contextlib.contextmanager
    def open(self, name: object, missing: str = "") -> Iterator[IO[bytes]]:
        try:
            fd = self._open(name)
        except FileNotFoundError:
            raise KataError(missing or f"{self.src}: {name}: no such file in the archive") \
                from None
        with open(fd, "rb") as f:
            yield f

    def has(self, name: str) -> bool:
        try:
            os.close(self._open(name))
        except FileNotFoundError:
            return False
        return True

    def read(self, name: object, missing: str = "") -> bytes:
        with self.open(name, missing) as f:
            return f.read()

    def json(self, name: str) -> Any:
        return _parse_json(self.read(name), f"{self.src}: {name}")

    def blob(self, digest: object) -> str:
        """An OCI layout's file name for a digest."""
        return "blobs/" + checked_digest(digest).replace(":", "/")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[_Archive]:
    """The directory given, or the tar extracted into the store's tmp/."""
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            root = path
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=_tmp_dir())))
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, fd)
        if root != path:
            _extract(path, fd)
        yield _Archive(fd, path)


def _extract(path: Path, root_fd: int) -> None:
    """A tar's files, directories and symlinks under root_fd.  Symlinks are
    kept as they are: reading resolves them inside the archive, or refuses."""
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() or m.isdir() or m.issym():
                    _extract_member(tar, m, root_fd, path)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        # tarfile lists every compression it tried, one per line.
        why = str(e).splitlines()[0].rstrip(":") if str(e) else type(e).__name__
        raise KataError(f"{path}: not an image archive ({why})") from None
    except OSError as e:
        raise KataError(f"{path}: cannot extract ({e.strerror or e})") from None


def _extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, root_fd: int,
                    path: Path) -> None:
    parts = [p for p in m.name.split("/") if p not in ("", ".")]
    if m.name.startswith("/") or ".." in parts:
        raise KataError(f"{path}: hostile path in archive: {m.name!r}")
    if not parts:
        return
    *parents, base = parts
    # Never through a symlink an earlier member made.
    dir_fd = unpack.open_dir(root_fd, parents, create=True)
    try:
        if m.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o700, dir_fd=dir_fd)
            return
        unpack.remove(dir_fd, base)  # a later member replaces an earlier one
        if m.issym():
            os.symlink(m.linkname, base, dir_fd=dir_fd)
            return
        src = tar.extractfile(m)
        assert src is not None
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        with open(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    finally:
        os.close(dir_fd)


def _tmp_dir() -> Path:
    d = store_root() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_json(path: Path, what: str) -> Any:
    try:
        return _parse_json(path.read_bytes(), what)
    except OSError as e:
        raise KataError(f"{what}: unreadable ({e.strerror})") from None


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise KataError(f"{what}: not JSON ({e})") from None


def _list_of_dicts(value: object, what: str) -> list[dict[str, Any]]:
    """A list of objects from an untrusted document."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise KataError(f"{what}: malformed")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list | None):
        raise KataError(f"{what}: not a list")
    return value or []


def _import_oci(archive: _Archive) -> list[Image]:
    src = archive.src
    index = archive.json("index.json")
    found = []
    manifests = index.get("manifests", []) if isinstance(index, dict) else None
    for desc in _list_of_dicts(manifests, f"{src}: index.json"):
        annotations = desc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise KataError(f"{src}: index.json: malformed annotations")
        name = annotations.get("io.containerd.image.name") or \
            annotations.get("org.opencontainers.image.ref.name")
        if not name:
            continue
        digest = checked_digest(desc.get("digest"))
        if desc.get("mediaType") not in MANIFEST_TYPES:
            raise KataError(f"{src}: unsupported manifest media type {desc.get('mediaType')!r}")

        def missing(d: str) -> str:
            return f"{src}: blob {d} is missing from the layout"

        manifest_bytes = archive.read(archive.blob(digest), missing(digest))
        put_blob(manifest_bytes, digest)
        manifest = _parse_json(manifest_bytes, f"{src}: manifest")
        check_manifest(manifest)
        config_digest = manifest["config"]["digest"]
        config_bytes = archive.read(archive.blob(config_digest), missing(config_digest))
        put_blob(config_bytes, config_digest)
        for layer in manifest["layers"]:
            # Opened even if stored already: a layout that is not ours to read is refused.
            with archive.open(archive.blob(layer["digest"]), missing(layer["digest"])) as f:
                if not blob_path(layer["digest"]).exists():
                    _put_blob_file(f, layer["digest"])
        found.append(_unpacked(parse_reference(name), digest, manifest,
                               _parse_json(config_bytes, f"{src}: image config")))
    if not found:
        raise KataError(f"{src}: the layout names no image (org.opencontainers.image.ref.name)")
    return found


def _import_docker(archive: _Archive) -> list[Image]:
    src = archive.src
    found = []
    for entry in _list_of_dicts(archive.json("manifest.json"), f"{src}: manifest.json"):
        config_bytes = archive.read(entry.get("Config"))
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        put_blob(config_bytes, config_digest)
        layers = []
        for name in _list(entry.get("Layers"), f"{src}: manifest.json: Layers"):
            with archive.open(name) as f:
                digest, size = _put_blob_file(f)
            layers.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar",
                           "digest": digest, "size": size})
        manifest = {"schemaVersion": 2,
                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                               "digest": config_digest, "size": len(config_bytes)},
                    "layers": layers}
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        put_blob(manifest_bytes, manifest_digest)
        config = _parse_json(config_bytes, f"{src}: image config")
        for tag in _list(entry.get("RepoTags"), f"{src}: manifest.json: RepoTags"):
            found.append(_unpacked(parse_reference(tag), manifest_digest, manifest, config))
    if not found:
        raise KataError(f"{src}: the archive has no tagged image")
    return found

def created_ago(created: str) -> str:
    if not created:
        return ""
    try:
        t = time.mktime(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return created
    days = (time.time() - t) / 86400
    return f"{int(days)} days ago" if days >= 1 else "less than a day ago"


def command_line(config: dict[str, Any], command: list[str],
                 entrypoint: str | None) -> list[str]:
    """docker's rules: --entrypoint replaces Entrypoint and drops Cmd;
    arguments replace Cmd."""
    if entrypoint is not None:
        return [entrypoint, *command] if entrypoint else command
    ep = list(config.get("Entrypoint") or [])
    return ep + (command or list(config.get("Cmd") or []))


BUILTIN_IMAGE = "docker.io/library/busybox:latest"


def ensure_builtin() -> Image:
    """docker.io/library/busybox:latest from Debian's busybox-static, offline.

    An ordinary stored image (scripts/setup imports it); made again here if
    it was removed, so `run busybox` never needs a registry.
    """
    img = get(BUILTIN_IMAGE)
    if img is not None:
        return img
    from microvm.images import rootfs
    from microvm.images.ociarchive import oci_archive
    # Not in the store's tmp/: prune may empty that before import locks it.
    with tempfile.TemporaryDirectory() as tmp:
        archive = oci_archive(rootfs.builtin("busybox"), Path(tmp) / "busybox.tar",
                              BUILTIN_IMAGE, ["sh"])
        return import_archive(archive)[0]
