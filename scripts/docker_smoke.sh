#!/usr/bin/env bash
# Smoke test of the robot-PC client image, where a Docker daemon is reachable (skipped otherwise):
#
#   bash scripts/docker_smoke.sh [IMAGE_TAG]
#
# Builds `--target client` with the classic builder (DOCKER_BUILDKIT=0: the stage order must let it
# skip every server stage, and no `# syntax=` line may need a registry), then checks that the image
# runs `chatvla --version` and holds no torch (the thin client's promise).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-chatvla-serve-client:smoke}

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "[docker] no Docker daemon reachable: client image smoke test skipped"
  exit 0
fi
echo "[docker] building --target client with the classic builder"
DOCKER_BUILDKIT=0 docker build -q --target client -t "$TAG" . >/dev/null
version=$(docker run --rm "$TAG" --version)
case "$version" in
  chatvla*) echo "[docker] $TAG runs: $version" ;;
  *) echo "[docker] unexpected --version output: $version" >&2; exit 1 ;;
esac
if docker run --rm --entrypoint python "$TAG" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"; then
  echo "[docker] $TAG has no torch"
else
  echo "[docker] $TAG contains torch: the client image must stay thin" >&2
  exit 1
fi
