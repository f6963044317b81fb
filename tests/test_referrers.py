"""Referrer artifacts (referrers.py) against Debian's docker-registry 2.8, which has no referrers API: push
and discovery through the referrers tag schema, the checks that bind an artifact to its image, and
profiles attached to an image (profiles.push_profile / attached_profile).

Seek index blobs are opaque here (their format and checks are seekindex.py's); each test pushes its own
images (small one-layer layouts, distinct seeds) so that their referrers do not mix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import convert
import fetch
import profiles
import referrers
import regclient
import toc
from tests.registry import Registry, TestImage, make_test_image, push_layout


def _pushed(registry: Registry, tmp_path: Path, tag: str, seed: int) -> tuple[str, TestImage]:
    image = make_test_image(tmp_path / tag, tag=tag, seed=seed, payload_size=50_000)
    push_layout(image.layout, tag, registry, "artifacts")
    return f"{registry.host}/artifacts:{tag}", image


def _open(ref: str) -> fetch.Image:
    """The image through a fresh client (another node, nothing remembered)."""
    return fetch.open_image(ref, client=regclient.RegistryClient())


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    print("MESSAGE:", message)
    assert "\n" not in message and len(message) < 400
    return message


def test_seek_index_pushed_and_found_through_the_referrers_tag(registry: Registry, tmp_path: Path) -> None:
    """docker-registry 2.8 answers the referrers API with 404, so a push writes the `sha256-<hex>` tag's
    index; a fresh client finds the artifact there, fetches its blob by digest, and takes the newest index
    of a layer; artifacts of another type are not mistaken for it."""
    ref, built = _pushed(registry, tmp_path, "v1", seed=11)
    image = _open(ref)
    client = image.client
    assert client is not None
    assert client.get_referrers(ref, image.digest) is None  # no referrers API on 2.8
    assert referrers.referrers(client, ref, image.digest) == []

    index = b"opaque seek index\x00" * 500
    pushed = referrers.push_seek_index(image, built.layer_digest, index)

    tag = referrers.referrers_tag(image.digest)
    assert tag == "sha256-" + image.digest.removeprefix("sha256:")
    listed = json.loads(client.get_manifest(ref, tag)[0])
    assert listed["mediaType"] == toc.MEDIA_OCI_INDEX
    [entry] = listed["manifests"]
    assert entry["digest"] == pushed.digest and entry["artifactType"] == toc.ARTIFACT_SEEK_INDEX
    assert entry["annotations"][toc.LAYER_ANNOTATION] == built.layer_digest
    artifact = json.loads(client.get_manifest(ref, pushed.digest)[0])
    assert artifact["subject"] == {"mediaType": toc.MEDIA_OCI_MANIFEST, "digest": image.digest,
                                   "size": len(image.manifest_bytes)}
    assert artifact["config"]["mediaType"] == toc.MEDIA_OCI_EMPTY
    assert artifact["layers"][0]["mediaType"] == toc.MEDIA_SEEK_INDEX

    assert referrers.seek_index(_open(ref), built.layer_digest) == index

    # A newer index of the layer wins; a profile attached meanwhile is another artifact type.
    profiles.push_profile(image, {built.layer_digest: ["hello.txt"]})
    newer = b"newer seek index" * 100
    referrers.push_seek_index(image, built.layer_digest, newer)
    assert referrers.seek_index(_open(ref), built.layer_digest) == newer
    assert len(referrers.referrers(client, ref, image.digest)) == 3
    assert len(referrers.referrers(client, ref, image.digest, toc.ARTIFACT_SEEK_INDEX)) == 2


def test_foreign_and_truncated_indexes_are_rejected_in_one_line(registry: Registry, tmp_path: Path) -> None:
    """An artifact listed among image A's referrers but attached to image B, and an index whose blob
    in the registry was cut short, are refused with one line naming the artifact; no bytes come back."""
    ref_a, built_a = _pushed(registry, tmp_path, "a", seed=12)
    ref_b, built_b = _pushed(registry, tmp_path, "b", seed=13)
    image_a = _open(ref_a)
    client = image_a.client
    assert client is not None
    image_b = fetch.open_image(ref_b, client=client)
    assert referrers.seek_index(image_a, built_a.layer_digest) is None

    # Made for image B (its subject), listed under A's referrers tag as if it were A's layer's index.
    claim = {toc.LAYER_ANNOTATION: built_a.layer_digest}
    blob = referrers.ArtifactBlob(toc.MEDIA_SEEK_INDEX, b"index of B", claim)
    foreign = referrers.push_referrer(client, ref_b, image_b.descriptor, toc.ARTIFACT_SEEK_INDEX, [blob],
                                      claim)
    tag_index = {"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_INDEX, "manifests": [foreign.to_json()]}
    client.push_manifest(ref_a, referrers.referrers_tag(image_a.digest), json.dumps(tag_index).encode(),
                         toc.MEDIA_OCI_INDEX)
    with pytest.raises(regclient.RegistryError) as error:
        referrers.seek_index(_open(ref_a), built_a.layer_digest)
    message = _one_line(error)
    assert f"is attached to {image_b.digest}, not to this image's manifest {image_a.digest}" in message

    # A's own index (the newest now), its blob truncated in the registry's storage.
    data = b"seek index of A" * 1000
    referrers.push_seek_index(image_a, built_a.layer_digest, data)
    hexdigest = toc.sha256_digest(data).removeprefix("sha256:")
    stored = registry.workdir / "storage/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    stored.write_bytes(data[:len(data) // 2])
    with pytest.raises(regclient.RegistryError) as error:
        referrers.seek_index(_open(ref_a), built_a.layer_digest)
    message = _one_line(error)
    assert f"{toc.ARTIFACT_SEEK_INDEX} " in message and toc.sha256_digest(data) in message
    assert f"expected {len(data)}" in message


def test_profiles_attached_to_an_image(registry: Registry, tmp_path: Path) -> None:
    """Every attached profile counts, merged oldest first, limited to the image's layers; a profile
    recorded in another image is refused before anything is pushed; an image without profiles, or in an
    OCI layout, has {}."""
    ref, built = _pushed(registry, tmp_path, "p", seed=14)
    image = _open(ref)
    client = image.client
    assert client is not None
    assert profiles.attached_profile(image) == {}
    layer = built.layer_digest
    profiles.push_profile(image, {layer: ["data.bin", "hello.txt"]})
    profiles.push_profile(image, {layer: ["hello.txt", "etc/other"]})
    assert profiles.attached_profile(_open(ref)) == {layer: ["data.bin", "hello.txt", "etc/other"]}

    stranger = "sha256:" + "ab" * 32
    with pytest.raises(convert.ImageError) as error:
        profiles.push_profile(image, {stranger: ["x"]})
    assert stranger in _one_line(error)
    assert len(referrers.referrers(client, ref, image.digest, toc.ARTIFACT_PROFILE)) == 2

    # An OCI layout has no referrers: nothing is found, nothing can be attached.
    layout = fetch.open_image(f"oci:{built.layout}:p")
    assert profiles.attached_profile(layout) == {} and referrers.seek_index(layout, layer) is None
    with pytest.raises(convert.ImageError):
        profiles.push_profile(layout, {layer: ["hello.txt"]})
