"""Pure parts of the registry client: manifest checks, redirects, challenges."""

from __future__ import annotations

import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from microvm.errors import KataError
from microvm.images import registry, store

D = "sha256:" + "a" * 64
GOOD = {"schemaVersion": 2, "config": {"digest": D},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D},
                   {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": D},
                   {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": D}]}


def test_a_good_manifest_passes() -> None:
    store.check_manifest(GOOD)


@pytest.mark.parametrize("doc, message", [
    ([], "malformed image manifest"),
    ({"layers": []}, "malformed image manifest"),
    ({"config": {"digest": D}, "layers": "x"}, "malformed image manifest"),
    ({"config": {"digest": D}, "layers": [1]}, "malformed image manifest"),
    ({"config": {"digest": "sha256:../../etc"}, "layers": []}, "invalid digest"),
    ({"config": {"digest": D}, "layers": [{"digest": D, "mediaType":
      "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}]},
     "unsupported layer media type"),
    ({"config": {"digest": D}, "layers": [{"digest": D}]}, "unsupported layer media type None"),
])
def test_bad_manifests_are_one_clear_error(doc: object, message: str) -> None:
    with pytest.raises(KataError, match=message):
        store.check_manifest(doc)


def _redirect(src: str, dst: str) -> urllib.request.Request | None:
    req = urllib.request.Request(src, headers={"Authorization": "Bearer t", "Accept": "x"})
    return registry._Redirect().redirect_request(req, None, 307, "", Message(), dst)


def test_credentials_stay_with_the_registry_on_redirect() -> None:
    away = _redirect("https://reg.example/v2/a/blobs/x", "https://cdn.example/blob?sig=1")
    assert away is not None and not away.has_header("Authorization")
    same = _redirect("https://reg.example/v2/a/blobs/x", "https://reg.example/other")
    assert same is not None and same.get_header("Authorization") == "Bearer t"


def test_challenge_parsing() -> None:
    scheme, params = registry._challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg",
                      "scope": "repository:a/b:pull"}


@pytest.mark.parametrize("name", ["", "a/b", "a b"])
def test_bad_registry_names(name: str) -> None:
    with pytest.raises(KataError, match="invalid registry name"):
        registry._registry_name(name)


def test_credentials_ours_first_and_a_corrupt_entry_is_one_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import json

    from microvm import paths
    monkeypatch.setattr(paths, "LIB", tmp_path / "lib")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home/.docker").mkdir(parents=True)
    (tmp_path / "home/.docker/config.json").write_text(json.dumps({"auths": {
        "reg.example": {"auth": base64.b64encode(b"docker:pw").decode()}}}))
    assert registry.load_credentials("reg.example") == ("docker", "pw")
    assert registry.load_credentials("other.example") is None
    (tmp_path / "lib").mkdir()
    registry._write_auth({"reg.example": base64.b64encode(b"ours:pw2").decode(),
                          "bad.example": "%%%not-base64"})
    assert registry.load_credentials("reg.example") == ("ours", "pw2")
    with pytest.raises(KataError, match="stored credentials are unreadable"):
        registry.load_credentials("bad.example")
