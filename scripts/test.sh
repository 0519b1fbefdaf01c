#!/usr/bin/env bash
# The test command: installs the system packages the tests need that this
# machine lacks (Debian 12, apt), then runs every test of the workspace, then
# the web tests (web/run-tests.sh: the browser client and the two pages in
# headless Chromium, against the target/debug/hongbao that `cargo test` built).
# Arguments go to `cargo test --workspace` (a test name filter, `-- --nocapture`).
# `scripts/test.sh --packages-only` installs the packages and stops there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# Tests stop server child processes with SIGTERM through `kill` (procps; std
# has no SIGTERM and the workspace forbids unsafe code); the PostgreSQL
# harness SIGKILLs postmasters the same way.
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || missing+=(procps)
# The demo's plots want a TrueType font for their text.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# The full-disk test limits the server's file size with prlimit (when it
# cannot mount a small tmpfs); perf overload pins processes with taskset; the
# PostgreSQL harness runs PostgreSQL as the `postgres` user with runuser when
# the tests run as root (PostgreSQL refuses root) and frees the shared memory
# of killed servers with ipcrm.
tools=(prlimit taskset ipcrm)
[ "$(id -u)" -ne 0 ] || tools+=(runuser)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || { missing+=(util-linux); break; }
done
# The allocator, jemalloc (tikv-jemalloc-sys), is built from its C source
# with its configure script and make.
command -v cc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
# The fuzz step of .ci/run builds libFuzzer from source (libfuzzer-sys): a
# C++ compiler.
command -v c++ >/dev/null || missing+=(g++)
# scripts/api-check.sh (a section of .ci/run) installs schemathesis from
# PyPI into a venv: Debian's python3 has no venv module (ensurepip) without
# python3-venv, and a fresh image may have no python3 at all.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
# The store's PostgreSQL tests start throwaway servers (crates/pg-harness)
# with initdb, pg_ctl, psql and pg_basebackup. Installing the package may
# also create and start Debian's default cluster; the tests never use it.
if [ -z "${HONGBAO_PG_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
fi
# The cluster tests start their own NATS (with JetStream) and Redis servers
# (crates/harness), in temporary directories on free loopback ports, with
# Debian's binaries (nats-server is in /usr/sbin, which a user's PATH may
# lack; HONGBAO_NATS_SERVER / HONGBAO_REDIS_SERVER name others). On a machine
# with systemd the packages also start a default service (nats-server on
# port 4222, redis-server on 6379); the tests never use them, and the harness
# picks no port below 20000.
if [ -z "${HONGBAO_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
    missing+=(nats-server)
fi
if [ -z "${HONGBAO_REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    missing+=(redis-server)
fi
# The web tests (web/run-tests.sh) drive Debian's Chromium headless through
# playwright-core, whose own browser download cannot work here; a CJK font
# draws the pages' Chinese in their screenshots. Node.js and npm run them
# (the machine image has Node 20; Debian's nodejs otherwise).
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)

# .ci/run checks and unit-tests the Prometheus rules in docs/ with promtool,
# which comes in Debian's `prometheus` package; installed without its
# recommends (the node exporter). On a machine with systemd the package
# starts a Prometheus server on port 9090; nothing here uses it or depends
# on it. Where services are not started (a container's policy-rc.d, as on
# this machine) none runs.
no_recommends=()
command -v promtool >/dev/null || no_recommends+=(prometheus)

if [ ${#missing[@]} -gt 0 ] || [ ${#no_recommends[@]} -gt 0 ]; then
    echo "installing ${missing[*]} ${no_recommends[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
    $SUDO apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    if [ ${#no_recommends[@]} -gt 0 ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${no_recommends[@]}"
    fi
fi

if [ "${1:-}" = "--packages-only" ]; then
    exit 0
fi

# Some tests hold over a thousand sockets: the soft limit up to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo test --workspace "$@"
# `cargo test` has built target/debug/hongbao, the server the web tests start.
web/run-tests.sh
