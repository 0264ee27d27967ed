"""microvm pull against a real registry: Debian's docker-registry on loopback.

Images are built here and pushed with skopeo; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.ociarchive import gzip_layer, layer_from_dir, oci_archive_from_layers
from tests.conftest import Microvm
from tests.integration.test_images import BUSYBOX, store_listing, tar_of

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="docker-registry and skopeo not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
        f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, (root / "log").read_text()
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def push(archive: Path, dest: str, *flags: str) -> None:
    subprocess.run(["skopeo", "copy", "-q", *flags, f"oci-archive:{archive}",
                    f"docker://{dest}", "--dest-tls-verify=false"], check=True, timeout=120)


@pytest.fixture
def cli(microvm: Microvm, registry: str) -> Iterator[Microvm]:
    yield microvm
    for line in microvm.run("images").stdout.splitlines()[1:]:
        if line.startswith(registry):
            microvm.run("rmi", line.split()[2])


BASE = layer_from_dir(BUSYBOX)
RELEASE = gzip_layer(tar_of({"etc/os-release": b'PRETTY_NAME="kata-py test"\n'}))


def test_pull_then_run(cli: Microvm, registry: str, tmp_path: Path) -> None:
    push(oci_archive_from_layers(tmp_path / "a.tar", "localhost/bb:1", [BASE, RELEASE],
                                 {"Cmd": ["sh"]}), f"{registry}/bb:1")
    r = cli.run("pull", f"{registry}/bb:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"pulled {registry}/bb:1 ")
    assert r.stderr == ""  # no progress display when not a terminal
    run = cli.run("run", "--rm", f"{registry}/bb:1", "cat", "/etc/os-release")
    assert run.stdout == 'PRETTY_NAME="kata-py test"\n', run.stderr


def test_run_pulls_when_missing_and_by_digest(cli: Microvm, registry: str,
                                              tmp_path: Path) -> None:
    push(oci_archive_from_layers(tmp_path / "b.tar", "localhost/bb:2", [BASE, RELEASE],
                                 {"Cmd": ["echo", "pulled-by-run"]}), f"{registry}/bb:2")
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                              f"docker://{registry}/bb:2"], capture_output=True, check=True)
    digest = "sha256:" + hashlib.sha256(inspect.stdout).hexdigest()
    run = cli.run("run", "--rm", f"{registry}/bb@{digest}")
    assert run.stdout == "pulled-by-run\n", run.stderr


def test_multi_arch_index_resolves_to_amd64(cli: Microvm, registry: str,
                                            tmp_path: Path) -> None:
    """An OCI index with arm64 and amd64: the amd64 image is the one that runs."""
    amd = oci_archive_from_layers(tmp_path / "amd.tar", "x/amd:1",
                                  [BASE], {"Cmd": ["echo", "amd64"]})
    arm_layer = gzip_layer(tar_of({"bin/note": b"arm64 image\n"}))
    arm = oci_archive_from_layers(tmp_path / "arm.tar", "x/arm:1", [arm_layer], {})
    layout = tmp_path / "layout"
    manifests = []
    for archive, arch in ((arm, "arm64"), (amd, "amd64")):
        with tarfile.open(archive) as t:
            t.extractall(layout)  # our own archives, made just above
            index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        desc = index["manifests"][0]
        desc.pop("annotations")
        desc["platform"] = {"os": "linux", "architecture": arch}
        manifests.append(desc)
    # The multi-arch image is an image index blob, named once in index.json.
    index_blob = json.dumps({"schemaVersion": 2,
                             "mediaType": "application/vnd.oci.image.index.v1+json",
                             "manifests": manifests}).encode()
    index_digest = hashlib.sha256(index_blob).hexdigest()
    (layout / "blobs/sha256" / index_digest).write_bytes(index_blob)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": f"sha256:{index_digest}", "size": len(index_blob),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    subprocess.run(["skopeo", "copy", "-q", "--all", f"oci:{layout}:multi",
                    f"docker://{registry}/multi:1", "--dest-tls-verify=false"],
                   check=True, timeout=120)
    run = cli.run("run", "--rm", f"{registry}/multi:1")
    assert run.stdout == "amd64\n", run.stderr


def test_missing_tag_is_one_line_and_leaves_the_store(cli: Microvm, registry: str) -> None:
    before = store_listing()
    r = cli.run("pull", f"{registry}/nothing:here")
    assert r.returncode == 125
    assert r.error_lines == [f"microvm: error: {registry}/nothing:here: not found in the registry"]
    assert store_listing() == before
    down = cli.run("pull", f"127.0.0.1:{free_port()}/x:1")
    assert down.returncode == 125 and "cannot reach the registry" in down.error_lines[-1]
