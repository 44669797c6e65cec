#!/usr/bin/env bash
# Build the local Kubernetes control plane used by tests/cluster (see docs/cluster.md).
#
#   tools/cluster/build.sh          build once, print the binary directory
#   tools/cluster/build.sh --dir    print the directory it would use, build nothing
#
# Binaries land in ${BERTH_CACHE:-$HOME/.cache/berth}/cluster-bin/<k8s-version>-<hash>/ where <hash>
# is the sha256 (first 12 hex digits) of every go.mod/go.sum under tools/cluster, so changing a pin
# builds a new directory and an unchanged tree is a no-op. Only the directory goes to stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.37.2"      # must match k8s.io/kubernetes in kubernetes/go.mod
ETCD_VERSION="v3.7.3"      # go.etcd.io/etcd/server/v3 in etcd/go.mod
KWOK_VERSION="v0.8.0"      # sigs.k8s.io/kwok in kwok/go.mod
HELM_VERSION="v3.22.0"     # helm.sh/helm/v3 in helm/go.mod
MODULES=(kubernetes etcd kwok helm)
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

mod_hash() {
  # Same algorithm as tests/cluster/harness.py:mod_hash(): sha256 over "<relpath>\0<content>" of the
  # sorted go.mod/go.sum files.
  (cd "$HERE" && for f in $(printf '%s\n' */go.mod */go.sum | LC_ALL=C sort); do
     printf '%s\0' "$f"; cat "$f"
   done) | sha256sum | cut -c1-12
}

CACHE="${BERTH_CACHE:-$HOME/.cache/berth}"
OUT="$CACHE/cluster-bin/${K8S_VERSION}-$(mod_hash)"

if [[ "${1:-}" == "--dir" ]]; then
  echo "$OUT"
  exit 0
fi

complete() {
  [[ -f "$OUT/.complete" && -f "$OUT/kwok-stages.yaml" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done
}

if complete; then
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not installed (need go >= 1.26)" >&2; exit 1; }

mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"
if command -v flock >/dev/null; then flock 9; fi   # a concurrent build (another session) waits here
if complete; then echo "$OUT"; exit 0; fi

STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

export GOFLAGS="-trimpath -mod=readonly"
export CGO_ENABLED=0
PAR="${BERTH_BUILD_PARALLEL:-2}"
START=$(date +%s)
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"

log() { echo "build.sh: $*" >&2; }

build() {  # build <module dir> <ldflags> <binary name>=<package>...  (skips binaries already in $OUT)
  local dir="$1" ldflags="$2"; shift 2
  local pkgs=() names=() spec
  for spec in "$@"; do
    [[ -x "$OUT/${spec%%=*}" ]] && continue
    names+=("${spec%%=*}"); pkgs+=("${spec#*=}")
  done
  [[ ${#pkgs[@]} -eq 0 ]] && return 0
  log "building ${names[*]} in tools/cluster/$dir"
  local t0; t0=$(date +%s)
  if [[ ${#pkgs[@]} -eq 1 ]]; then
    (cd "$HERE/$dir" && go build -p "$PAR" -ldflags="-s -w $ldflags" -o "$STAGE/${names[0]}" "${pkgs[0]}") >&2
  else
    (cd "$HERE/$dir" && go build -p "$PAR" -ldflags="-s -w $ldflags" -o "$STAGE/" "${pkgs[@]}") >&2
  fi
  local n
  for n in "${names[@]}"; do mv "$STAGE/$n" "$OUT/$n"; done
  log "built ${names[*]} in $(( $(date +%s) - t0 ))s"
}

kver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
kver+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
kver+=" -X k8s.io/component-base/version.buildDate=$BUILD_DATE"
kver+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1"
kver+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitTreeState=clean"

# etcd first: small, and it proves the toolchain works before the long kubernetes build.
build etcd "" etcd=go.etcd.io/etcd/server/v3
build kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" kwok=sigs.k8s.io/kwok/cmd/kwok
build helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  helm=helm.sh/helm/v3/cmd/helm
build kubernetes "$kver" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubectl=k8s.io/kubernetes/cmd/kubectl

# kwok's own stage definitions from the pinned module (the same set kwokctl uses by default):
# nodes become Ready and keep a Lease heartbeat; pods become Running+Ready, Job pods complete,
# deleted pods go away.
KWOK_SRC="$(cd "$HERE/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
{
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; cat "$KWOK_SRC/kustomize/stage/$f"
  done
} > "$STAGE/kwok-stages.yaml"
mv "$STAGE/kwok-stages.yaml" "$OUT/kwok-stages.yaml"

for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || { log "missing $b after build"; exit 1; }; done
{
  echo "kubernetes=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION"
  echo "go=$(go env GOVERSION) built=$BUILD_DATE seconds=$(( $(date +%s) - START ))"
} > "$OUT/.complete"
log "done in $(( $(date +%s) - START ))s"
echo "$OUT"
