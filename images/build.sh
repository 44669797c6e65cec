#!/usr/bin/env bash
# `make images`: build the operator, server (CUDA) and server-cpu images with Docker.
#
#   images/build.sh                      all three
#   images/build.sh operator server-cpu  some of them
#
# Each Dockerfile names its official base image in `ARG BASE_IMAGE=` (python:3.11-slim,
# pytorch/pytorch:...-cuda...). Where that base is present or can be pulled, the build uses it
# unchanged. Where it cannot (no container registry reachable), the base is made from Debian packages
# (images/base/debian.sh: mmdebstrap + `docker import`; for the CUDA server, PyPI's CUDA build of torch
# on top, images/base/torch-cuda.Dockerfile) and passed as --build-arg BASE_IMAGE. BERTH_IMAGE_BASES
# forces the choice: `official` (fail when it cannot be pulled) or `local` (always the Debian bases).
# Local bases are cached: the root filesystem tarball in ~/.cache/berth/images, the imported image in
# Docker itself; the images' own layers are Docker's build cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REGISTRY="${REGISTRY:-ghcr.io/berth-dev}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
BASES="${BERTH_IMAGE_BASES:-auto}"
NAMES=("$@")
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=(operator server server-cpu)

log() { echo "images/build.sh: $*" >&2; }
docker info >/dev/null 2>&1 || { log "no Docker engine answers (docker info); start one (tools/docker/engine.sh start)"; exit 1; }

official_base() {  # the default of `ARG BASE_IMAGE=` in images/<name>/Dockerfile
  sed -n 's/^ARG BASE_IMAGE=//p' "images/$1/Dockerfile" | head -1
}

pullable() {
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  docker pull --quiet "$1" >/dev/null 2>&1
}

# The torch of the local CUDA base: the one the official base image carries (pytorch/pytorch:<torch>-cuda...).
cuda_torch_version() {
  official_base server | sed -n 's#^pytorch/pytorch:\([0-9.]*\)-cuda.*#\1#p'
}

local_base() {
  case "$1" in
    operator) images/base/debian.sh python ;;
    server-cpu) images/base/debian.sh torch-cpu ;;
    server)
      local py torch tag
      py="$(images/base/debian.sh python)"
      torch="$(cuda_torch_version)"
      [[ -n "$torch" ]] || { log "cannot read the torch version from images/server/Dockerfile's BASE_IMAGE"; exit 1; }
      tag="berth.local/base-torch-cuda:${torch}-${py##*:}"
      if ! docker image inspect "$tag" >/dev/null 2>&1; then
        log "building $tag (torch==$torch from PyPI, with its CUDA libraries)"
        docker build --network host --build-arg "BASE_IMAGE=$py" --build-arg "TORCH_VERSION=$torch" \
          -f images/base/torch-cuda.Dockerfile -t "$tag" images/base >&2
      fi
      echo "$tag" ;;
    *) log "unknown image $1 (operator | server | server-cpu)"; exit 2 ;;
  esac
}

for name in "${NAMES[@]}"; do
  [[ -f "images/$name/Dockerfile" ]] || { log "no images/$name/Dockerfile"; exit 2; }
  t0=$(date +%s)
  official="$(official_base "$name")"
  args=()
  case "$BASES" in
    official) base="$official" ;;
    local) base="$(local_base "$name")" ;;
    auto)
      if pullable "$official"; then base="$official"
      else log "$official cannot be pulled: using a base made from Debian packages"; base="$(local_base "$name")"; fi ;;
    *) log "BERTH_IMAGE_BASES must be auto, official or local (got '$BASES')"; exit 2 ;;
  esac
  if [[ "$base" != "$official" ]]; then
    args+=(--build-arg "BASE_IMAGE=$base")
    # The Debian torch-cpu base already has a CPU torch; nothing is fetched from the CPU wheel index.
    [[ "$name" == server-cpu ]] && args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
  fi
  tag="$REGISTRY/berth-$name:$VERSION"
  log "building $tag (base $base)"
  docker build --network host "${args[@]}" -f "images/$name/Dockerfile" -t "$tag" . >&2
  log "built $tag in $(( $(date +%s) - t0 ))s ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
done
# Earlier builds' images (now untagged) only take disk space.
docker image prune --force >/dev/null 2>&1 || true
