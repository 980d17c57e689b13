#!/usr/bin/env bash
# The plugin author's path, as the guide gives it: `strategy new` for each
# language into a temporary folder outside the repo, its own build.sh (which
# installs what it needs: the wasm target, wasm-tools, npm packages, the C
# toolchain), then `strategy test` on the module it built, which must load
# in the sandbox, fault nowhere and use every backend. Prints each step's
# time. Usage: .ci/strategy-new.sh BINARY [LANG ...]   (default: rust js c)
set -euo pipefail
BIN="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
shift
langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(rust js c)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for lang in "${langs[@]}"; do
    dir="$work/$lang-starter"
    name="$lang-starter"
    echo "--- strategy new --lang $lang"
    started=$(date +%s)
    "$BIN" strategy new "$dir" --lang "$lang"
    (cd "$dir" && ./build.sh)
    built=$(date +%s)
    [ -f "$dir/$name.wasm" ] || { echo "strategy-new: $lang: build.sh made no $name.wasm" >&2; exit 1; }
    out="$("$BIN" strategy test "$dir/$name.wasm" --backends 3 --requests 300 --json)"
    python3 - "$lang" "$out" <<'PY'
import json, sys
lang, report = sys.argv[1], json.loads(sys.argv[2])
picks = [report["picks"][str(i)] for i in range(3)]
faults = {k: v for k, v in report["faults"].items() if v}
if faults or report["contract"] != "0.2.0" or sum(picks) != 300 or min(picks) == 0:
    sys.exit(f"strategy-new: {lang}: unexpected report: {report}")
print(f"strategy-new: {lang}: contract {report['contract']}, picks {picks}, no faults")
PY
    echo "strategy-new: $lang: new + first build $((built - started)) s"
    if [ "$lang" = rust ]; then
        # A panic must reach the author as its message, through the
        # starter's panic hook and the module's log, not as a bare trap.
        sed -i 's|^    pub fn select(&mut self, hash_key: Option<u64>, random: u64, backends: &\[Backend\]) -> Option<u32> {$|&\n        panic!("deliberate panic for the check");|' "$dir/src/lib.rs"
        grep -q 'deliberate panic for the check' "$dir/src/lib.rs" || { echo "strategy-new: could not plant the panic" >&2; exit 1; }
        (cd "$dir" && ./build.sh >/dev/null)
        if out="$("$BIN" strategy test "$dir/$name.wasm" --requests 3 2>&1)"; then
            echo "strategy-new: a panicking module passed strategy test: $out" >&2; exit 1
        fi
        grep -q '\[error\] panic: deliberate panic for the check at src/lib.rs:' <<<"$out" ||
            { echo "strategy-new: the panic message is not in the report: $out" >&2; exit 1; }
        echo "strategy-new: rust: a panic shows as: $(grep -m1 'panic:' <<<"$out" | sed 's/^ *//')"
    fi
done
echo "strategy-new: ok"
