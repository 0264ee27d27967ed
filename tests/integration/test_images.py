"""Images in the CLI: import (OCI layout, docker save), run with the image config, rmi.

The images are built here from busybox-static: no registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.images.ociarchive import (
    docker_archive,
    gzip_layer,
    layer_from_dir,
    oci_archive_from_layers,
)
from tests.conftest import Microvm

pytestmark = pytest.mark.vm
BUSYBOX = Path("/var/lib/kata-py/rootfs/busybox")
STORE = Path("/var/lib/kata-py/images")


def tar_of(entries: dict[str, bytes | None]) -> bytes:
    """A plain layer tar: name -> content (None: a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store_listing() -> dict[str, list[str]]:
    return {d: sorted(os.listdir(STORE / d)) if (STORE / d).exists() else []
            for d in ("blobs/sha256", "layers", "refs")}


@pytest.fixture
def cli(microvm: Microvm) -> Iterator[Microvm]:
    """The CLI; images a test imported are removed after it."""
    before = {line.split()[2] for line in microvm.run("images").stdout.splitlines()[1:]}
    yield microvm
    for line in microvm.run("images").stdout.splitlines()[1:]:
        if line.split()[2] not in before:
            microvm.run("rmi", line.split()[2])


BASE = layer_from_dir(BUSYBOX)
TOP = gzip_layer(tar_of({
    "etc/motd": b"from the top layer\n",
    "bin/.wh.vi": b"",                 # removes /bin/vi of the base
    "srv": None,
}))
CONFIG = {"Entrypoint": ["/bin/sh", "-c"],
          "Cmd": ["cat /etc/motd; test -e /bin/vi || echo no-vi; pwd; "
                  "echo $FOO; id -u"],
          "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FOO=from-image"],
          "WorkingDir": "/srv", "User": "65534"}


def test_import_oci_layout_and_run_with_its_config(cli: Microvm, tmp_path: Path) -> None:
    archive = oci_archive_from_layers(tmp_path / "img.tar", "localhost/kp-test:1",
                                      [BASE, TOP], CONFIG)
    r = cli.run("import", str(archive))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported localhost/kp-test:1 ")
    assert "localhost/kp-test" in cli.run("images").stdout

    run = cli.run("run", "--rm", "localhost/kp-test:1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["from the top layer", "no-vi", "/srv",
                                       "from-image", "65534"]
    # Arguments replace Cmd; -e, -w and -u replace the image's.
    run = cli.run("run", "--rm", "-e", "FOO=cli", "-w", "/tmp", "-u", "0",
                  "localhost/kp-test:1", "echo $FOO $(pwd) $(id -u)")
    assert run.stdout == "cli /tmp 0\n"
    run = cli.run("run", "--rm", "--entrypoint", "/bin/echo", "localhost/kp-test:1", "a", "b")
    assert run.stdout == "a b\n"


def test_docker_save_archive_and_rmi_reclaims_layers(cli: Microvm, tmp_path: Path) -> None:
    before = store_listing()
    plain_top = tar_of({"hello.txt": b"hi from docker save\n"})
    base_plain = io.BytesIO()
    with tarfile.open(fileobj=base_plain, mode="w") as t:
        t.add(BUSYBOX, arcname=".")
    archive = docker_archive(tmp_path / "saved.tar", "kp-saved:latest",
                             [base_plain.getvalue(), plain_top],
                             {"Cmd": ["cat", "/hello.txt"]})
    assert cli.run("import", str(archive)).returncode == 0
    # Short names mean docker.io/library/...
    run = cli.run("run", "--rm", "kp-saved")
    assert run.stdout == "hi from docker save\n", run.stderr
    inspect = json.loads(cli.run("image", "inspect", "docker.io/library/kp-saved").stdout)
    assert len(inspect["layers"]) == 2
    assert cli.run("rmi", "kp-saved").returncode == 0
    assert store_listing() == before
    gone = cli.run("run", "--rm", "--pull", "never", "kp-saved")
    assert gone.returncode == 125
    assert gone.error_lines[-1].startswith(
        "microvm: error: no such image: docker.io/library/kp-saved:latest")


def test_hostile_layer_is_refused_and_the_store_unchanged(cli: Microvm, tmp_path: Path) -> None:
    before = store_listing()
    evil = gzip_layer(tar_of({"../../../../tmp/kata-py-escaped": b"x"}))
    archive = oci_archive_from_layers(tmp_path / "evil.tar", "localhost/evil:1", [evil], {})
    r = cli.run("import", str(archive))
    assert r.returncode == 125
    assert "path escapes the layer" in r.error_lines[-1]
    assert len(r.error_lines) == 1
    assert not Path("/tmp/kata-py-escaped").exists()
    # A refused import takes back what it added: its blobs too.
    assert store_listing() == before


def test_tampered_blob_is_refused(cli: Microvm, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    archive = oci_archive_from_layers(tmp_path / "ok.tar", "localhost/tamper:1", [TOP], {})
    with tarfile.open(archive) as t:
        t.extractall(layout)  # our own archive, made just above
    blob = next(p for p in (layout / "blobs/sha256").iterdir()
                if p.stat().st_size == len(TOP[0]))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = cli.run("import", str(layout))
    assert r.returncode == 125
    assert "digest mismatch" in r.error_lines[-1]
    assert cli.run("image", "inspect", "localhost/tamper:1").returncode == 125


def test_bad_archives(cli: Microvm, tmp_path: Path) -> None:
    missing = cli.run("import", str(tmp_path / "nope.tar"))
    assert missing.returncode == 125 and "no such file" in missing.error_lines[-1]
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    r = cli.run("import", str(junk))
    assert r.returncode == 125 and "not an image archive" in r.error_lines[-1]
    bad_ref = cli.run("run", "--rm", "UPPER/Case")
    assert bad_ref.returncode == 125 and "invalid reference format" in bad_ref.error_lines[-1]


def test_system_df_and_prune(cli: Microvm, tmp_path: Path) -> None:
    archive = oci_archive_from_layers(tmp_path / "p.tar", "localhost/kp-prune:1", [BASE, TOP],
                                      {"Cmd": ["sleep", "1000"]})
    assert cli.run("import", str(archive)).returncode == 0
    assert cli.run("run", "-d", "--name", "kp-live", "localhost/kp-prune:1").returncode == 0
    assert cli.run("run", "-d", "--name", "kp-done", "localhost/kp-prune:1", "true"
                   ).returncode == 0
    try:
        df = {line.split()[0]: line.split()[1:] for line in
              cli.run("system", "df").stdout.splitlines()[1:]}
        assert int(df["Containers"][0]) >= 2 and int(df["Images"][1]) >= 1
        # What an interrupted pull or import leaves.
        (STORE / "tmp/half-unpacked").mkdir(parents=True, exist_ok=True)
        (STORE / "blobs/sha256/.pull-interrupted").write_bytes(b"partial")
        time.sleep(2)
        r = cli.run("system", "prune")
        assert r.returncode == 0, r.stderr
        assert "deleted container kp-done" in r.stdout
        assert "kp-live" not in r.stdout
        assert not (STORE / "tmp/half-unpacked").exists()
        assert not (STORE / "blobs/sha256/.pull-interrupted").exists()
        assert cli.run("exec", "kp-live", "true").returncode == 0
        assert cli.run("image", "inspect", "localhost/kp-prune:1").returncode == 0
        others = [line for line in cli.run("images").stdout.splitlines()[1:]
                  if "kp-prune" not in line]
        if not others:  # never prune -a a store with someone else's images
            r = cli.run("system", "prune", "-a")
            assert "localhost/kp-prune:1" not in r.stdout  # in use by kp-live
            assert cli.run("rm", "-f", "kp-live").returncode == 0
            r = cli.run("system", "prune", "-a")
            assert "deleted image localhost/kp-prune:1" in r.stdout
            assert store_listing()["layers"] == []
    finally:
        cli.run("rm", "-f", "kp-live")
        cli.run("rm", "-f", "kp-done")


def test_save_then_import_round_trip(cli: Microvm, tmp_path: Path) -> None:
    """`save` writes one tar that skopeo reads both as an OCI archive and as a
    docker archive; importing it back gives the same image IDs."""
    archive = oci_archive_from_layers(tmp_path / "src.tar", "localhost/kp-save:1", [BASE, TOP],
                                      CONFIG)
    assert cli.run("import", str(archive)).returncode == 0
    ids = {ref: json.loads(cli.run("image", "inspect", ref).stdout)["id"]
           for ref in ("localhost/kp-save:1", "busybox")}
    out = tmp_path / "saved.tar"
    r = cli.run("save", "-o", str(out), "localhost/kp-save:1", "busybox")
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as t:
        names = set(t.getnames())
        tags = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert {"oci-layout", "index.json", "manifest.json"} <= names
    assert sorted(tag for e in tags for tag in e["RepoTags"]) == [
        "busybox:latest", "localhost/kp-save:1"]
    for src in (f"oci-archive:{out}:1", f"docker-archive:{out}:localhost/kp-save:1"):
        p = subprocess.run(["skopeo", "inspect", "--config", src], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["config"]["WorkingDir"] == "/srv", src

    # The same bytes on standard output.
    with open(tmp_path / "piped.tar", "wb") as f:
        assert subprocess.run(cli.argv("save", "localhost/kp-save:1"), stdout=f).returncode == 0
    with tarfile.open(tmp_path / "piped.tar") as t:
        assert "index.json" in t.getnames()

    assert cli.run("rmi", "localhost/kp-save:1").returncode == 0
    r = cli.run("import", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(cli.run("image", "inspect", "localhost/kp-save:1").stdout)["id"] == \
        ids["localhost/kp-save:1"]
    run = cli.run("run", "--rm", "localhost/kp-save:1")
    assert run.stdout.splitlines()[0] == "from the top layer", run.stderr


def test_save_bad_input_writes_nothing(cli: Microvm, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = cli.run("save", "-o", str(outdir / "x.tar"), "busybox", "localhost/no-such:1")
    assert r.returncode == 125
    assert r.error_lines == ["microvm: error: no such image: localhost/no-such:1"]
    assert os.listdir(outdir) == []
    r = cli.run("save", "-o", str(outdir / "no-dir" / "x.tar"), "busybox")
    assert r.returncode == 125 and len(r.error_lines) == 1, r.stderr
    assert "No such file or directory" in r.error_lines[0]
    # Not onto a terminal, as docker refuses.
    master, slave = os.openpty()
    try:
        p = subprocess.run(cli.argv("save", "busybox"), stdout=slave, stderr=subprocess.PIPE,
                           text=True)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 125 and "terminal" in p.stderr
