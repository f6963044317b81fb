"""Lists of files that order a layer: `--prioritize` lists and workload profiles.

What belongs here: the profile file format (`# layer DIGEST` then that layer's paths), merging profiles,
recording the files a workload opens (the mount's access log), and attaching profiles to an image as OCI
referrers and reading them back.  What never does: laying out layers by a profile (convert.py,
layerwriter.py), prefetching a profile's files (engine.py), running the workload (sandbox.py).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import config
import convert
import fetch
import referrers
import toc

log = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    """A UTF-8 text file given by the user (InvalidInputError if it is not text)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise config.InvalidInputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_path_list(path: Path) -> list[str]:
    """A prioritized-files list: one path per line; blank lines and '#' comments ignored."""
    lines = read_text(path).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


PROFILE_LAYER = "# layer "
MAX_PROFILE_SIZE = 16 << 20  # bytes of a profile attached to an image


def read_profile(path: Path) -> dict[str, list[str]]:
    """A workload profile file (see parse_profile)."""
    return parse_profile(read_text(path), str(path))


def parse_profile(text: str, where: str) -> dict[str, list[str]]:
    """A workload profile: `# layer DIGEST` lines, each followed by that layer's paths (relative, one a
    line, in the order first opened); blank lines and other '#' lines are ignored.  `where` names the
    profile in errors."""
    profile: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(PROFILE_LAYER):
            current = profile.setdefault(toc.check_digest(line[len(PROFILE_LAYER):].strip()), [])
        elif not line.strip() or line.startswith("#"):
            continue
        elif current is None:
            raise config.InvalidInputError(f"{where}:{number}: a path before any "
                                           f"'{PROFILE_LAYER}DIGEST' line")
        else:
            current.append(line.lstrip("/"))
    return profile


def merge_profiles(profiles: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Profiles merged: layers and, within a layer, paths in the order of their first appearance."""
    merged: dict[str, dict[str, None]] = {}
    for profile in profiles:
        for digest, paths in profile.items():
            merged.setdefault(digest, {}).update(dict.fromkeys(paths))
    return {digest: list(paths) for digest, paths in merged.items()}


def format_profile(profile: dict[str, list[str]]) -> str:
    """A profile as the text parse_profile reads."""
    lines = ["# lazymount profile: the files a workload opened, by the image layer that provides them"]
    for digest, paths in profile.items():
        lines += [f"{PROFILE_LAYER}{digest}", *paths]
    return "\n".join(lines) + "\n"


def write_profile(path: Path, profile: dict[str, list[str]]) -> None:
    """Write a profile in the format read_profile reads."""
    Path(path).write_text(format_profile(profile), encoding="utf-8")


def push_profile(image: fetch.Image, profile: dict[str, list[str]]) -> str:
    """Attach `profile` to the image's manifest as a referrer artifact, through the client the image was
    opened with (the image itself is not pushed again); return the artifact's digest.  Its layers must be
    the image's."""
    foreign = set(profile) - {layer.digest for layer in image.layers}
    if foreign:
        raise convert.ImageError(f"{image.reference} ({image.digest}) has no layer {min(foreign)}: the "
                                 "profile was recorded in another image (was the tag moved?)")
    blob = referrers.ArtifactBlob(toc.MEDIA_PROFILE, format_profile(profile).encode())
    if image.client is None:
        raise convert.ImageError(f"{image.reference}: profiles are attached to images in a registry")
    pushed = referrers.push_referrer(image.client, image.reference, image.descriptor, toc.ARTIFACT_PROFILE,
                                     [blob])
    return pushed.digest


def attached_profile(image: fetch.Image) -> dict[str, list[str]]:
    """Every profile attached to the image (`record --push`), merged oldest first, restricted to the
    image's layers; {} if there is none."""
    profiles = []
    for artifact, blobs in referrers.image_artifacts(image, toc.ARTIFACT_PROFILE, MAX_PROFILE_SIZE):
        for blob, data in blobs:
            if blob.media_type != toc.MEDIA_PROFILE:
                continue
            try:
                profiles.append(parse_profile(data.decode("utf-8"), f"profile {artifact.digest}"))
            except (UnicodeDecodeError, config.InvalidInputError) as e:
                log.warning("%s: profile %s not used: %s", image.reference, artifact.digest, e)
    layers = {layer.digest for layer in image.layers}
    return {digest: paths for digest, paths in merge_profiles(profiles).items() if digest in layers}


class AccessRecorder:
    """Logs the first open of every regular file, in order, as `LAYER-DIGEST<TAB>PATH` lines appended and
    flushed to a file one by one, so the log is complete however the mount ends (see read_access_log)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- open as long as the mount
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, digest: str, path: str) -> None:
        """Log `path` of layer `digest` unless it was logged before."""
        if "\n" in path or "\t" in path:
            log.debug("not recorded (a tab or newline in the name): %r", path)
            return
        with self._lock:
            if (digest, path) in self._seen:
                return
            self._seen.add((digest, path))
            try:
                self._file.write(f"{digest}\t{path}\n")
                self._file.flush()
            except UnicodeEncodeError:
                log.debug("not recorded (not UTF-8): %r", path)

    def close(self) -> None:
        """Close the log file."""
        with self._lock:
            self._file.close()


def read_access_log(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """An AccessRecorder's log as {layer digest: paths in the order first opened}."""
    by_layer: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            digest, sep, name = line.rstrip("\n").partition("\t")
            if sep:
                by_layer.setdefault(digest, []).append(name)
    return by_layer
