"""OCI referrers: artifacts attached to an image manifest (their `subject`), pushed and discovered.

What belongs here: pushing an artifact manifest (`artifactType`, `subject`, the empty config `{}`, its
blobs); listing a manifest's referrers through the OCI 1.1 referrers API or, on registries without it
(Debian's docker-registry 2.8), through the referrers tag schema: the tag `sha256-<hex>` of the subject
holds an OCI index of the referrers' descriptors, read, extended and written again on every push; and
fetching an artifact's blobs by digest, verified, with the checks that bind an artifact to an image (its
subject, the layer it names, bounded sizes); finding a layer's seek index in the cache directory or else
among the image's referrers (`find_seek_index`, used wherever an image is opened).  What never does:
HTTP, auth or retries (regclient.py), what an artifact means (profiles: convert.py; seek indexes:
seekindex.py, which validates one), FUSE or gRPC.

Media types and annotation keys are toc.py's: ARTIFACT_PROFILE / MEDIA_PROFILE for workload profiles (one
per `record --push`, all of them used), ARTIFACT_SEEK_INDEX / MEDIA_SEEK_INDEX for seek indexes (one
artifact per layer, LAYER_ANNOTATION naming the layer; the newest one counts).  Every artifact carries
CREATED_ANNOTATION, which orders them.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import seekindex
from config import InvalidInputError, Reference, as_reference, valid_digest
from fetch import Descriptor, Image, RegistryBlobReader
from regclient import NotFoundError, RegistryClient, RegistryError
from toc import (
    ARTIFACT_SEEK_INDEX,
    CREATED_ANNOTATION,
    LAYER_ANNOTATION,
    MEDIA_OCI_EMPTY,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_SEEK_INDEX,
    sha256_digest,
)

log = logging.getLogger(__name__)

EMPTY_JSON = b"{}"
EMPTY_CONFIG = Descriptor(MEDIA_OCI_EMPTY, sha256_digest(EMPTY_JSON), len(EMPTY_JSON))
TAG_UPDATE_ATTEMPTS = 5  # read-modify-write rounds of the referrers tag before giving up on racing pushers
MAX_SEEK_INDEX_FLOOR = 64 << 20  # a seek index may be this big, plus an eighth of its layer's size


@dataclass(frozen=True)
class ArtifactBlob:
    """One blob of an artifact to push."""

    media_type: str
    data: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)


def referrers_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag of a manifest: `sha256-<hex>`."""
    algorithm, _, hexdigest = valid_digest(subject_digest).partition(":")
    return f"{algorithm}-{hexdigest}"


def _registry_ref(ref: Reference | str) -> Reference:
    ref = as_reference(ref)
    if ref.layout is not None:
        raise InvalidInputError(f"{ref}: referrer artifacts live in a registry, not in an OCI layout")
    return ref


def _entries(data: bytes, ref: Reference, what: str) -> list[dict[str, Any]]:
    """The `manifests` of an index answered by the registry (untrusted JSON)."""
    try:
        index = json.loads(data)
    except ValueError:
        raise RegistryError(ref.registry, ref.repository, what, "not valid JSON") from None
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(ref.registry, ref.repository, what, "not an OCI index")
    return entries


def _tag_entries(client: RegistryClient, ref: Reference, tag: str) -> list[dict[str, Any]]:
    """The entries of the referrers tag `tag`, [] if the tag does not exist."""
    try:
        data, _, _ = client.get_manifest(ref, tag)
    except NotFoundError:
        return []
    return _entries(data, ref, f"referrers tag {tag}")


def referrers(client: RegistryClient, ref: Reference | str, subject_digest: str,
              artifact_type: str | None = None) -> list[Descriptor]:
    """The descriptors of the manifests whose subject is `subject_digest` in `ref`'s repository (only
    those of `artifact_type` if given), from the referrers API or, without it, the referrers tag."""
    ref = _registry_ref(ref)
    answer = client.get_referrers(ref, subject_digest, artifact_type)
    if answer is None:
        entries = _tag_entries(client, ref, referrers_tag(subject_digest))
    else:
        entries = _entries(answer, ref, f"referrers of {subject_digest}")
    try:
        found = [Descriptor.from_json(entry) for entry in entries]
    except InvalidInputError as e:
        raise RegistryError(ref.registry, ref.repository, f"referrers of {subject_digest}", str(e)) from None
    return [d for d in found if artifact_type in (None, d.artifact_type)]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def push_referrer(client: RegistryClient, ref: Reference | str, subject: Descriptor, artifact_type: str,
                  blobs: Sequence[ArtifactBlob], annotations: Mapping[str, str] | None = None) -> Descriptor:
    """Push an artifact manifest of `artifact_type` with `blobs` as its layers and `subject` (a manifest
    in the same repository) as its subject; on a registry without the referrers API, add it to the
    subject's referrers tag too.  Return the artifact manifest's descriptor (as referrers() lists it)."""
    ref = _registry_ref(ref)
    client.push_blob(ref, EMPTY_CONFIG.digest, EMPTY_JSON)
    layers = []
    for blob in blobs:
        digest = sha256_digest(blob.data)
        client.push_blob(ref, digest, blob.data)
        layers.append(Descriptor(blob.media_type, digest, len(blob.data), dict(blob.annotations)).to_json())
    annotations = {CREATED_ANNOTATION: _now(), **(annotations or {})}
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST, "artifactType": artifact_type,
                "config": EMPTY_CONFIG.to_json(), "layers": layers, "subject": subject.to_json(),
                "annotations": annotations}
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = client.push_manifest(ref, sha256_digest(raw), raw, MEDIA_OCI_MANIFEST)
    pushed = Descriptor(MEDIA_OCI_MANIFEST, digest, len(raw), annotations, artifact_type)
    if client.get_referrers(ref, subject.digest) is None:
        _add_to_referrers_tag(client, ref, subject.digest, pushed)
    log.info("pushed %s artifact %s for %s in %s", artifact_type, pushed.digest, subject.digest, ref)
    return pushed


def _add_to_referrers_tag(client: RegistryClient, ref: Reference, subject_digest: str,
                          pushed: Descriptor) -> None:
    """Read the subject's referrers tag, add `pushed`, write it back; read it again to find a concurrent
    pusher's overwrite, and try again if `pushed` was lost."""
    tag = referrers_tag(subject_digest)
    for _ in range(TAG_UPDATE_ATTEMPTS):
        entries = [e for e in _tag_entries(client, ref, tag) if e.get("digest") != pushed.digest]
        index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [*entries, pushed.to_json()]}
        client.push_manifest(ref, tag, json.dumps(index, separators=(",", ":")).encode(), MEDIA_OCI_INDEX)
        if any(e.get("digest") == pushed.digest for e in _tag_entries(client, ref, tag)):
            return
    raise RegistryError(ref.registry, ref.repository, f"referrers tag {tag}",
                        f"other pushes kept replacing it ({TAG_UPDATE_ATTEMPTS} attempts)")


def artifact_blobs(client: RegistryClient, ref: Reference | str, artifact: Descriptor, subject_digest: str,
                   max_size: int) -> list[tuple[Descriptor, bytes]]:
    """The blobs of the artifact manifest `artifact` (fetched by digest), each fetched by digest and
    verified; RegistryError (one line) unless the artifact's subject is `subject_digest`, its type the one
    it was listed with, and every blob at most `max_size` bytes."""
    ref = _registry_ref(ref)

    def fail(detail: str) -> RegistryError:
        return RegistryError(ref.registry, ref.repository, f"{artifact.artifact_type or 'artifact'} "
                             f"{artifact.digest}", detail)

    data, _, _ = client.get_manifest(ref, artifact.digest)
    try:
        manifest = json.loads(data)
        subject = Descriptor.from_json(manifest.get("subject"))
        config = Descriptor.from_json(manifest.get("config"))
        layers = [Descriptor.from_json(d) for d in manifest.get("layers") or []]
    except (ValueError, AttributeError, InvalidInputError) as e:
        raise fail(f"not a valid artifact manifest ({str(e)[:100] or type(e).__name__})") from None
    if subject.digest != subject_digest:
        raise fail(f"is attached to {subject.digest}, not to this image's manifest {subject_digest}")
    kind = manifest.get("artifactType") or config.media_type
    if artifact.artifact_type and kind != artifact.artifact_type:
        raise fail(f"is of type {str(kind)[:100]!r}, listed as {artifact.artifact_type!r}")
    out = []
    for blob in layers:
        if blob.size > max_size:
            raise fail(f"blob {blob.digest} has {blob.size} bytes, over the {max_size}-byte limit")
        try:
            with RegistryBlobReader(client, ref, blob.digest, blob.size) as reader:
                out.append((blob, reader.read_all(max_size)))
        except RegistryError as e:
            raise fail(f"{e.what}: {e.detail}") from None
    return out


def _created(descriptor: Descriptor) -> str:
    return descriptor.annotations.get(CREATED_ANNOTATION, "")


def _client(image: Image) -> RegistryClient:
    if image.client is None:
        raise InvalidInputError(f"{image.reference}: referrer artifacts live in a registry, not in an OCI "
                                "layout")
    return image.client


def image_artifacts(image: Image, artifact_type: str,
                    max_size: int) -> list[tuple[Descriptor, list[tuple[Descriptor, bytes]]]]:
    """Every `artifact_type` referrer of the image's manifest, oldest first, with its verified blobs
    (see artifact_blobs); [] for an image in an OCI layout."""
    if image.client is None:
        return []
    found = sorted(referrers(image.client, image.reference, image.digest, artifact_type), key=_created)
    return [(d, artifact_blobs(image.client, image.reference, d, image.digest, max_size)) for d in found]


def push_layer_artifact(image: Image, layer_digest: str, artifact_type: str, media_type: str,
                        data: bytes) -> Descriptor:
    """Attach `data` to the image (through the client it was opened with) as an `artifact_type` artifact
    about its layer `layer_digest`."""
    layer = _layer(image, layer_digest)
    annotations = {LAYER_ANNOTATION: layer.digest}
    return push_referrer(_client(image), image.reference, image.descriptor, artifact_type,
                         [ArtifactBlob(media_type, data, annotations)], annotations)


def layer_artifact(image: Image, layer_digest: str, artifact_type: str, max_size: int) -> bytes | None:
    """The blob of the newest `artifact_type` referrer of the image about its layer `layer_digest`,
    fetched by digest and verified; None if there is none (or the image is in an OCI layout).
    RegistryError (one line) if that artifact is not bound to this image and layer."""
    layer = _layer(image, layer_digest)
    client = image.client
    if client is None:
        return None
    listed = [d for d in referrers(client, image.reference, image.digest, artifact_type)
              if d.annotations.get(LAYER_ANNOTATION) == layer.digest]
    if not listed:
        return None
    newest = max(reversed(listed), key=_created)  # the last listed wins a tie
    blobs = artifact_blobs(client, image.reference, newest, image.digest, max_size)
    if len(blobs) != 1 or blobs[0][0].annotations.get(LAYER_ANNOTATION) != layer.digest:
        raise RegistryError(image.reference.registry, image.reference.repository,
                            f"{artifact_type} {newest.digest}",
                            f"does not hold exactly one blob for layer {layer.digest}")
    return blobs[0][1]


def _layer(image: Image, layer_digest: str) -> Descriptor:
    for layer in image.layers:
        if layer.digest == layer_digest:
            return layer
    raise InvalidInputError(f"{image.reference} has no layer {layer_digest[:80]}")


def push_seek_index(image: Image, layer_digest: str, data: bytes) -> Descriptor:
    """Attach the seek index `data` of the image's layer `layer_digest` to the image."""
    return push_layer_artifact(image, layer_digest, ARTIFACT_SEEK_INDEX, MEDIA_SEEK_INDEX, data)


def seek_index(image: Image, layer_digest: str) -> bytes | None:
    """The newest seek index attached to the image for its layer `layer_digest`, verified against the
    digest its artifact manifest gives (its content is seekindex.py's to check); None if there is none."""
    limit = MAX_SEEK_INDEX_FLOOR + _layer(image, layer_digest).size // 8  # seekindex's bound for its cache
    return layer_artifact(image, layer_digest, ARTIFACT_SEEK_INDEX, limit)


def find_seek_index(image: Image, layer: Descriptor, cache_dir: Path) -> seekindex.SeekIndex | None:
    """The seek index of the image's layer: the one kept in `cache_dir`, else the newest one attached to
    the image (then kept in `cache_dir`); None if there is none.  One that is not this image's, not this
    layer's, or not valid is logged in one line and not used (seekindex.find_index)."""
    return seekindex.find_index(layer, cache_dir, [lambda layer: seek_index(image, layer.digest)])
