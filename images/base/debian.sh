#!/usr/bin/env bash
# Base images made from Debian packages, for machines where the official bases of images/*/Dockerfile
# (python:3.11-slim, pytorch/pytorch) cannot be pulled because no container registry is reachable.
#
#   images/base/debian.sh python      -> prints the tag of a Debian Python base (stand-in for python:3.11-slim)
#   images/base/debian.sh torch-cpu   -> the same plus Debian's CPU-only PyTorch (python3-torch)
#   images/base/debian.sh --key NAME  -> print the cache key, build nothing
#
# mmdebstrap writes a root filesystem tarball from Debian's archive; `docker import` turns it into an
# image. The tarball is kept in ${BERTH_CACHE:-~/.cache/berth}/images/ under a key that hashes the
# recipe (the mmdebstrap command line, the sources, the import changes), so an unchanged base is found
# or imported instead of rebuilt; BERTH_REBUILD_BASE=1 forces a fresh one (Debian point release,
# security updates).
set -euo pipefail

SUITE="${BERTH_BASE_SUITE:-trixie}"
MIRROR="${BERTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${BERTH_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
CACHE="${BERTH_CACHE:-$HOME/.cache/berth}/images"

# What python:3.11-slim offers a Dockerfile: python and pip on PATH, CA certificates, useradd/groupadd.
# `python` and `pip` are those of a virtual environment, /opt/venv, that also sees Debian's packages
# (--system-site-packages): `pip install` there may add newer versions of Debian-installed modules
# without trying to uninstall what dpkg owns (which fails: Debian's dist-info has no RECORD).
PYTHON_PKGS=(python3 python3-venv ca-certificates)
# Debian's PyTorch is built for CPU only (no CUDA libraries); OpenBLAS instead of the reference BLAS;
# setuptools because torch's metadata requires it on Python >= 3.12 (else pip fetches it).
TORCH_PKGS=(python3-torch python3-setuptools libopenblas0-pthread)
# Files of torch's dependencies that a CPU inference server never loads, left out (~270 MB): libtorch's
# C++ test binaries, and the ROCm/LLVM libraries that only UCX's ROCm transport modules (an Open MPI
# plugin, dlopen()ed for GPU-to-GPU MPI) link. `import torch` and the server do not load any of them.
TORCH_EXCLUDES=(/usr/lib/libtorch-test/* /usr/lib/x86_64-linux-gnu/ucx/*rocm*
                /usr/lib/x86_64-linux-gnu/libamdhip64.so* /usr/lib/x86_64-linux-gnu/libamd_comgr.so*
                /usr/lib/x86_64-linux-gnu/libLLVM-17.so* /usr/lib/x86_64-linux-gnu/libhsa-runtime64.so*)

packages() {
  case "$1" in
    python) echo "${PYTHON_PKGS[*]}" ;;
    torch-cpu) echo "${PYTHON_PKGS[*]} ${TORCH_PKGS[*]}" ;;
    *) echo "debian.sh: unknown base '$1' (python | torch-cpu)" >&2; exit 2 ;;
  esac
}

log() { echo "debian.sh: $*" >&2; }

NAME="${1:-}"
[[ "$NAME" != "--key" ]] || NAME="${2:-}"
PKGS="$(packages "${NAME:?usage: debian.sh [--key] python|torch-cpu}")"

# The whole mmdebstrap command line but its output file: the cache key is its hash, so the same
# recipe finds its tarball and any change to it (packages, excludes, hooks, mirrors) builds anew.
hooks=(--customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/venv')
# Locally added trust anchors of the build machine (/usr/local/share/ca-certificates) go into the
# base, so pip inside `docker build` trusts what the machine's own pip trusts (a TLS-intercepting
# proxy's CA, a company CA). On a machine without any, nothing is copied.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  hooks+=(--customize-hook='mkdir -p "$1"/usr/local/share/ca-certificates'
          --customize-hook='copy-in /usr/local/share/ca-certificates/. /usr/local/share/ca-certificates'
          --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
fi
hooks+=(--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log')
excludes=()
if [[ "$NAME" == torch-cpu ]]; then
  for e in "${TORCH_EXCLUDES[@]}"; do excludes+=("--dpkgopt=path-exclude=$e"); done
fi
MMDEBSTRAP=(mmdebstrap --mode=root --variant=minbase --format=tar --quiet
  --include="${PKGS// /,}"
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  "${excludes[@]}"
  --aptopt='APT::Install-Recommends "false"'
  "${hooks[@]}")
SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main")
IMPORT=(--change 'ENV LANG=C.UTF-8' --change 'ENV VIRTUAL_ENV=/opt/venv'
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'CMD ["python"]')
KEY="$({ printf '%s\n' "${MMDEBSTRAP[@]}" "$SUITE" "${SOURCES[@]}" "${IMPORT[@]}"
         cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true; } | sha256sum | cut -c1-12)"
if [[ "${1:-}" == "--key" ]]; then echo "$KEY"; exit 0; fi
TAG="berth.local/base-${NAME}:${SUITE}-${KEY}"
TARBALL="$CACHE/base-${NAME}-${SUITE}-${KEY}.tar"

if [[ -z "${BERTH_REBUILD_BASE:-}" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG"; exit 0
fi

mkdir -p "$CACHE"
if [[ -n "${BERTH_REBUILD_BASE:-}" || ! -s "$TARBALL" ]]; then
  command -v mmdebstrap >/dev/null || { log "mmdebstrap is not installed (apt-get install mmdebstrap)"; exit 1; }
  t0=$(date +%s)
  log "building $NAME ($SUITE: $PKGS)"
  rm -f "$TARBALL.part"
  "${MMDEBSTRAP[@]}" "$SUITE" "$TARBALL.part" "${SOURCES[@]}"
  mv "$TARBALL.part" "$TARBALL"
  # older keys of the same base are not used any more
  find "$CACHE" -maxdepth 1 -name "base-${NAME}-*.tar*" ! -name "$(basename "$TARBALL")" -delete
  log "built $TARBALL ($(du -h "$TARBALL" | cut -f1)) in $(( $(date +%s) - t0 ))s"
fi

docker import "${IMPORT[@]}" --message "berth base $NAME from Debian $SUITE ($PKGS)" \
  "$TARBALL" "$TAG" >/dev/null
log "imported $TAG"
# older keys of the same base are not used any more
docker images "berth.local/base-${NAME}" --format '{{.Repository}}:{{.Tag}}' | grep -vxF "$TAG" | xargs -r docker rmi >/dev/null 2>&1 || true
echo "$TAG"
