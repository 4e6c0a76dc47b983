#!/usr/bin/env bash
# Regenerate the Python stubs of proto/chatvla/v1/*.proto into src/chatvla/v1/.
# `--check` regenerates into a temporary folder and fails if the committed stubs differ (run by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=src
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); fi
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/chatvla/v1/policy.proto
if [ "${1:-}" = "--check" ]; then
  for f in policy_pb2.py policy_pb2.pyi policy_pb2_grpc.py; do
    if ! cmp -s "$out/chatvla/v1/$f" "src/chatvla/v1/$f"; then
      echo "stale generated stub: src/chatvla/v1/$f (run scripts/gen_proto.sh)" >&2; exit 1
    fi
  done
  rm -rf "$out"; echo "generated stubs are in sync"
fi
