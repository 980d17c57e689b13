#!/usr/bin/env bash
# Rebuilds every strategy module into plugins/dist/ as a WebAssembly component.
#
# The output is byte-for-byte reproducible from any clone folder, given the same
# rustc and wasm-tools: CI rebuilds and fails when dist/ differs from the sources.
# Std Rust on wasm32-unknown-unknown imports nothing, and `wasm-tools component
# new` wraps the core module as a component exporting the selector (and, for a
# 0.2.0 module, importing only its contract's `types` and `logging`).
#
# Usage: plugins/build.sh        (from anywhere; needs nothing from the repo root
#                                 but wit/, and installs what is missing when it can)
set -euo pipefail

# The rustc dist/ was built with (wasm-tools': lib/wasm-tools.sh). Another
# version still builds valid modules, but they may differ byte for byte from
# the committed ones.
RUSTC_VERSION="1.95.0"

TARGET="wasm32-unknown-unknown"
# Crates built as they are: folder (relative to plugins/) -> dist/<name>.wasm,
# where <name>, the folder's last part, is also the package name.
# 0.1.0 modules first, then 0.2.0 ones.
MODULES=(round-robin least-connections weighted-round-robin fixtures/pick-last
    consistent-hash peak-ewma fixtures/probe fixtures/wrong-select)
# The hostile fixture, built once per behaviour: dist/misbehave-<feature>.wasm.
MISBEHAVIOURS=(loop trap bad-index memory flaky)
# Built for wasm32-wasip2 on purpose, so that it imports WASI: the test that
# the host grants a module nothing. dist/snoop.wasm.
WASI_FIXTURE=snoop
WASI_TARGET="wasm32-wasip2"

PLUGINS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$PLUGINS_DIR"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PLUGINS_DIR/target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(cd "$CARGO_TARGET_DIR" && pwd -P)"

warn() { echo "build.sh: warning: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }
# shellcheck source=lib/wasm-tools.sh
source "$PLUGINS_DIR/lib/wasm-tools.sh"

# --- Tools -------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
rustc_version="$(rustc --version | cut -d' ' -f2)"
[[ "$rustc_version" == "$RUSTC_VERSION" ]] ||
    warn "rustc $rustc_version, but dist/ was built with $RUSTC_VERSION: outputs may differ"

if command -v rustup >/dev/null; then
    for target in "$TARGET" "$WASI_TARGET"; do
        rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    done
else
    warn "no rustup: assuming the $TARGET standard library is installed"
fi

ensure_wasm_tools

# --- Reproducibility -----------------------------------------------------------
# Panic locations embed source paths: map every absolute one to a fixed name so
# the clone's folder, $CARGO_HOME and the rustup folder leave no trace. When
# several prefixes match, rustc applies the last, so the most specific comes last
# (the target folder usually sits inside plugins/). The encoded form keeps paths
# with spaces intact and overrides RUSTFLAGS and any rustflags in cargo config.
remaps=(
    "${CARGO_HOME:-$HOME/.cargo}=/cargo"
    "${RUSTUP_HOME:-$HOME/.rustup}=/rustup"
    "$PLUGINS_DIR=/plugins"
    "$CARGO_TARGET_DIR=/target"
)
flags=()
for remap in "${remaps[@]}"; do flags+=("--remap-path-prefix=$remap"); done
CARGO_ENCODED_RUSTFLAGS="$(IFS=$'\x1f'; echo "${flags[*]}")"
export CARGO_ENCODED_RUSTFLAGS
unset RUSTFLAGS
export CARGO_INCREMENTAL=0

cargo_build() { cargo build --release --locked --target "$TARGET" "$@"; }
core_wasm() { echo "$CARGO_TARGET_DIR/$TARGET/release/${1//-/_}.wasm"; }

# Wraps a core module as a component and drops every custom section (names,
# producers): nothing path- or machine-dependent is left to differ.
componentize() { # core.wasm out.wasm
    wasm-tools component new "$1" | wasm-tools strip --all -o "$2"
}

# Everything goes to a staging folder first, so dist/ is only touched once
# every module has built.
staging="$CARGO_TARGET_DIR/dist-staging"
rm -rf "$staging"
mkdir -p "$staging"

# --- Build ---------------------------------------------------------------------
packages=()
for dir in "${MODULES[@]}"; do packages+=(-p "$(basename "$dir")"); done
# The template is built and checked too, so it never rots, but it is not a
# module anyone loads: its component stays in the target folder, out of dist/.
cargo_build "${packages[@]}" -p template

for dir in "${MODULES[@]}"; do
    name="$(basename "$dir")"
    componentize "$(core_wasm "$name")" "$staging/$name.wasm"
done
componentize "$(core_wasm template)" "$CARGO_TARGET_DIR/template.wasm"

# One feature per build; each build overwrites the same core module, so wrap it at once.
for feature in "${MISBEHAVIOURS[@]}"; do
    cargo_build -p misbehave --features "$feature"
    componentize "$(core_wasm misbehave)" "$staging/misbehave-$feature.wasm"
done

# The WASI fixture: wasm32-wasip2 links a component itself.
cargo build --release --locked --target "$WASI_TARGET" -p "$WASI_FIXTURE"
wasm-tools strip --all "$CARGO_TARGET_DIR/$WASI_TARGET/release/$WASI_FIXTURE.wasm" \
    -o "$staging/$WASI_FIXTURE.wasm"

mkdir -p dist
# Replace this script's modules (a misbehaviour dropped from the list goes
# too); the examples' outputs belong to their own build scripts.
for dir in "${MODULES[@]}" "$WASI_FIXTURE"; do rm -f "dist/$(basename "$dir").wasm"; done
rm -f dist/misbehave-*.wasm
cp "$staging"/*.wasm dist/

check_strategy_component "$CARGO_TARGET_DIR/template.wasm"
echo
echo "plugins/dist/ (rustc $rustc_version, wasm-tools $wasm_tools_version), all valid," \
    "all but $WASI_FIXTURE importing nothing beyond their contract:"
for file in "$staging"/*.wasm; do
    file="dist/$(basename "$file")"
    if [[ "$(basename "$file")" == "$WASI_FIXTURE.wasm" ]]; then
        wasm-tools validate "$file" # imports WASI on purpose
    else
        check_strategy_component "$file"
    fi
    printf '  %-32s %7d bytes\n' "$(basename "$file")" "$(wc -c <"$file")"
done
