"""The lazymount command line.

What belongs here: argument parsing, turning errors into one-line messages and exit codes, and the
commands a user starts: `convert`, `inspect`, `index` (seek indexes of plain gzip layers, seekindex.py),
`mount` (daemonized, see mountctl.py; the file system is fusefs.py's), `umount`, `stats`, `run`, `shell`
and `record` (sandbox.py), `optimize` (convert with a profile), `layers` (the snapshotter's daemon,
layerfs.py) and `snapshotter` (snapshot_grpc.py).  This is the only module that may import every other
one, and none imports it.  What never does: format, registry, cache, tree, FUSE or sandbox logic — those
live in toc.py, regclient.py/fetch.py, cache.py, tree.py/engine.py, fusefs.py and sandbox.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import cache
import config
import convert
import download
import fetch
import fusefs
import layerfs
import mountctl
import profiles
import referrers
import sandbox
import seekindex
import toc
import tocread
from fusefs import registry_client
from mountctl import MountError

log = logging.getLogger("lazymount")

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Parse `4194304`, `512k`, `4M`, `1G` (binary units) into bytes."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    try:
        number = int(value[: len(value) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4M") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return number * _SIZE_SUFFIXES[suffix]



def _layout_options(args: argparse.Namespace) -> convert.ConvertOptions:
    limits = config.load_config(args.config).limits
    if args.chunk_size > limits.chunk_size:
        raise config.InvalidInputError(f"--chunk-size {args.chunk_size} is over the {limits.chunk_size} "
                                       "bytes readers accept (limits.chunk_size)")
    return convert.ConvertOptions(chunk_size=args.chunk_size, fmt=toc.ZSTD if args.zstd else toc.GZIP,
                                  level=args.level, workers=args.jobs, progress=not args.quiet, limits=limits)


def _print_manifest_layers(manifest: dict) -> None:
    for layer in manifest["layers"]:
        print(f"{layer['digest']}  {layer['size']:>12}  "
              f"toc {layer['annotations'].get(toc.TOC_DIGEST_ANNOTATION, '-')}")


def cmd_convert(args: argparse.Namespace) -> int:
    options = _layout_options(args)
    if args.prioritize:
        options.prioritize_all = profiles.read_path_list(args.prioritize)
    if _is_local_file(args.src):
        info = convert.convert_layer_file(Path(args.src), Path(args.dst), options, options.prioritize_all)
        print(json.dumps({"digest": info.digest, "size": info.size, "diffID": info.diff_id,
                          "tocDigest": info.toc_digest, "uncompressedSize": info.uncompressed_size,
                          "entries": info.entries, "annotations": info.annotations}, indent=2))
        return 0
    refs = config.parse_reference(args.src), config.parse_reference(args.dst)
    manifest = convert.convert_image(args.src, args.dst, options, registry_client(args, *refs), args.platform)
    _print_manifest_layers(manifest)
    return 0


def _is_local_file(text: str) -> bool:
    """A layer file argument, as opposed to an image reference: an existing file or a path-like name."""
    return not text.startswith("oci:") and (text.startswith(("/", "./", "../")) or Path(text).is_file())


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else cache.default_cache_dir()


def _laziness(report: dict, image: fetch.Image, layer: fetch.Descriptor, cache_dir: Path) -> str:
    """How `mount` would read a layer: eStargz, through a seek index (kept or attached), or downloaded
    whole."""
    if report["format"] in (toc.GZIP, toc.ZSTD):
        return "eStargz" if report["format"] == toc.GZIP else "zstd:chunked"
    index = referrers.find_seek_index(image, layer, cache_dir)
    return f"indexed ({index.describe()})" if index else "neither: downloaded whole before use"


def cmd_inspect(args: argparse.Namespace) -> int:
    image = None
    limits = config.load_config(args.config).limits
    if _is_local_file(args.src):
        blobs = [(args.src, download.FileBlob(Path(args.src)), None)]
    else:
        ref = config.parse_reference(args.src)
        image = fetch.open_image(ref, platform=args.platform, client=registry_client(args, ref))
        layers = [d for d in image.layers if args.layer in (None, d.digest)]
        if not layers:
            raise convert.ImageError(f"{args.src} has no layer {args.layer}" if args.layer
                                     else f"{args.src} has no layers")
        blobs = [(d.digest, image.blob(d.digest), d.annotations.get(toc.TOC_DIGEST_ANNOTATION))
                 for d in layers]
    reports = []
    descriptors = {d.digest: d for d in image.layers} if image is not None else {}
    for name, reader, toc_digest in blobs:
        with reader:
            if args.toc:
                _, toc_json = tocread.read_toc_json(reader.read_at, reader.size, toc_digest, limits)
                sys.stdout.write(toc_json.decode("utf-8", "replace") + "\n")
                continue
            report = {"layer": name,
                      **convert.describe_layer(reader.read_at, reader.size, toc_digest, limits)}
            if name in descriptors:
                report["lazy"] = _laziness(report, image, descriptors[name], _cache_dir(args))
            reports.append(report)
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for report in reports:
            _print_layer_report(report)
    return 0


def _print_layer_report(report: dict) -> None:
    print(f"{report['layer']}\n  format: {report['format']}, {report['size']} bytes")
    if "lazy" in report:
        print(f"  lazy: {report['lazy']}")
    if "entries" in report:
        counts = ", ".join(f"{v} {k}" for k, v in report["entries"].items() if v and k not in ("bytes",))
        print(f"  entries: {counts}\n  file bytes: {report['entries']['bytes']}, largest chunk: "
              f"{report['largest_chunk']}\n  landmark: {report['landmark']}\n  toc: {report['toc_digest']} "
              f"({report['toc_bytes']} bytes)")


def cmd_index(args: argparse.Namespace) -> int:
    ref = config.parse_reference(args.image)
    if args.push and ref.layout is not None:
        raise config.InvalidInputError(f"{args.image}: an OCI layout has no referrers: --push attaches seek "
                                       "indexes to an image in a registry")
    image = fetch.open_image(ref, platform=args.platform, client=registry_client(args, ref))
    cache_dir = _cache_dir(args)
    for layer in image.layers:
        done, data = index_layer(image, layer, cache_dir)
        if args.push and data is not None:
            if _attached_index(image, layer) == data:
                done += "; already attached to the image"
            else:
                pushed = referrers.push_seek_index(image, layer.digest, data)
                done += f"; attached to the image as {pushed.digest}"
        print(f"{layer.digest}  {done}", flush=True)
    return 0


def _attached_index(image: fetch.Image, layer: fetch.Descriptor) -> bytes | None:
    """The seek index attached to the image for the layer, None if none is (or it cannot be had): each
    push adds an artifact to the referrers (tag) that every mount lists, so the same one is not pushed
    again."""
    try:
        return referrers.seek_index(image, layer.digest)
    except toc.LazymountError as e:
        log.info("layer %s: the seek index attached to the image is not used: %s", layer.digest, e)
        return None


def index_layer(image: fetch.Image, layer: fetch.Descriptor, cache_dir: Path) -> tuple[str, bytes | None]:
    """Build and keep the seek index of one layer unless it needs none or has one; what was done, and the
    layer's index (None if it has none)."""
    if layer.annotations.get(toc.TOC_DIGEST_ANNOTATION):
        return "eStargz: needs no index", None
    if layer.media_type.endswith("zstd"):
        return "zstd: not indexed (gzip layers only)", None
    found = seekindex.find_index(layer, cache_dir)
    kept = seekindex.index_path(cache_dir, layer.digest)
    if found is not None:
        return f"already indexed: {found.describe()}", kept.read_bytes()
    started = time.monotonic()
    spool_dir = kept.parent
    spool_dir.mkdir(parents=True, exist_ok=True)
    with image.blob(layer.digest) as reader:
        try:
            local = isinstance(reader, fetch.LayoutBlobReader)
            built = seekindex.build(reader.read_at, reader.size, layer.digest, local=local,
                                    spool_dir=spool_dir, fileno=reader.fileno() if local else None)
        except seekindex.NotGzipError:
            return f"not gzip ({layer.media_type or 'no media type'}): not indexed", None
    seekindex.store_index(cache_dir, layer.digest, built.data)
    seconds = time.monotonic() - started
    return (f"indexed: {built.index.describe()}, {built.entries} entries, {built.uncompressed_size} bytes "
            f"uncompressed, in {seconds:.1f} s"), built.data


# --------------------------------------------------------------------------------------------- mounting


def cmd_mount(args: argparse.Namespace) -> int:
    args.mountpoint = Path(args.mountpoint).absolute()
    mounted = mountctl.mount_at(args.mountpoint)
    if mounted and mounted[1].startswith("fuse.lazymount"):
        raise MountError(f"{args.mountpoint} is already a lazymount mount (lazymount umount it first)")
    return _serve_at_mountpoint(args, fusefs.serve_image)


def cmd_layers(args: argparse.Namespace) -> int:
    args.mountpoint = Path(args.mountpoint).absolute()
    args.specs = os.path.abspath(args.specs)
    return _serve_at_mountpoint(args, layerfs.serve_layers)


def _serve_at_mountpoint(args: argparse.Namespace, serve: mountctl.Server) -> int:
    """Run `serve` at args.mountpoint: in this process with --foreground, else in a daemon."""
    if not args.mountpoint.is_dir():
        raise MountError(f"mount point {args.mountpoint} is not a directory")
    if args.foreground:
        serve(args, lambda: None, None)
    else:
        mountctl.start_daemon(args, serve)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountctl.unmount(Path(args.mountpoint).absolute())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        stats = json.loads(os.getxattr(args.mountpoint, mountctl.STATS_XATTR))
    except OSError as e:
        raise MountError(f"{args.mountpoint} is not a lazymount mount ({e.strerror})") from None
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['reference']} at {stats['mountpoint']} (pid {stats['pid']})")
    for layer in stats["layers"]:
        print(f"  {layer['digest'][:19]}  {layer['state']:7}  fetched {layer['bytes_fetched']:>12} B in "
              f"{layer['requests']} requests, served {layer['bytes_served']:>12} B, chunk hits "
              f"{layer['chunk_hits']}, fetched chunks {layer['chunks_fetched']}")
    c = stats["cache"]
    print(f"  cache: {c['hits_memory']} memory hits, {c['hits_disk']} disk hits, {c['misses']} misses, "
          f"{c['bytes_on_disk']} B on disk")
    return 0


# ------------------------------------------------------------------------------------------------ run


def _command(args: argparse.Namespace) -> list[str]:
    """The command after IMAGE; options between IMAGE and `--` are the subcommand's, as before IMAGE."""
    command = args.command
    if "--" not in command:
        return command
    split = command.index("--")
    if split:
        args.subparser.parse_args([*command[:split], args.image], namespace=args)
    return command[split + 1:]


def _sandbox_options(args: argparse.Namespace, shell: bool = False) -> sandbox.Options:
    return sandbox.Options(binds=tuple(args.bind), contain=args.contain, cleanenv=args.cleanenv,
                           env=tuple(args.env), env_files=tuple(args.env_file), pwd=args.pwd,
                           workdir_from_image=args.workdir_from_image, nv=args.nv, shell=shell,
                           overlay=args.overlay)


def cmd_run(args: argparse.Namespace) -> int:
    return sandbox.run_in_image(args, _command(args), _sandbox_options(args)).status


def cmd_shell(args: argparse.Namespace) -> int:
    return sandbox.run_in_image(args, [], _sandbox_options(args, shell=True)).status


def cmd_record(args: argparse.Namespace) -> int:
    outcome = sandbox.run_in_image(args, _command(args), _sandbox_options(args), record=True)
    code, recorded = outcome.status, outcome.profile
    profile = recorded
    if args.append and args.output.exists():
        profile = profiles.merge_profiles([profiles.read_profile(args.output), recorded])
    profiles.write_profile(args.output, profile)
    print(f"lazymount: recorded {sum(map(len, recorded.values()))} files of {len(recorded)} layers in "
          f"{args.output}" + (f" (the command exited with status {code})" if code else ""), file=sys.stderr)
    if args.push and code:
        print("lazymount: the profile was not attached to the image: the command failed", file=sys.stderr)
    elif args.push:
        ref = config.parse_reference(args.image)
        image = fetch.open_image(ref, platform=args.platform, client=registry_client(args, ref))
        digest = profiles.push_profile(image, recorded)
        print(f"lazymount: attached the profile to {ref} ({image.digest}) as {digest}", file=sys.stderr)
    return code


def cmd_optimize(args: argparse.Namespace) -> int:
    if bool(args.profile) == bool(args.workload):
        raise config.InvalidInputError("give either --profile FILE (repeatable) or --workload CMD")
    refs = config.parse_reference(args.src), config.parse_reference(args.dst)
    if args.workload:
        args.image, args.stats_file = args.src, None
        outcome = sandbox.run_in_image(args, shlex.split(args.workload), sandbox.IMAGE_ONLY, record=True)
        if outcome.status:
            reason = f" ({outcome.reason})" if outcome.reason else ""
            raise MountError(f"the workload exited with status {outcome.status}{reason}; {args.src} was not "
                             "optimized")
        profile = outcome.profile
    else:
        profile = profiles.merge_profiles([profiles.read_profile(path) for path in args.profile])
    options = _layout_options(args)
    options.prioritized, options.optimize = profile, True
    manifest = convert.convert_image(args.src, args.dst, options, registry_client(args, *refs), args.platform)
    _print_manifest_layers(manifest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--platform", metavar="P", help="os/arch[/variant] to pick from an index")
    registry.add_argument("--creds", metavar="U:P", default=os.environ.get("LAZYMOUNT_CREDS"),
                          help="registry credentials (default: $LAZYMOUNT_CREDS, which other users cannot "
                               "read as they can a command line; else the auth files)")
    registry.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to registries")
    registry.add_argument("--config", metavar="FILE", help="YAML config (default: $LAZYMOUNT_CONFIG, "
                          "~/.config/lazymount/config.yaml, /etc/lazymount/config.yaml)")

    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument("--chunk-size", type=parse_size, default=toc.DEFAULT_CHUNK_SIZE, metavar="N")
    layout.add_argument("--zstd", action="store_true", help="write zstd:chunked instead of gzip eStargz")
    layout.add_argument("--level", type=int, default=3,
                        help="compression level (gzip: 0-3 isa-l; zstd: 1-22)")
    layout.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                        help="threads (default: all cores)")
    layout.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("convert", parents=[registry, layout], help="convert a layer or an image to eStargz")
    p.add_argument("src", help="layer file (.tar, .tar.gz, .tar.zst), REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("dst", help="output blob file, REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--prioritize", type=Path, metavar="FILE",
                   help="paths (one a line) to place first, before .prefetch.landmark")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", parents=[registry], help="show the layers of an eStargz blob or image")
    p.add_argument("src", help="layer blob file, REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--cache-dir", metavar="D", help="where seek indexes are kept (default: as mount's)")
    p.add_argument("--toc", action="store_true", help="print the TOC JSON")
    p.add_argument("--layer", metavar="DIGEST", help="only this layer of an image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("index", parents=[registry],
                       help="build seek indexes of an image's plain gzip layers, so they mount lazily")
    p.add_argument("image", help="REGISTRY/NAME[:TAG|@DIGEST] or oci:DIR[:TAG]")
    p.add_argument("--cache-dir", metavar="D", help="where indexes are kept (default ~/.cache/lazymount)")
    p.add_argument("--push", action="store_true",
                   help="attach each layer's index to the image in its registry (an OCI referrer artifact): "
                        "a mount on any node then finds it (an index already attached is not pushed again)")
    p.set_defaults(func=cmd_index)

    mounting = argparse.ArgumentParser(add_help=False)
    mounting.add_argument("--cache-dir", metavar="D",
                          help="chunk cache directory (default ~/.cache/lazymount)")
    mounting.add_argument("--cache-size", type=parse_size, default=cache.DEFAULT_DISK_BYTES, metavar="N",
                          help="bound of the on-disk chunk cache (default 10G)")
    mounting.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                          help="fetch the landmark range [0, prefetch_end) of every layer before the mount "
                               "is ready")
    mounting.add_argument("--background-fetch", action=argparse.BooleanOptionalAction, default=True,
                          help="then fetch the rest of every layer at full speed, decompressing it "
                               "into the cache while reads pause")
    mounting.add_argument("--log-file", metavar="FILE", help="the daemon's log (default: discarded)")
    image = argparse.ArgumentParser(add_help=False, parents=[registry, mounting])
    image.add_argument("image", help="REGISTRY/NAME[:TAG|@DIGEST] or oci:DIR[:TAG]")
    sandboxed = argparse.ArgumentParser(add_help=False)
    sandboxed.add_argument("--bind", "-B", action="append", default=[], metavar="SRC[:DST[:ro]]",
                           help="bind a host path (repeatable or comma-separated; DST defaults to SRC)")
    sandboxed.add_argument("--contain", "-c", action="store_true",
                           help="bind neither the home nor the current directory")
    sandboxed.add_argument("--env", action="append", default=[], metavar="K=V",
                           help="set a variable (repeatable; over --env-file and the image's Env)")
    sandboxed.add_argument("--env-file", action="append", default=[], metavar="FILE",
                           help="K=V lines to set (repeatable; over the image's Env)")
    sandboxed.add_argument("--cleanenv", "-e", action="store_true",
                           help="pass no host variable (default: TERM, LANG, LC_*, proxy variables)")
    sandboxed.add_argument("--pwd", metavar="DIR", help="start in DIR (default: the current directory)")
    sandboxed.add_argument("--workdir-from-image", action="store_true",
                           help="start in the image's WorkingDir (default with --contain)")
    sandboxed.add_argument("--nv", action="store_true",
                           help="the host's NVIDIA driver libraries (on LD_LIBRARY_PATH), tools and devices")
    sandboxed.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                           help="copy the prefetched files to local disk and run on an overlay of them over "
                                "the mount, where overlayfs can be mounted (not with record)")
    sandboxed.add_argument("--stats-file", metavar="FILE",
                           help="write the mount's stats (as `stats --json`) here after the command")
    running = argparse.ArgumentParser(add_help=False, parents=[sandboxed])
    running.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... (default: Entrypoint + Cmd)")

    daemon = argparse.ArgumentParser(add_help=False)
    daemon.add_argument("mountpoint")
    daemon.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    daemon.add_argument("-o", dest="options", metavar="FUSE_OPTS",
                        help="extra FUSE options, e.g. allow_other")

    p = sub.add_parser("mount", parents=[image, daemon], help="mount an image read-only (FUSE)")
    p.add_argument("--layer", metavar="DIGEST", help="mount one layer as an overlayfs lower directory")
    p.set_defaults(func=cmd_mount)

    specs = argparse.ArgumentParser(add_help=False)
    specs.add_argument("specs", help="directory of layer spec files NAME.json")
    p = sub.add_parser("layers", parents=[registry, mounting, specs, daemon],
                       help="serve many layers from one daemon, each a top-level directory named after its "
                            "spec file in SPECS (what the snapshotter runs; see layerfs.py)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("umount", help="unmount (also a mount whose daemon died)")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("run", parents=[image, running], help="run a command in an image with bubblewrap")
    p.set_defaults(func=cmd_run, subparser=p)

    p = sub.add_parser("shell", parents=[image, sandboxed],
                       help="start the image's shell ($SHELL if the image has it, else /bin/sh)")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("record", parents=[image, running],
                       help="run a command like `run` and write the files it opened as a profile")
    p.add_argument("-o", "--output", type=Path, default=Path("lazymount.profile"), metavar="PROFILE",
                   help="profile to write (default: lazymount.profile)")
    p.add_argument("--append", action="store_true", help="merge into PROFILE instead of replacing it")
    p.add_argument("--push", action="store_true",
                   help="also attach this run's profile to IMAGE in its registry (an OCI referrer; the image "
                        "is not pushed again): mount and run prefetch its files")
    p.set_defaults(func=cmd_record, subparser=p)

    p = sub.add_parser("optimize", parents=[registry, layout, mounting],
                       help="convert an image with each layer's profiled files first (prefetched at mount)")
    p.add_argument("src", help="REGISTRY/NAME[:TAG] or oci:DIR[:TAG] (gzip or eStargz layers)")
    p.add_argument("dst", help="REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--profile", type=Path, action="append", default=[], metavar="FILE",
                   help="a profile from `record` (repeatable: merged in order of first appearance)")
    p.add_argument("--workload", metavar="CMD", help="record this command in SRC first (shell-style words)")
    p.set_defaults(func=cmd_optimize)

    # `lazymount snapshotter ARGS` is handed whole to snapshot_grpc.main (see main); listed for --help
    sub.add_parser("snapshotter", help="serve containerd's Snapshots API with lazy eStargz layers")

    p = sub.add_parser("stats", help="bytes fetched and served, cache hits, per layer, of a mount")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the lazymount command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["snapshotter"]:
        import snapshot_grpc  # grpc is loaded for this command only

        return snapshot_grpc.main(argv[1:])
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    log_file = getattr(args, "log_file", None)
    prefix = "%(asctime)s %(process)d " if log_file else ""
    logging.basicConfig(level=level, filename=log_file,
                        format=prefix + "lazymount: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except toc.LazymountError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {mountctl.describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, but the user still gets one line; -vv shows the traceback
        log.debug("internal error", exc_info=True)
        print(f"lazymount: internal error: {type(e).__name__}: {e} (-vv shows details)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
