#!/usr/bin/env bash
# Builds a Trivy DB cache dir (OUTDIR/db/trivy.db + metadata.json) from fixture advisories, offline.
# Usage: build.sh ADVISORIES.json [MORE.json ...] OUTDIR
# Skips the work when OUTDIR already holds a DB built from the same advisories content. Never downloads a DB.
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 ADVISORIES.json [MORE.json ...] OUTDIR" >&2
  exit 2
fi
outdir="${*: -1}"
inputs=("${@:1:$#-1}")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PODSWEEP_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podsweep}"

for f in "${inputs[@]}"; do
  [ -f "$f" ] || { echo "build.sh: advisories file $f does not exist" >&2; exit 2; }
done

# The tool is cached by the hash of its own source, so editing main.go rebuilds it.
src_hash="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-16)"
tool="$cache/trivydb-bin/trivydb-$src_hash"
if [ ! -x "$tool" ]; then
  mkdir -p "$cache/trivydb-bin"
  (cd "$here" && go build -trimpath -o "$tool.tmp" .)
  mv -f "$tool.tmp" "$tool"
fi

# The stamp names the tool and the advisories, in order, so either changing rebuilds the DB.
stamp="$( { echo "$src_hash"; cat "${inputs[@]}"; } | sha256sum | cut -c1-64)"
if [ -f "$outdir/db/trivy.db" ] && [ "$(cat "$outdir/db/advisories.sha256" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
mkdir -p "$outdir"
"$tool" -out "$outdir" "${inputs[@]}"
echo "$stamp" > "$outdir/db/advisories.sha256"
