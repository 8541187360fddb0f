"""Generated gRPC/protobuf modules for containerd's Snapshots API (see scripts/gen-proto.sh)."""
