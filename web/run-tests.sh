#!/usr/bin/env bash
# The web tests: type-check the browser code (tsc over JSDoc, no build step),
# then run web/test/*.test.mjs with Node's test runner. Each test starts its
# own `hongbao serve --dev` (HONGBAO_BIN, default target/debug/hongbao, which
# `cargo test` or `cargo build -p hongbao` builds) and drives Debian's
# Chromium (/usr/bin/chromium) headless. Arguments go to `node --test`
# (e.g. --test-name-pattern=dashboard).
set -euo pipefail
cd "$(dirname "$0")/.."

export HONGBAO_BIN="${HONGBAO_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/hongbao}"
[ -x "$HONGBAO_BIN" ] || { echo "web tests: no server binary at $HONGBAO_BIN (cargo build -p hongbao)" >&2; exit 1; }
[ -x /usr/bin/chromium ] || [ -n "${CHROMIUM:-}" ] || { echo "web tests: no /usr/bin/chromium (scripts/test.sh --packages-only installs it)" >&2; exit 1; }

# The pinned dev dependencies (package-lock.json), installed again when the
# lock file changed since the last install.
if [ ! -f web/node_modules/.package-lock.json ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== web: type check (tsc -p web)"
(cd web && npx --no-install tsc -p .)
echo "== web: browser and client tests (node --test web/test/)"
node --test "$@" web/test/
