#!/usr/bin/env bash
# Runs every fuzz target (or those named) for MINUTES minutes each, one after
# another, and says per target how many inputs ran and whether it found
# anything. Exits non-zero if any target crashed (or the build failed).
#
#   fuzz/run.sh MINUTES [TARGET...]      e.g. fuzz/run.sh 0.5, fuzz/run.sh 20 tcp_frames
#
# Needs (installs nothing): cargo on a stable toolchain (RUSTC_BOOTSTRAP=1 is
# set here for the sanitizer flags), a C++ compiler (libfuzzer-sys builds
# libFuzzer), and cargo-fuzz (`cargo install cargo-fuzz --locked`).
#
# Each target starts from its committed seeds (fuzz/corpus/<target>, read
# only) and grows a scratch corpus in fuzz/corpus-run/<target> (not
# committed; kept between runs). A crash leaves its input in
# fuzz/artifacts/<target>/; reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# Logs: fuzz/target/logs/<target>.log; one line per run is appended to
# fuzz/target/logs/history.tsv. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "usage: $0 MINUTES [TARGET...]" >&2
    exit 2
fi
seconds=$(awk -v m="$1" 'BEGIN { s = int(m * 60); print (s < 1 ? 1 : s) }')
shift
export RUSTC_BOOTSTRAP=1

all_targets=(tcp_frames ws_frames json_client_frame link_wire tokens admin_bodies)
targets=("${@:-${all_targets[@]}}")

# Largest input per target: the framing targets get room for two frames of
# the 64 KiB limit; the rest are small texts.
max_len() {
    case "$1" in
        tcp_frames | ws_frames | link_wire) echo 140000 ;;
        tokens) echo 1024 ;;
        *) echo 16384 ;;
    esac
}

# The fuzzer runs in the background so that an interrupted run stops it too:
# nothing is left behind.
child=""
cleanup() {
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

echo "== building ${targets[*]}"
if [ $# -eq 0 ]; then
    cargo fuzz build
else
    # `cargo fuzz build` takes one target or all of them.
    for t in "${targets[@]}"; do
        cargo fuzz build "$t"
    done
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="target/$triple/release"

mkdir -p target/logs
failed=()
printf '%-18s %12s %10s %8s %8s %7s  %s\n' target executions exec/s cov ft corpus result
for t in "${targets[@]}"; do
    mkdir -p "corpus-run/$t" "artifacts/$t"
    log="target/logs/$t.log"
    before=$(ls "artifacts/$t" | wc -l)
    # -max_total_time bounds the run; `timeout` is the backstop should the
    # fuzzer itself hang. -timeout: one input taking 10 s is a finding.
    set +e
    timeout --kill-after=30 $((seconds + 300)) "$bin_dir/$t" "corpus-run/$t" "corpus/$t" \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 &
    child=$!
    wait "$child"
    status=$?
    child=""
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    after=$(ls "artifacts/$t" | wc -l)
    if [ "$status" -eq 0 ] && [ "$after" -eq "$before" ]; then
        result="nothing found"
    else
        newest=$(ls -t "artifacts/$t" | head -1)
        result="FOUND (exit $status) ${newest:+artifacts/$t/$newest}; see fuzz/$log"
        failed+=("$t")
    fi
    printf '%-18s %12s %10s %8s %8s %7s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$seconds" "${execs:-0}" "${cov:-}" "${ft:-}" \
        "${corp:-}" "$result" >>target/logs/history.tsv
done

passed=$((${#targets[@]} - ${#failed[@]}))
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAIL: ${failed[*]} found a crash; see above"
    echo "fuzz: $passed passed, ${#failed[@]} failed"
    exit 1
fi
echo "PASS: ${#targets[@]} targets, ${seconds} s each, nothing found"
echo "fuzz: $passed passed, 0 failed"
