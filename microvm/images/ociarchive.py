"""An OCI image layout archive made from a directory tree (tests, benchmarks).

oci_archive() writes an OCI image layout as a tar, which `ctr image import`
reads; the image name travels in the index's ref-name annotation.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path


def _blob(tar: tarfile.TarFile, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def gzip_layer(plain: bytes) -> tuple[bytes, str]:
    """A plain tar as a gzip layer blob, with its diff id."""
    return gzip.compress(plain, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


def docker_archive(out: Path, name: str, plain_layers: list[bytes],
                   image_config: dict[str, object]) -> Path:
    """What `docker save` writes: manifest.json, a config, plain layer tars."""
    diff_ids = ["sha256:" + hashlib.sha256(p).hexdigest() for p in plain_layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": image_config,
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    files = {"config.json": config}
    for i, data in enumerate(plain_layers):
        files[f"layer{i}/layer.tar"] = data
    files["manifest.json"] = json.dumps([{
        "Config": "config.json", "RepoTags": [name],
        "Layers": [f"layer{i}/layer.tar" for i in range(len(plain_layers))]}]).encode()
    with tarfile.open(out, "w") as tar:
        for fname, data in files.items():
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def layer_from_dir(root: Path) -> tuple[bytes, str]:
    """A gzip layer of root's tree; and the diff id (digest of the plain tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path in sorted(root.rglob("*")):
            t.add(path, arcname=str(path.relative_to(root)), recursive=False)
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


def oci_archive(rootfs: Path, out: Path, name: str, cmd: list[str]) -> Path:
    layer, diff_id = layer_from_dir(rootfs)
    return oci_archive_from_layers(out, name, [(layer, diff_id)], {"Cmd": cmd})


def oci_archive_from_layers(out: Path, name: str, layers: list[tuple[bytes, str]],
                            image_config: Mapping[str, object]) -> Path:
    """layers: (gzip blob, diff id) pairs, bottom first; image_config: its "config"."""
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], **image_config},
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
    }
    with tarfile.open(out, "w") as tar:
        layer_descs = [_blob(tar, data, "application/vnd.oci.image.layer.v1.tar+gzip")
                       for data, _ in layers]
        config_desc = _blob(tar, json.dumps(config).encode(),
                            "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": layer_descs}
        manifest_desc = _blob(tar, json.dumps(manifest).encode(),
                              "application/vnd.oci.image.manifest.v1+json")
        manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": name}
        index = {"schemaVersion": 2, "manifests": [manifest_desc]}
        for fname, data in (("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                            ("index.json", json.dumps(index).encode())):
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def main() -> None:
    """python -m microvm.images.ociarchive OUT.tar [NAME]: the built-in busybox as an image."""
    import sys

    from microvm.images import rootfs
    out = Path(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "docker.io/library/busybox:latest"
    oci_archive(rootfs.builtin("busybox"), out, name, ["sh"])


if __name__ == "__main__":
    main()
