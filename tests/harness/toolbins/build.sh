#!/usr/bin/env bash
# Builds a Go tool the deploy tests run (helm, helm3, promtool) from the Go module proxy into a cache directory keyed by
# tool and version, and does nothing when it is already there. Prints the binary's path on stdout.
# Usage: build.sh helm | build.sh helm3 | build.sh promtool | build.sh prometheus
set -euo pipefail

HELM_VERSION=4.3.2
HELM3_VERSION=3.21.4  # the chart must render the same under Helm 3 (skip v3.22.0: not served)
PROMETHEUS_VERSION=0.316.0
tool="${1:?usage: build.sh helm|helm3|promtool|prometheus}"
binary="$tool"
case "$tool" in
  helm) version="$HELM_VERSION"; pkg="helm.sh/helm/v4/cmd/helm@v$HELM_VERSION" ;;
  helm3) version="$HELM3_VERSION"; pkg="helm.sh/helm/v3/cmd/helm@v$HELM3_VERSION"; binary=helm ;;
  promtool) version="$PROMETHEUS_VERSION"; pkg="github.com/prometheus/prometheus/cmd/promtool@v$PROMETHEUS_VERSION" ;;
  prometheus) version="$PROMETHEUS_VERSION"; pkg="github.com/prometheus/prometheus/cmd/prometheus@v$PROMETHEUS_VERSION" ;;
  *) echo "build.sh: unknown tool '$tool' (expected helm, helm3, promtool or prometheus)" >&2; exit 2 ;;
esac
cache="${PODSWEEP_TOOL_BINS:-${XDG_CACHE_HOME:-$HOME/.cache}/podsweep/tool-bins}"
out="$cache/$tool-$version"
if [[ -x "$out/$tool" ]]; then echo "$out/$tool"; exit 0; fi

command -v go >/dev/null || { echo "build.sh: 'go' not found; install Go >= 1.26 to build $tool" >&2; exit 1; }
mkdir -p "$out"
# One build at a time (as tests/harness/kubebins/build.sh): a second caller waits, then finds the binary.
exec 9>"$out/.build.lock"
flock 9
if [[ -x "$out/$tool" ]]; then echo "$out/$tool"; exit 0; fi
export CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)
echo "build.sh: building $tool $version" >&2
rm -rf "$out/.gobin"
GOBIN="$out/.gobin" go install -trimpath -ldflags "-s -w" "$pkg"
mv "$out/.gobin/$binary" "$out/$tool.tmp" && rmdir "$out/.gobin"
mv "$out/$tool.tmp" "$out/$tool"   # rename last, so an interrupted build is never taken for a finished one
echo "build.sh: built $tool in $(( $(date +%s) - start ))s" >&2
echo "$out/$tool"
