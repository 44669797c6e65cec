#!/usr/bin/env bash
# Build what a real Kubernetes node needs, next to the local control plane of tools/cluster (see
# docs/cluster.md, "A real node"): kubelet and kube-proxy from the same k8s.io/kubernetes pin,
# containerd + its runc shim + ctr, runc, the CNI plugins, crictl, CoreDNS, kube-router (its
# NetworkPolicy firewall) and the pause binary of the sandbox image.
#
#   tools/node/build.sh          build once, print the binary directory
#   tools/node/build.sh --dir    print the directory it would use, build nothing
#
# Binaries land in ${BERTH_CACHE:-$HOME/.cache/berth}/node-bin/<k8s-version>-<hash>/ where <hash> is
# the sha256 (first 12 hex digits) of every go.mod/go.sum/*.go under tools/node and of this script, so
# changing a pin or a build flag builds a new directory and an unchanged tree is a no-op.
# Needs go >= 1.26, gcc and libseccomp-dev (runc's seccomp support and its C nsenter are cgo).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.37.2"        # k8s.io/kubernetes in kubernetes/go.mod (= tools/cluster)
CONTAINERD_VERSION="v2.4.2"  # github.com/containerd/containerd/v2 in containerd/go.mod
RUNC_VERSION="v1.5.3"        # github.com/opencontainers/runc in runc/go.mod
CNI_VERSION="v1.10.0"        # github.com/containernetworking/plugins in cni/go.mod
CRICTL_VERSION="v1.37.0"     # sigs.k8s.io/cri-tools in cri-tools/go.mod
COREDNS_VERSION="v1.15.0"    # github.com/coredns/coredns in coredns/go.mod
KUBE_ROUTER_VERSION="v2.1.0" # github.com/cloudnativelabs/kube-router/v2 in kube-router/go.mod
PAUSE_VERSION="3.10.2"       # TAG of build/pause/Makefile in k8s.io/kubernetes v1.37.2
BINARIES=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr runc crictl coredns kube-router pause
          cni/bridge cni/host-local cni/loopback cni/portmap)

node_hash() {
  (cd "$HERE" && for f in $(printf '%s\n' */go.mod */go.sum */*.go build.sh | LC_ALL=C sort); do
     printf '%s\0' "$f"; cat "$f"
   done) | sha256sum | cut -c1-12
}

CACHE="${BERTH_CACHE:-$HOME/.cache/berth}"
OUT="$CACHE/node-bin/${K8S_VERSION}-$(node_hash)"

if [[ "${1:-}" == "--dir" ]]; then
  echo "$OUT"
  exit 0
fi

complete() {
  [[ -f "$OUT/.complete" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done
}

if complete; then
  echo "$OUT"
  exit 0
fi

log() { echo "node/build.sh: $*" >&2; }
command -v go >/dev/null || { log "go is not installed (need go >= 1.26)"; exit 1; }
command -v gcc >/dev/null || { log "gcc is not installed (runc and pause are C/cgo)"; exit 1; }
[[ -f /usr/include/seccomp.h ]] || { log "libseccomp-dev is not installed (runc's seccomp support)"; exit 1; }

mkdir -p "$OUT/cni"
exec 9>"$OUT/.build.lock"
if command -v flock >/dev/null; then flock 9; fi   # a concurrent build waits here
if complete; then echo "$OUT"; exit 0; fi

STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

export GOFLAGS="-trimpath -mod=readonly"
PAR="${BERTH_BUILD_PARALLEL:-2}"
START=$(date +%s)
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"

build() {  # build <module dir> <cgo 0|1> <tags> <ldflags> <binary name>=<package>...  (skips binaries already there)
  local dir="$1" cgo="$2" tags="$3" ldflags="$4"; shift 4
  local pkgs=() names=() spec
  for spec in "$@"; do
    [[ -x "$OUT/${spec%%=*}" ]] && continue
    names+=("${spec%%=*}"); pkgs+=("${spec#*=}")
  done
  [[ ${#pkgs[@]} -eq 0 ]] && return 0
  log "building ${names[*]} in tools/node/$dir"
  local t0 n; t0=$(date +%s)
  for i in "${!pkgs[@]}"; do
    (cd "$HERE/$dir" && CGO_ENABLED="$cgo" go build -p "$PAR" -tags "$tags" -ldflags="-s -w $ldflags" \
       -o "$STAGE/$(basename "${names[$i]}")" "${pkgs[$i]}") >&2
  done
  for n in "${names[@]}"; do mv "$STAGE/$(basename "$n")" "$OUT/$n"; done
  log "built ${names[*]} in $(( $(date +%s) - t0 ))s"
}

kver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
kver+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
kver+=" -X k8s.io/component-base/version.buildDate=$BUILD_DATE"
kver+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1"
kver+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitTreeState=clean"

# The small ones first: they prove the toolchain before the long kubelet build.
# runc: cgo for its C nsenter and for libseccomp (pods run with seccompProfile RuntimeDefault).
build runc 1 "seccomp urfave_cli_no_docs" "-X main.version=${RUNC_VERSION#v}" runc=github.com/opencontainers/runc
build cni 0 "" "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
  cni/bridge=github.com/containernetworking/plugins/plugins/main/bridge \
  cni/loopback=github.com/containernetworking/plugins/plugins/main/loopback \
  cni/host-local=github.com/containernetworking/plugins/plugins/ipam/host-local \
  cni/portmap=github.com/containernetworking/plugins/plugins/meta/portmap
build cri-tools 0 "" "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" crictl=sigs.k8s.io/cri-tools/cmd/crictl
build containerd 0 "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
  "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
  containerd=github.com/containerd/containerd/v2/cmd/containerd \
  containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  ctr=github.com/containerd/containerd/v2/cmd/ctr
build coredns 0 "" "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" coredns=berth.local/tools/node/coredns
build kube-router 0 "" "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
  kube-router=github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
build kubernetes 0 "" "$kver" kubelet=k8s.io/kubernetes/cmd/kubelet kube-proxy=k8s.io/kubernetes/cmd/kube-proxy

# pause: the sandbox process of every pod, compiled from the pinned module's own source, as upstream does.
if [[ ! -x "$OUT/pause" ]]; then
  K8S_SRC="$(cd "$HERE/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-berth" -o "$STAGE/pause" "$K8S_SRC/build/pause/linux/pause.c"
  strip "$STAGE/pause" && mv "$STAGE/pause" "$OUT/pause"
fi

for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || { log "missing $b after build"; exit 1; }; done
{
  echo "kubernetes=$K8S_VERSION containerd=$CONTAINERD_VERSION runc=$RUNC_VERSION cni=$CNI_VERSION crictl=$CRICTL_VERSION"
  echo "coredns=$COREDNS_VERSION kube-router=$KUBE_ROUTER_VERSION pause=$PAUSE_VERSION"
  echo "go=$(go env GOVERSION) built=$BUILD_DATE seconds=$(( $(date +%s) - START ))"
} > "$OUT/.complete"
log "done in $(( $(date +%s) - START ))s"
echo "$OUT"
