#!/usr/bin/env bash
# Debian packages the image builds and the real node need (installed only when missing; root + apt-get):
# Docker (docker.io: dockerd, the CLI), mmdebstrap (base images from Debian packages), iptables, ipset,
# conntrack, iproute2 (kube-proxy, kube-router, the node's network), gcc + libseccomp-dev (runc).
set -euo pipefail
PKGS=(docker.io mmdebstrap iptables ipset conntrack iproute2 util-linux procps gcc libc6-dev libseccomp-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "packages.sh: missing Debian packages: ${missing[*]} (install them as root)" >&2; exit 1
fi
echo "packages.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
