#!/bin/sh
# Regenerate the flat gRPC stubs at the repository top level from the vendored protos.
# Usage: protos/generate.sh [PYTHON]   (default: .venv/bin/python; needs grpcio-tools)
# With --check: regenerate into a temp dir and fail if the committed stubs differ (CI).
set -eu
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
CHECK=
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        *) PYTHON=$arg ;;
    esac
done
OUT=.
if [ -n "$CHECK" ]; then
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
fi
"$PYTHON" -m grpc_tools.protoc -I protos --python_out="$OUT" --grpc_python_out="$OUT" \
    protos/mount.proto protos/snapshots.proto
# grpc_tools also writes mount_pb2_grpc.py, empty because mount.proto has no service.
rm -f "$OUT/mount_pb2_grpc.py"
if [ -n "$CHECK" ]; then
    for f in mount_pb2.py snapshots_pb2.py snapshots_pb2_grpc.py; do
        if ! cmp -s "$OUT/$f" "$f"; then
            echo "$f is not current: run protos/generate.sh" >&2
            exit 1
        fi
    done
fi
