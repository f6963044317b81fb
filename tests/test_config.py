"""Tests of config.py: image references, the YAML config and credentials from auth files."""

from __future__ import annotations

import base64
import errno
import json
from pathlib import Path

import pytest

from config import (
    InvalidInputError,
    Reference,
    RegistryConfig,
    config_search_path,
    load_config,
    lookup_credentials,
    parse_reference,
)

# ----------------------------------------------------------------------------------------- references


@pytest.mark.parametrize(("text", "expected"), [
    ("alpine", Reference("docker.io", "library/alpine")),
    ("alpine:3.19", Reference("docker.io", "library/alpine", "3.19")),
    ("docker.io/alpine", Reference("docker.io", "library/alpine")),
    ("index.docker.io/user/app:v1", Reference("docker.io", "user/app", "v1")),
    ("user/app", Reference("docker.io", "user/app")),
    ("ghcr.io/org/team/app:1.0", Reference("ghcr.io", "org/team/app", "1.0")),
    ("localhost/app", Reference("localhost", "app")),
    ("127.0.0.1:5000/a/b:t", Reference("127.0.0.1:5000", "a/b", "t")),
    ("[::1]:5000/a", Reference("[::1]:5000", "a")),
    ("host:5000/app@sha256:" + "a" * 64, Reference("host:5000", "app", None, "sha256:" + "a" * 64)),
    ("app:t@sha256:" + "b" * 64, Reference("docker.io", "library/app", "t", "sha256:" + "b" * 64)),
    ("oci:/tmp/lay", Reference("", "", layout="/tmp/lay")),
    ("oci:/tmp/lay:v2", Reference("", "", "v2", layout="/tmp/lay")),
    ("oci:rel/dir@sha256:" + "c" * 64, Reference("", "", None, "sha256:" + "c" * 64, layout="rel/dir")),
])
def test_parse_reference(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


def test_reference_properties() -> None:
    hub = parse_reference("alpine")
    assert (hub.registry, hub.ref, str(hub)) == ("registry-1.docker.io", "latest", "docker.io/library/alpine")
    local = parse_reference("127.0.0.1:5000/a@sha256:" + "d" * 64)
    assert (local.registry, local.ref) == ("127.0.0.1:5000", "sha256:" + "d" * 64)


@pytest.mark.parametrize("text", [
    "", "UPPER/case", "app:bad tag", "app@sha256:short", "app@md5:" + "a" * 32, "app@sha256:" + "A" * 64,
    "a//b", "host:5000/", "oci:", "oci:@sha256:" + "a" * 64, "x\0y", "-lead/app", "app:" + "t" * 200,
])
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_reference(text)
    assert info.value.errno == errno.EINVAL


# --------------------------------------------------------------------------------------------- config


def test_load_config_file_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("registry_defaults:\n  read_timeout: 7\n  retries: 2\ncache: {other: module}\n"
                    "registries:\n  docker.io:\n    mirrors: [harbor.example.com/dockerhub]\n"
                    "  reg.example.com:\n    insecure: true\n    ca_file: /etc/ca.pem\n    retries: 9\n")
    monkeypatch.setenv("LAZYMOUNT_CONFIG", str(path))
    settings = load_config()
    assert settings.for_host("docker.io").mirrors == ("harbor.example.com/dockerhub",)
    assert settings.for_host("registry-1.docker.io").read_timeout == 7
    assert settings.for_host("reg.example.com") == RegistryConfig(insecure=True, ca_file="/etc/ca.pem",
                                                                retries=9, read_timeout=7)
    assert settings.for_host("other.example.com") == RegistryConfig(read_timeout=7, retries=2)
    explicit = load_config(path, retries=1)
    assert explicit.for_host("reg.example.com").retries == 1 and explicit.defaults.retries == 1
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    user_config = tmp_path / "xdg" / "lazymount" / "config.yaml"
    assert config_search_path() == [path, user_config, Path("/etc/lazymount/config.yaml")]
    monkeypatch.delenv("LAZYMOUNT_CONFIG")
    user_config.parent.mkdir(parents=True)
    user_config.write_text("registry_defaults: {retries: 3, plain_http: false}\n")
    assert load_config().defaults == RegistryConfig(retries=3, plain_http=False)


@pytest.mark.parametrize("text", [
    "registry_defaults: {retries: many}\n", "registries: {h: {mirrors: http://x}}\n", "registries: [a]\n",
    "registry_defaults: {colour: blue}\n", "[1, 2]\n", "registries: {h: {insecure: 1}}\n",
    "registry_defaults: {read_timeout: -1}\n", "registries: {h: {ca_file: 3}}\n", "a: [\n",
])
def test_load_config_rejects(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=str(path)):
        load_config(path)


def test_lookup_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth(user: str, password: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}

    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": auth("hubuser", "hubpw"),
        "reg.example.com": auth("docker", "dpw"),
        "broken.example.com": {"auth": "!!not base64"},
    }}))
    containers = tmp_path / "run" / "containers"
    containers.mkdir(parents=True)
    (containers / "auth.json").write_text(json.dumps({"auths": {
        "reg.example.com/team": auth("team", "tpw"),
    }}))
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"auths": {"http://other.example.com:5000": auth("other", "opw")}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))

    def found(host: str, repository: str = "") -> tuple[str, str] | None:
        creds = lookup_credentials(host, repository)
        return None if creds is None else (creds.username, creds.password)

    assert found("docker.io", "library/alpine") == ("hubuser", "hubpw")
    assert found("reg.example.com", "team/app") == ("team", "tpw")
    assert found("reg.example.com", "solo/app") == ("docker", "dpw")
    assert found("other.example.com:5000") == ("other", "opw")
    assert found("broken.example.com") is None
    assert found("unknown.example.com") is None
    assert "hubpw" not in repr(lookup_credentials("docker.io"))
