"""microvm pull against a real registry: Debian's docker-registry on loopback.

Images are built here and pushed with skopeo; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.localregistry import free_port, push
from microvm.images.ociarchive import gzip_layer, layer_from_dir, oci_archive_from_layers
from tests.conftest import Microvm
from tests.integration.registries import (
    PASSWORD,
    USER,
    SlowProxy,
    TokenService,
    htpasswd_auth,
    serve_registry,
    stored_blob,
)
from tests.integration.test_images import BUSYBOX, store_listing, tar_of

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="docker-registry and skopeo not installed")]


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def registry(registry_dir: Path) -> Iterator[str]:
    with serve_registry(registry_dir) as address:
        yield address


def image_ids(microvm: Microvm) -> set[str]:
    return {line.split()[2] for line in microvm.run("images").stdout.splitlines()[1:]}


@pytest.fixture
def cli(microvm: Microvm) -> Iterator[Microvm]:
    """The CLI; images the test pulled are removed after it."""
    before = image_ids(microvm)
    yield microvm
    for image_id in image_ids(microvm) - before:
        microvm.run("rmi", image_id)


BASE = layer_from_dir(BUSYBOX)
RELEASE = gzip_layer(tar_of({"etc/os-release": b'PRETTY_NAME="kata-py test"\n'}))


# Over busybox: /etc made opaque (the base's group and passwd hidden, a
# passwd of its own) and /bin/vi whited out.
OPAQUE = gzip_layer(tar_of({"etc/.wh..wh..opq": b"", "etc/passwd": b"root:x:0:0::/:/bin/sh\n",
                            "bin/.wh.vi": b""}))


def test_pull_then_run(cli: Microvm, registry: str, tmp_path: Path) -> None:
    push(oci_archive_from_layers(tmp_path / "a.tar", "localhost/bb:1", [BASE, OPAQUE, RELEASE],
                                 {"Cmd": ["sh"]}), f"{registry}/bb:1")
    r = cli.run("pull", f"{registry}/bb:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"pulled {registry}/bb:1 ")
    assert r.stderr == ""  # no progress display when not a terminal
    run = cli.run("run", "--rm", f"{registry}/bb:1", "cat", "/etc/os-release")
    assert run.stdout == 'PRETTY_NAME="kata-py test"\n', run.stderr
    # hostname and hosts are the CLI's own, as docker's are.
    run = cli.run("run", "--rm", f"{registry}/bb:1", "sh", "-c",
                  "ls /etc; test -e /bin/vi || echo no-vi")
    assert run.stdout.split() == ["hostname", "hosts", "os-release", "passwd", "no-vi"], \
        run.stderr


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


def unique_image(tmp_path: Path, name: str, size: int = 256 << 10,
                 cmd: tuple[str, ...] = ("sh",)) -> tuple[Path, str]:
    """An image over busybox with a layer of random bytes (shared with no
    other test); the archive and that layer's blob digest."""
    layer = gzip_layer(tar_of({"data/random": os.urandom(size)}))
    archive = oci_archive_from_layers(tmp_path / f"{name}.tar", f"localhost/{name}:1",
                                      [BASE, layer], {"Cmd": list(cmd)})
    return archive, "sha256:" + hashlib.sha256(layer[0]).hexdigest()


def no_leftovers() -> list[str]:
    """Partial downloads and temporary files in the store."""
    listing = store_listing()
    return [n for n in listing["blobs/sha256"] + listing["refs"] if n.startswith(".")
            or n.endswith(".tmp")]


def test_basic_auth_login_pull_logout(cli: Microvm, tmp_path: Path) -> None:
    """htpasswd (bcrypt) basic auth: no login, a wrong password, then a real one."""
    with serve_registry(tmp_path / "reg", htpasswd_auth(tmp_path / "reg")) as reg:
        archive, _ = unique_image(tmp_path, "basic", cmd=("echo", "basic-ok"))
        push(archive, f"{reg}/private/bb:1", f"--dest-creds={USER}:{PASSWORD}")
        before = store_listing()
        anon = cli.run("pull", f"{reg}/private/bb:1")
        assert anon.returncode == 125
        assert anon.error_lines == [
            f"microvm: error: {reg}: needs a login (microvm login)"]
        wrong = cli.run("login", "-u", USER, "--password-stdin", reg, input="nope\n")
        assert wrong.returncode == 125
        assert wrong.error_lines == [f"microvm: error: {reg}: unauthorized (wrong credentials)"]
        assert store_listing() == before
        try:
            ok = cli.run("login", "-u", USER, "--password-stdin", reg, input=PASSWORD + "\n")
            assert ok.returncode == 0 and ok.stdout == "Login Succeeded\n", ok.stderr
            auth = Path("/var/lib/kata-py/auth.json")
            assert auth.stat().st_mode & 0o777 == 0o600
            assert PASSWORD not in auth.read_text()  # base64, as docker's config.json
            run = cli.run("run", "--rm", f"{reg}/private/bb:1")
            assert run.stdout == "basic-ok\n", run.stderr
        finally:
            out = cli.run("logout", reg)
        assert out.stdout == f"Removing login credentials for {reg}\n"
        assert reg not in Path("/var/lib/kata-py/auth.json").read_text()


def test_token_auth_flow(cli: Microvm, tmp_path: Path) -> None:
    """The registry sends us to a token service; its signed token lets us pull."""
    with TokenService(tmp_path / "tokens") as tokens, \
            serve_registry(tmp_path / "reg", tokens.auth()) as reg:
        archive, _ = unique_image(tmp_path, "tok")
        push(archive, f"{reg}/team/bb:1", f"--dest-creds={USER}:{PASSWORD}")
        tokens.requests.clear()
        r = cli.run("pull", f"{reg}/team/bb:1")
        assert r.returncode == 0, r.stderr
        assert tokens.requests and all(
            q == {"service": TokenService.SERVICE, "scope": "repository:team/bb:pull",
                  "result": "granted", "account": ""} for q in tokens.requests)
        # A wrong password: the token service refuses, so the login does.
        no_push = cli.run("login", "-u", USER, "--password-stdin", reg, input="wrong\n")
        assert no_push.returncode == 125
        assert no_push.error_lines == [
            f"microvm: error: {reg}: token request failed: unauthorized"]
        assert tokens.requests[-1]["result"] == "refused"


def test_corrupt_and_truncated_blobs_leave_the_store_unchanged(
        cli: Microvm, registry: str, registry_dir: Path, tmp_path: Path) -> None:
    """The registry's own storage is damaged: what it serves no longer
    matches the manifest.  Each pull fails in one line; nothing is kept."""
    cases = {"corrupt": "blob digest mismatch", "truncated": "is truncated",
             "hostile": "path escapes the layer"}
    for name, message in cases.items():
        if name == "hostile":  # served faithfully: the layer itself climbs out
            evil = gzip_layer(tar_of({"../../../tmp/kata-py-escaped": b"x"}))
            push(oci_archive_from_layers(tmp_path / "evil.tar", "x/evil:1", [BASE, evil], {}),
                 f"{registry}/{name}:1")
        else:
            archive, layer = unique_image(tmp_path, name)
            push(archive, f"{registry}/{name}:1")
            data = stored_blob(registry_dir, layer)
            content = data.read_bytes()
            if name == "corrupt":
                data.write_bytes(bytes([content[0] ^ 0xFF]) + content[1:])
            else:
                data.write_bytes(content[:len(content) // 2])
        before = store_listing()
        r = cli.run("pull", f"{registry}/{name}:1")
        assert r.returncode == 125
        assert len(r.error_lines) == 1 and message in r.error_lines[0], r.stderr
        assert store_listing() == before
    assert not Path("/tmp/kata-py-escaped").exists()


def test_unknown_layer_media_type_is_refused_before_download(
        cli: Microvm, registry: str, tmp_path: Path) -> None:
    archive, layer = unique_image(tmp_path, "media")
    push(archive, f"{registry}/media:1")
    accept = "application/vnd.oci.image.manifest.v1+json"
    req = urllib.request.Request(f"http://{registry}/v2/media/manifests/1",
                                 headers={"Accept": accept})
    with urllib.request.urlopen(req) as resp:
        manifest = json.loads(resp.read())
    manifest["layers"][-1]["mediaType"] = "application/vnd.example.not-a-layer"
    put = urllib.request.Request(f"http://{registry}/v2/media/manifests/odd",
                                 data=json.dumps(manifest).encode(), method="PUT",
                                 headers={"Content-Type": accept})
    urllib.request.urlopen(put).close()
    before = store_listing()
    r = cli.run("pull", f"{registry}/media:odd")
    assert r.returncode == 125
    assert r.error_lines == ["microvm: error: unsupported layer media type "
                             "'application/vnd.example.not-a-layer'"]
    assert store_listing() == before


def test_concurrent_pulls_of_one_image(cli: Microvm, registry: str, tmp_path: Path) -> None:
    archive, layer = unique_image(tmp_path, "twice", size=4 << 20)
    push(archive, f"{registry}/twice:1")
    procs = [cli.popen("pull", f"{registry}/twice:1", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert len({out for _, out, _ in results}) == 1  # the same image ID for all
    assert layer[7:] in store_listing()["blobs/sha256"]
    assert no_leftovers() == []
    run = cli.run("run", "--rm", f"{registry}/twice:1", "wc", "-c", "/data/random")
    assert run.stdout.split()[0] == str(4 << 20), run.stderr


def test_killed_pull_resumes(cli: Microvm, registry: str, tmp_path: Path) -> None:
    """SIGKILL in the middle of a blob, over a slow link: the next pull asks
    only for the rest (Range), and the image is whole."""
    size = 3 << 20
    archive, layer = unique_image(tmp_path, "resume", size=size)
    push(archive, f"{registry}/resume:1")
    partial = Path("/var/lib/kata-py/images/blobs/sha256") / f".partial-{layer[7:]}"
    with SlowProxy(registry, rate=2 << 20) as proxy:
        ref = f"{proxy.address}/resume:1"
        p = cli.popen("pull", ref, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > size // 3):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kept = partial.stat().st_size
        assert cli.run("images").stdout.count(proxy.address) == 0
        proxy.sent = 0
        r = cli.run("pull", ref)
        assert r.returncode == 0, r.stderr
        assert proxy.ranges == [f"Range: bytes={kept}-".encode()]
        assert proxy.sent < size + (1 << 20) - kept  # the rest, plus small documents
    assert no_leftovers() == []
    run = cli.run("run", "--rm", f"{proxy.address}/resume:1", "wc", "-c", "/data/random")
    assert run.stdout.split()[0] == str(size), run.stderr


def test_progress_per_layer_on_a_terminal(cli: Microvm, registry: str, tmp_path: Path) -> None:
    archive, layer = unique_image(tmp_path, "kp-progress", size=4 << 20)
    push(archive, f"{registry}/kp-progress:1")
    master, slave = os.openpty()
    try:
        p = subprocess.Popen(cli.argv("pull", f"{registry}/kp-progress:1"), stdin=slave,
                             stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every holder of the terminal's slave end is gone
            break
        if not data:
            break
        out += data
    os.close(master)
    assert p.wait() == 0
    screen = out.decode()
    # One line per blob, rewritten in place (\r) and ended when complete.
    final = [line.rsplit("\r", 1)[-1].removesuffix("\x1b[K")
             for line in screen.split("\r\n") if line]
    assert len(final) == 3, screen  # config, busybox, the random layer
    with tarfile.open(archive) as t:
        size = t.getmember(f"blobs/sha256/{layer[7:]}").size
    total = f"{size / 1e6:.1f}MB"
    mine = next(line for line in final if line.startswith(layer[7:19]))
    got, rate = mine.split()[1:]
    assert got == f"{total}/{total}" and rate.endswith("MB/s"), screen
    # The base layer is the built-in busybox's, stored already.
    assert sum(line.endswith(": already exists") for line in final) == 1, screen
