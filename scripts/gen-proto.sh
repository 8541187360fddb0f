#!/usr/bin/env bash
# Regenerate the Python modules (and .pyi type stubs) for the Snapshots gRPC API from
# snapshotter/api/*.proto with grpcio-tools. Run after editing a .proto; commit the output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  snapshotter/api/mount.proto snapshotter/api/snapshots.proto
rm -f snapshotter/api/mount_pb2_grpc.py   # mount.proto has no service
echo "gen-proto: regenerated snapshotter/api/{mount,snapshots}_pb2*.py{,i}" >&2
