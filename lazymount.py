"""The lazymount command line.

What belongs here: argument parsing, turning errors into one-line messages and exit codes, and the
adapters a user starts (commands).  What never does: format, registry or cache logic — those live in
toc.py, fetch.py, cache.py and convert.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import convert
import toc

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


def _read_path_list(path: Path) -> list[str]:
    """A prioritized-files list: one path per line; blank lines and '#' comments ignored."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def cmd_convert(args: argparse.Namespace) -> int:
    options = convert.ConvertOptions(chunk_size=args.chunk_size, fmt=toc.ZSTD if args.zstd else toc.GZIP,
                                      level=args.level, workers=args.jobs, progress=not args.quiet)
    if args.prioritize:
        options.prioritize_all = _read_path_list(args.prioritize)
    if args.src.startswith("oci:"):
        if not args.dst.startswith("oci:"):
            raise convert.ImageError("an oci: source needs an oci:DIR[:TAG] destination")
        manifest = convert.convert_image(args.src, args.dst, options)
        for layer in manifest["layers"]:
            print(f"{layer['digest']}  {layer['size']:>12}  "
                  f"toc {layer['annotations'].get(convert.TOC_DIGEST_ANNOTATION, '-')}")
        return 0
    info = convert.convert_layer_file(Path(args.src), Path(args.dst), options, options.prioritize_all)
    print(json.dumps({"digest": info.digest, "size": info.size, "diffID": info.diff_id,
                      "tocDigest": info.toc_digest, "uncompressedSize": info.uncompressed_size,
                      "entries": info.entries, "annotations": info.annotations}, indent=2))
    return 0


def _file_reader(path: Path):
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned handle

    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)
    return f, read_at


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.src.startswith("oci:"):
        directory, tag = convert.parse_oci_ref(args.src)
        layout = convert.OCILayout(directory)
        _, manifest = layout.manifest(tag)
        layers = [(d["digest"], layout.blob_path(d["digest"]),
                   (d.get("annotations") or {}).get(convert.TOC_DIGEST_ANNOTATION))
                  for d in manifest["layers"]]
        if args.layer:
            layers = [layer for layer in layers if layer[0] == args.layer]
            if not layers:
                raise convert.ImageError(f"{args.src} has no layer {args.layer}")
    else:
        layers = [(args.src, Path(args.src), None)]
    reports = []
    for name, path, toc_digest in layers:
        f, read_at = _file_reader(path)
        with f:
            size = path.stat().st_size
            if args.toc:
                _, toc_json = toc.read_toc_json(read_at, size, toc_digest)
                sys.stdout.write(toc_json.decode("utf-8", "replace") + "\n")
                continue
            reports.append({"layer": name, **convert.describe_layer(read_at, size, toc_digest)})
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for report in reports:
            _print_layer_report(report)
    return 0


def _print_layer_report(report: dict) -> None:
    print(f"{report['layer']}\n  format: {report['format']}, {report['size']} bytes")
    if "entries" in report:
        counts = ", ".join(f"{v} {k}" for k, v in report["entries"].items() if v and k not in ("bytes",))
        print(f"  entries: {counts}\n  file bytes: {report['entries']['bytes']}, largest chunk: "
              f"{report['largest_chunk']}\n  landmark: {report['landmark']}\n  toc: {report['toc_digest']} "
              f"({report['toc_bytes']} bytes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a layer or an image to eStargz")
    p.add_argument("src", help="layer file (.tar, .tar.gz, .tar.zst) or oci:DIR[:TAG]")
    p.add_argument("dst", help="output blob file, or oci:DIR[:TAG]")
    p.add_argument("--prioritize", type=Path, metavar="FILE",
                   help="paths (one a line) to place first, before .prefetch.landmark")
    p.add_argument("--chunk-size", type=parse_size, default=toc.DEFAULT_CHUNK_SIZE, metavar="N")
    p.add_argument("--zstd", action="store_true", help="write zstd:chunked instead of gzip eStargz")
    p.add_argument("--level", type=int, default=3, help="compression level (gzip: 0-3 isa-l; zstd: 1-22)")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N", help="threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="show the layers of an eStargz blob or image")
    p.add_argument("src", help="layer blob file or oci:DIR[:TAG]")
    p.add_argument("--toc", action="store_true", help="print the TOC JSON")
    p.add_argument("--layer", metavar="DIGEST", help="only this layer of an image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the lazymount command line; return the exit status."""
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="lazymount: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except toc.LazymountError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, but the user still gets one line; -vv shows the traceback
        log.debug("internal error", exc_info=True)
        print(f"lazymount: internal error: {type(e).__name__}: {e} (-vv shows details)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
