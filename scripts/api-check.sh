#!/usr/bin/env bash
# The admin API against its own contract: schemathesis (PyPI) reads
# /openapi.json from a live `hongbao serve`, generates requests from it
# (valid and invalid ones) and checks every answer against it: no 5xx, the
# status, content type and body each as the document says.
#
#   scripts/api-check.sh [MAX_EXAMPLES]    # test cases per operation, default 200
#
# Needs python3 with venv (scripts/test.sh --packages-only installs it);
# schemathesis, pinned below, goes into target/api-check-venv (reused). The
# server is the debug binary target/debug/hongbao, built if missing (after
# changing the server, `cargo build -p hongbao` first). It runs in dev mode
# with a random admin key in a temporary data directory on free loopback
# ports, and is stopped by its PID when this script exits.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
max_examples=${1:-200}
target=${CARGO_TARGET_DIR:-target}
venv=$target/api-check-venv
bin=$target/debug/hongbao

if [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
[ -x "$bin" ] || cargo build -p hongbao

work=$(mktemp -d)
pid=""
stop_server() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap stop_server EXIT

key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
"$bin" serve --dev --admin-key "$key" --data "$work/data" \
    --tcp 127.0.0.1:0 --ws 127.0.0.1:0 --admin 127.0.0.1:0 >"$work/ready" 2>"$work/server.log" &
pid=$!

# `HONGBAO_READY {...}` is the only line serve writes to stdout.
deadline=$((SECONDS + 60))
until grep -q '^HONGBAO_READY ' "$work/ready"; do
    if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
        echo "api-check: the server did not get ready; its log:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
admin=$(sed -n 's/^HONGBAO_READY .*"admin":"\([^"]*\)".*/\1/p' "$work/ready")
echo "api-check: hongbao serve (pid $pid) on $admin; schemathesis $SCHEMATHESIS_VERSION, $max_examples examples per operation"

# What is checked. Not `positive_data_acceptance`: rules that span fields
# or state (a count of at most the amount, a sender who is a member, money
# on the balance) are not in the schemas, so a schema-valid request may be
# refused. Not `ignored_auth`: it cannot take away a key given by --header.
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks+=,response_schema_conformance,response_headers_conformance
checks+=,negative_data_rejection,unsupported_method,allow_header_conformance
# An invalid request refused for its size (413, from content-length, before
# it is parsed) is refused all the same; schemathesis does not count a 413
# as a rejection by default.
cat >"$work/schemathesis.toml" <<'TOML'
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
TOML

# `/v1/live` is an endless event stream: no answer to check ends. Run from
# the temporary directory: schemathesis keeps a cache of what it found
# (`.schemathesis/`) in its working directory.
status=0
schemathesis=$(realpath "$venv/bin/schemathesis")
(cd "$work" && "$schemathesis" --config-file schemathesis.toml run "http://$admin/openapi.json" \
    --header "x-api-key: $key" \
    --checks "$checks" \
    --max-examples "$max_examples" \
    --exclude-path /v1/live \
    --request-timeout 10 \
    --generation-database none \
    --no-color) || status=$?

if ! kill -0 "$pid" 2>/dev/null; then
    echo "api-check: the server died during the run; its log:" >&2
    tail -50 "$work/server.log" >&2
    status=1
fi
exit "$status"
