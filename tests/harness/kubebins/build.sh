#!/usr/bin/env bash
# Builds the control-plane binaries podsweep's integration tests run (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok) into a cache directory keyed by
# version, and does nothing when they are already there. Prints the directory on stdout.
set -euo pipefail

K8S_VERSION=1.36.3
ETCD_VERSION=3.6.6
KWOK_VERSION=0.7.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PODSWEEP_KUBE_BINS:-${XDG_CACHE_HOME:-$HOME/.cache}/podsweep/kube-bins}"
out="$cache/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

missing=()
for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build.sh: 'go' not found; install Go >= 1.26 to build the test control plane" >&2; exit 1; }
mkdir -p "$out"
# One build at a time: test sessions started together (or a test beside CI) wait here for the first one's build,
# then find the binaries and build nothing.
exec 9>"$out/.build.lock"
flock 9
missing=()
for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then echo "$out"; exit 0; fi
export CGO_ENABLED=0 GOFLAGS=-mod=mod
ldflags="-s -w"
start=$(date +%s)
for b in "${missing[@]}"; do
  echo "build.sh: building $b" >&2
  case "$b" in
    etcd) (cd "$here/etcd" && go build -trimpath -ldflags "$ldflags" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3) ;;
    kwok) GOBIN="$out/.gobin" go install -trimpath -ldflags "$ldflags" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" \
            && mv "$out/.gobin/kwok" "$out/kwok.tmp" && rmdir "$out/.gobin" ;;
    *) (cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b") ;;
  esac
  mv "$out/$b.tmp" "$out/$b"   # rename last, so an interrupted build is never taken for a finished one
done
echo "build.sh: built ${missing[*]} in $(( $(date +%s) - start ))s" >&2
echo "$out"
