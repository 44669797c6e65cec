#!/usr/bin/env bash
# Install the official Node `openai` SDK, pinned, under ~/.cache/berth/node/openai-<version> (once),
# and print its node_modules directory. The gateway's SDK tests call it (tests/gateway/test_sdks.py).
# node and npm come from Debian (`apt-get install nodejs npm`) when absent and we are root.
# openai 7.x needs node >= 22; 6.x runs on the node 20 Debian/NodeSource ship.
set -euo pipefail
VERSION="${BERTH_OPENAI_NODE_VERSION:-6.49.0}"
DIR="${BERTH_CACHE:-$HOME/.cache/berth}/node/openai-$VERSION"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
  else
    echo "node_openai.sh: node and npm are needed (apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
if [[ ! -f "$DIR/node_modules/openai/package.json" ]]; then
  TMP="$DIR.tmp.$$"
  rm -rf "$TMP" && mkdir -p "$TMP"
  echo '{"private": true}' >"$TMP/package.json"
  npm install --prefix "$TMP" --no-audit --no-fund --omit=peer --loglevel=error "openai@$VERSION" >&2
  rm -rf "$DIR" && mv "$TMP" "$DIR"
fi
echo "$DIR/node_modules"
