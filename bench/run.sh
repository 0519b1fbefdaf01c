#!/usr/bin/env bash
# bench/run.sh <figure> [--quick]
#
# Measures one performance figure of hongbao on this machine and prints
#   FIGURE <name> <value> <unit> [baseline=<value> ratio=<value>]
# lines plus a plain-language line of what was run. Figures:
#   conn-memory  server RSS per idle connection (TCP and WebSocket): 19,000 on one
#                gateway process, then 100,000 over 6 gateway processes (the RSS of
#                every server process summed; clients in several processes); read
#                once all are open (awake) and again once they have parked (30 s)
#   shake-max    highest shake rate answered within 2% of target with <1% overload;
#                p50/p99 at 50k/s; server CPU per shake
#   opens        durable opens/s, group commit vs transaction-per-open (same run)
#   opens-pg     the same on a PostgreSQL server the run starts (Debian's
#                postgresql, fsync=on, synchronous_commit=on) next to SQLite's
#                figures from the same run; where PostgreSQL's time goes
#   broadcast    one broadcast to 100,000 connections over 6 gateway processes
#                (1% slow readers that never read), time until every reader has it;
#                then the same once the connections have parked
#   demo         wall time of the default `hongbao demo`
#   overload     the server pinned to one CPU, the load to the other: capacity of
#                plain shakes, keyed shakes and opens, then 2x each for 30 s: RSS,
#                every request answered, a probe's ping p50/p99
#   cluster      a cluster on this machine (2 `hongbao set` on PostgreSQL, one
#                database each; 3 `hongbao gateway`; NATS JetStream; the cluster
#                admin) against single-node `serve` on PostgreSQL, back to back:
#                shakes/s and opens/s answered through the gateways, hongbao CPU
#                per shake and per open, cross-SET credit lag p50/p99; the
#                cluster audit must pass (docs/cluster.md)
#   hop          one request and its reply between a gateway and a SET: over the
#                link (TCP) and over NATS request/reply, back to back
#   all          every figure above
#   crash        (not in all) crash torture: 200 cycles of load, kill -9, audit,
#                restart, checks that every acknowledged outcome is there once
#                (docs/robustness.md); --quick: 5 short cycles
#   crash-pg     (not in all) the same with the money on a PostgreSQL server the
#                run starts (hongbao is killed, the database lives on)
#   million      (not in all) `hongbao bench` with 1,000,000 simulated users on a
#                local server of 56 gateway processes (18,000 connections each at
#                most), 67 simulator processes of 15,000 users, a heartbeat every
#                720 s: connect at 10,000/s, a 600 s idle hold (server and
#                simulator memory every 10 s, a probe pinging every 100 ms), 30,000
#                shakes/s for 60 s with a campaign releasing 200 packets/s, a
#                broadcast to every connection, 2,000 group packets, reconciliation
#                and audit; memory per connection (server RSS, kernel slab and
#                socket buffers). Checks the system limits a million needs first.
#                --quick: 20,000 users over 2 gateways, heartbeat 30 s, idle 30 s,
#                5,000 shakes/s for 10 s (under ~2 minutes)
# --quick runs a small version of each (under a minute) as a smoke check; the
# full runs are what docs/benchmarks.md quotes. Quick conn-memory: 2,000 TCP
# connections on one gateway and 3,000 WebSocket connections over 2 gateways
# from 2 client processes; quick broadcast: 3,000 connections over 2 gateways
# from 2 client processes. Every run is bounded, targets 127.0.0.0/8
# (loopback) only, and stops the processes it starts. The binary is built in
# $CARGO_TARGET_DIR if set (else ./target).
set -euo pipefail
cd "$(dirname "$0")/.."

figure="${1:-}"
quick=""
case "${2:-}" in
    "") ;;
    --quick) quick="--quick" ;;
    *) echo "unknown option: $2 (only --quick)"; exit 2 ;;
esac
case "$figure" in
    conn-memory|shake-max|opens|opens-pg|broadcast|demo|overload|cluster|hop|crash|crash-pg|million|all) ;;
    "") ;;
    *) echo "unknown figure: $figure (conn-memory, shake-max, opens, opens-pg, broadcast, demo, overload, cluster, hop, crash, crash-pg, million, all)"; exit 2 ;;
esac
out_root="${BENCH_OUT:-target/bench}"
mkdir -p "$out_root"

if [ -z "$figure" ]; then
    sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

cargo build --release -q -p hongbao
HB="${CARGO_TARGET_DIR:-./target}/release/hongbao"
echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u +%Y-%m-%dT%H:%M:%SZ)"

shake_max() {
    local out="$out_root/shake-max"
    rm -rf "$out"
    local users steps
    if [ -n "$quick" ]; then
        users=3000; steps="10000:4,20000:4"
    else
        users=19000; steps="20000:10,40000:10,50000:10,60000:10,70000:10,80000:10,90000:10,100000:10"
    fi
    echo "ran: hongbao bench (local server in-process, simulator workers on the same machine), $users users, shake steps $steps (rate:seconds), no group phase; report in $out"
    # Steps past what the machine holds fail their "held" check, so the
    # bench's exit code is 1 by design; the figures come from summary.json,
    # and the money checks (reconciliation, audit) are judged below.
    local rc=0
    "$HB" bench --users "$users" --steps "$steps" --group-packets 0 --out "$out" </dev/null >"$out_root/shake-max.log" 2>&1 || rc=$?
    if [ ! -f "$out/summary.json" ] || [ "$rc" -gt 1 ]; then
        tail -30 "$out_root/shake-max.log"; echo "shake-max: the bench failed (log: $out_root/shake-max.log)"; return 1
    fi
    python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
GO_REFERENCE = 50000  # shakes/s, the 2017 Go reproduction on a 2-core machine (issue 4), not re-run here
best = None
figures = []
for p in s["phases"]:
    if not p["name"].startswith("shake"):
        continue
    target, got = p["target_rate"], p["answered_per_s_median"]
    over = p["overload"] / max(p["shakes_answered"], 1)
    ok = got >= 0.98 * target and over < 0.01
    cpu = p.get("server_cpu_us_per_shake")
    print(f"  step {target:>6}/s: median {got:>8.0f}/s answered, overload {over*100:.2f}%, "
          f"p50 {p['latency_ms']['p50']:.2f} ms, p99 {p['latency_ms']['p99']:.2f} ms, "
          f"server CPU {cpu if cpu is None else round(cpu, 1)} us/shake ({p.get('server_cpu_cores') or 0:.2f} cores), "
          f"simulator {round(p.get('sim_cpu_us_per_shake') or 0, 1)} us/shake ({p.get('sim_cpu_cores') or 0:.2f} cores) -> {'held' if ok else 'missed'}")
    if ok and (best is None or target > best["target_rate"]):
        best = p
    if target == 50000 and ok:
        figures.append(f"FIGURE shake_p50_at_50k {p['latency_ms']['p50']:.2f} ms")
        figures.append(f"FIGURE shake_p99_at_50k {p['latency_ms']['p99']:.2f} ms")
if best:
    v = best["answered_per_s_median"]
    figures.append(f"FIGURE shake_max {v:.0f} shakes/s baseline={GO_REFERENCE} ratio={v / GO_REFERENCE:.2f}")
    if best.get("server_cpu_us_per_shake") is not None:
        figures.append(f"FIGURE shake_server_cpu {best['server_cpu_us_per_shake']:.1f} us/shake")
else:
    print("  no step held: no shake_max figure")
failed = [c["name"] for c in s["checks"] if not c["pass"] and " held " not in c["name"]]
print(f"  money and reconciliation checks: {'all PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
# Figures only from a run whose money checks passed.
if not failed:
    print("\n".join(figures))
sys.exit(1 if failed else 0)
PY
}

demo() {
    local out="$out_root/demo"
    rm -rf "$out"
    echo "ran: hongbao demo ${quick:-(default plan)}, report in $out"
    local start end
    start=$(date +%s.%N)
    "$HB" demo $quick --out "$out" </dev/null >"$out_root/demo.log" 2>&1 \
        || { tail -30 "$out_root/demo.log"; echo "demo: failed (log: $out_root/demo.log)"; return 1; }
    end=$(date +%s.%N)
    python3 -c "import sys; s, e = float(sys.argv[1]), float(sys.argv[2]); print(f'FIGURE demo_wall_s {e - s:.1f} s (target 120)')" "$start" "$end"
}

# One process holds at most ~19,000 connections here (20,000 open files), so
# 100,000 take 6 gateway processes (18,000 each at most) and 6 client
# processes (`perf hold`, 18,000 each, one loopback address each).
conn_memory() {
    if [ -n "$quick" ]; then
        "$HB" perf conn-memory --quick --transport tcp --park-after-s 5 || return 1
        "$HB" perf conn-memory --connections 3000 --transport ws --gateways 2 --clients-per-process 1600 --park-after-s 5 || return 1
    else
        "$HB" perf conn-memory || return 1
        "$HB" perf conn-memory --connections 100000 --gateways 6 || return 1
    fi
}

broadcast() {
    if [ -n "$quick" ]; then
        "$HB" perf broadcast --connections 3000 --gateways 2 --clients-per-process 1500
        "$HB" perf broadcast --connections 3000 --gateways 2 --clients-per-process 1500 --parked-after-s 2
    else
        "$HB" perf broadcast --connections 100000 --gateways 6
        # The same to connections that have parked (idle 30 s): every one is
        # woken by the notice.
        "$HB" perf broadcast --connections 100000 --gateways 6 --parked-after-s 30
    fi
}

# Pins the server to CPU 0 and itself (load and probe) to CPU 1 (taskset).
overload() {
    "$HB" perf overload $quick
}

crash() {
    if [ -n "$quick" ]; then
        "$HB" perf crash --quick "$@"
    else
        "$HB" perf crash --cycles 200 "$@"
    fi
}

# What a million connections need of this machine, printed, and a clear
# failure if it cannot hold them: every connection is two descriptors (the
# simulated user's and the server's), each process holds its share below its
# open-file limit, each simulated user binds a source port of its own below
# the ephemeral range, and memory for the server, the simulator and the
# kernel's sockets.
million_limits() {
    local users=$1 per_worker=$2 gateways=$3
    local per_gateway=$(( (users + gateways - 1) / gateways ))
    local per_process=$(( per_gateway > per_worker ? per_gateway : per_worker ))
    # Room for the spread SO_REUSEPORT leaves between gateways (~2.5 standard
    # deviations at 18,000 each is ~+340) and the runtime's own descriptors.
    local need_files=$(( per_process + 1000 ))
    local need_system=$(( 2 * users + 50000 ))
    # Per user: ~2.4 KB simulator + ~1.8 KB server + ~9 KB kernel slab per
    # client+server socket pair (measured, docs/benchmarks.md), rounded up;
    # plus 2 GiB for the rest.
    local need_kb=$(( users * 16 + 2 * 1024 * 1024 ))
    local file_max nr_open soft hard ports low high avail ct_max ct_count ok=1
    file_max=$(cat /proc/sys/fs/file-max)
    nr_open=$(cat /proc/sys/fs/nr_open)
    soft=$(ulimit -Sn); hard=$(ulimit -Hn)
    read -r low high < /proc/sys/net/ipv4/ip_local_port_range
    avail=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
    echo "# limits for $users users ($per_worker per simulator process, $per_gateway per gateway process):"
    echo "#   fs.file-max $file_max (need >= $need_system: 2 descriptors per connection + slack)"
    echo "#   fs.nr_open $nr_open, ulimit -n soft $soft / hard $hard (need soft >= $need_files per process)"
    echo "#   ip_local_port_range $low-$high (simulated users bind 10000..$(( 10000 + per_worker - 1 )) per worker: must be below it, and below 32768)"
    echo "#   MemAvailable $(( avail / 1024 )) MiB (need >= $(( need_kb / 1024 )) MiB: ~16 KB per user + 2 GiB)"
    echo "#   net.core.somaxconn $(cat /proc/sys/net/core/somaxconn), tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog), tcp_mem (pages) $(cat /proc/sys/net/ipv4/tcp_mem)"
    if [ "$file_max" -lt "$need_system" ]; then
        echo "million: fs.file-max $file_max < $need_system (sysctl -w fs.file-max=$need_system)"; ok=0
    fi
    if [ "$soft" != unlimited ] && [ "$soft" -lt "$need_files" ]; then
        echo "million: open-file limit $soft < $need_files per process (ulimit -n $need_files; hard $hard, fs.nr_open $nr_open)"; ok=0
    fi
    if [ "$nr_open" -lt "$need_files" ]; then
        echo "million: fs.nr_open $nr_open < $need_files"; ok=0
    fi
    if [ $(( 10000 + per_worker )) -gt 32768 ] || { [ "$low" -lt $(( 10000 + per_worker )) ] && [ "$high" -ge 10000 ]; }; then
        echo "million: the simulator's source ports 10000..$(( 10000 + per_worker - 1 )) overlap the ephemeral range $low-$high or pass 32767 (fewer --users-per-worker, or raise the range's start)"; ok=0
    fi
    if [ "$avail" -lt "$need_kb" ]; then
        echo "million: $(( avail / 1024 )) MiB available < $(( need_kb / 1024 )) MiB"; ok=0
    fi
    if [ -r /proc/sys/net/netfilter/nf_conntrack_max ]; then
        ct_max=$(cat /proc/sys/net/netfilter/nf_conntrack_max)
        ct_count=$(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0)
        echo "#   nf_conntrack_max $ct_max, nf_conntrack_count $ct_count (connections are tracked only if a firewall rule asks)"
        if [ "$ct_count" -gt 0 ] && [ "$ct_max" -lt $(( users + 10000 )) ]; then
            echo "million: connection tracking is on and nf_conntrack_max $ct_max < $(( users + 10000 ))"; ok=0
        fi
    fi
    [ "$ok" = 1 ] || { echo "million: this machine cannot hold $users connections as set up (see above)"; return 1; }
}

# 1,000,000 simulated users against a local server (issue 14): one process
# holds at most ~19,000 connections here, so 56 gateway processes of one
# server (1,000,000 / 18,000 rounded up) and 67 simulator processes.
million() {
    local out="$out_root/million"
    rm -rf "$out"
    local users gateways per_worker heartbeat idle steps group park=30 connect_rate=10000
    if [ -n "$quick" ]; then
        # Connections park 5 s after logging in (30 s by default) and
        # jemalloc returns what they freed ~10 s later: the hold's flat
        # window (its second half) starts after both.
        users=20000; gateways=2; per_worker=10000; heartbeat=30; idle=40; steps="5000:10"; group=200; park=5
    else
        # 60 gateway processes: 16,667 connections each on average, so the
        # kernel's uneven spread stays under the 18,000 a gateway holds.
        # 30,000 shakes/s as the seed's reproduction: at a million
        # connections this 2-core machine answers less (16-25k/s measured,
        # docs/benchmarks.md "A million connections"), so the "held" check
        # fails and the answered rate is the figure, as in shake-max.
        users=1000000; gateways=60; per_worker=15000; heartbeat=720; idle=600; steps="30000:60"; group=2000
    fi
    million_limits "$users" "$per_worker" "$gateways" || return 1
    local args=(bench --users "$users" --gateways "$gateways" --users-per-worker "$per_worker"
        --heartbeat-s "$heartbeat" --connect-rate "$connect_rate" --idle-s "$idle" --steps "$steps"
        --campaign-rate 200 --group-packets "$group" --park-after-s "$park" --out "$out")
    echo "ran: hongbao ${args[*]} (local server in-process with $gateways gateway processes, simulator workers on the same machine); log $out_root/million.log"
    local rc=0
    "$HB" "${args[@]}" </dev/null >"$out_root/million.log" 2>&1 || rc=$?
    if [ ! -f "$out/summary.json" ]; then
        tail -30 "$out_root/million.log"; echo "million: the bench failed (exit $rc; log: $out_root/million.log)"; return 1
    fi
    sed -n '/^  users (workers)/,$p' "$out_root/million.log"
    python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
# As in shake-max, a shake rate past what the machine holds fails its "held"
# check by design (and the release schedule slips with it): the figures come
# from a run whose connection, memory, broadcast and money checks passed.
failed = [c["name"] for c in s["checks"] if not c["pass"]]
rate_checks = [n for n in failed if " held " in n or n == "packets released at the campaign rate"]
others = [n for n in failed if n not in rate_checks]
print(f"  checks: {'all PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
if others:
    sys.exit(1)
if rate_checks:
    print("  the shake rate was not held (its answered median and p99 are the figures)")
m, b, idle = s["memory"], s["broadcast"], s.get("idle") or {}
kernel = m.get("kernel") or {}
shake = next(p for p in s["phases"] if p["name"] == "shake-1")
probe = idle.get("probe") or {}
drift = idle.get("server_rss_drift") or {}
figures = [
    ("million_connections_held", s["connections_held"], "connections"),
    ("million_connect_s", round(s["connect_s"], 1), "s"),
    ("million_server_rss_per_conn", m.get("server_rss_bytes_per_conn_end_of_idle"), "B/conn (idle: parked)"),
    ("million_server_rss_per_conn_connected", m.get("server_rss_bytes_per_conn"), "B/conn (right after connecting)"),
    ("million_sim_rss_per_user", s["sim_rss_bytes_per_user"], "B/user"),
    ("million_kernel_slab_per_conn", kernel.get("slab_bytes_per_conn"), "B/conn (client+server socket pair)"),
    ("million_kernel_sockstat_per_conn", kernel.get("sockstat_bytes_per_conn"), "B/conn (client+server socket pair)"),
    ("million_broadcast_ms", b.get("last_ms"), "ms"),
    ("million_shake_rate_answered", round(shake["answered_per_s_median"]),
     f"shakes/s (target {shake['target_rate']}, {'held' if not rate_checks else 'not held'})"),
    ("million_shake_p99", round(shake["latency_ms"]["p99"], 2), "ms"),
    ("million_probe_ping_p99", probe.get("p99_ms"), "ms (target 10)"),
    ("million_server_rss_drift_idle", drift.get("bytes"), "B over the idle hold"),
]
if kernel and abs(kernel["tcp_inuse_per_conn"] - 2) > 0.05:
    print(f"  note: TCP sockets grew by {kernel['tcp_inuse_per_conn']:.2f} per connection, not 2: other work on "
          "the machine moved the kernel figures (they are the whole machine's)")
missing = [name for name, value, _ in figures if value is None]
for name, value, unit in figures:
    if value is not None:
        print(f"FIGURE {name} {value} {unit}")
if missing:
    print(f"  not measured: {', '.join(missing)}")
    sys.exit(1)
PY
}

run_one() {
    case "$1" in
        conn-memory) conn_memory ;;
        shake-max) shake_max ;;
        opens) "$HB" perf opens $quick ;;
        opens-pg) "$HB" perf opens --store both $quick ;;
        broadcast) broadcast ;;
        demo) demo ;;
        overload) overload ;;
        cluster) "$HB" perf cluster $quick ;;
        hop) "$HB" perf hop $quick ;;
        crash) crash ;;
        crash-pg) crash --postgres ;;
        million) million ;;
    esac
}

if [ "$figure" = "all" ]; then
    failed=()
    for f in conn-memory shake-max opens opens-pg broadcast overload cluster hop demo; do
        echo "== $f"
        run_one "$f" || failed+=("$f")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed: ${failed[*]}"
        exit 1
    fi
else
    run_one "$figure"
fi
