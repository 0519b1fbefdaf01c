#!/usr/bin/env python3
"""Server memory through a burst of connections that never say hello.

    bench/prehello_burst.py [--bin target/release/hongbao] [--conns 1900]
                            [--frame-bytes 512] [--runs 3] [--env K=V ...]

Starts `hongbao serve --dev` (temporary data directory, loopback ports),
reads its VmRSS (/proc/<pid>/status) idle, then opens --conns TCP
connections that each send the start of one frame (a header announcing
--frame-bytes, and all of the body but its last byte) and hold it; reads
VmRSS while they are held, then closes them all and reads VmRSS 2 s and
15 s later. Prints one line per run and the medians. --env passes variables
to the server only (e.g. MALLOC_ARENA_MAX=2, LD_PRELOAD=...libjemalloc.so.2).

Bounded: at most --conns connections (<= 5000), each run stops after ~40 s;
loopback only (127.0.0.1, clients from 127.0.0.2); the server is started
and killed by PID. The caps on connections without hello are raised to
--conns where the binary has them, so the burst measures memory, not
refusals (a binary before them holds the burst within --max-connections).
"""

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CONNS_MAX = 5000
READY_TIMEOUT_S = 60
HOLD_SETTLE_S = 2.0
AFTER_S = (2, 15)


def vm_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(binary, conns, env_extra, data):
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    args = [binary, "serve", "--dev", "--data", data, "--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--max-connections", str(conns + 100), "--hello-timeout-s", "120"]
    if "--max-pending-hello" in help_text:
        args += ["--max-pending-hello", str(conns + 50), "--max-pending-hello-per-ip", str(conns + 50)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HONGBAO_")}
    env["RUST_LOG"] = "warn"
    env.update(env_extra)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("HONGBAO_READY "):
            addrs = json.loads(line[len("HONGBAO_READY "):])
            host, port = addrs["tcp"].rsplit(":", 1)
            return proc, (host, int(port))
    proc.kill()
    proc.wait()
    raise RuntimeError("server did not start")


def one_run(binary, conns, frame_bytes, env_extra):
    with tempfile.TemporaryDirectory(prefix="hongbao-burst-") as tmp:
        proc, addr = start_server(binary, conns, env_extra, os.path.join(tmp, "data"))
        socks = []
        try:
            time.sleep(1.0)
            idle = vm_rss_kb(proc.pid)
            partial = struct.pack(">I", frame_bytes) + b"\0" * (frame_bytes - 1)
            for _ in range(conns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.2", 0))
                s.connect(addr)
                s.sendall(partial)
                socks.append(s)
            time.sleep(HOLD_SETTLE_S)
            # Connections the server refused (a larger frame than it takes
            # before hello) have been closed by it: count the open ones.
            open_count = 0
            for s in socks:
                s.setblocking(False)
                try:
                    s.recv(1)
                except BlockingIOError:
                    open_count += 1
                except OSError:
                    pass
            held = vm_rss_kb(proc.pid)
            for s in socks:
                s.close()
            socks = []
            after = []
            start = time.monotonic()
            for wait_s in AFTER_S:
                time.sleep(max(0.0, start + wait_s - time.monotonic()))
                after.append(vm_rss_kb(proc.pid))
            return {"idle_kb": idle, "held_kb": held, "open": open_count,
                    **{f"after_{w}s_kb": a for w, a in zip(AFTER_S, after)}}
        finally:
            for s in socks:
                s.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/hongbao")
    p.add_argument("--conns", type=int, default=1900)
    p.add_argument("--frame-bytes", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--env", action="append", default=[], help="K=V for the server")
    a = p.parse_args()
    if not 1 <= a.conns <= CONNS_MAX or a.frame_bytes < 2 or not 1 <= a.runs <= 10:
        sys.exit(f"--conns 1..{CONNS_MAX}, --frame-bytes >= 2, --runs 1..10")
    env_extra = dict(kv.split("=", 1) for kv in a.env)
    rows = []
    for i in range(a.runs):
        row = one_run(a.bin, a.conns, a.frame_bytes, env_extra)
        rows.append(row)
        print(f"run {i + 1}: " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    keys = rows[0].keys()
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    mb = lambda kb: f"{kb / 1024:.1f}"
    print(f"median of {a.runs}: VmRSS idle {mb(med['idle_kb'])} MB, holding {a.conns} partial frames of "
          f"{a.frame_bytes} B ({med['open']:.0f} open) {mb(med['held_kb'])} MB, closed +2 s "
          f"{mb(med['after_2s_kb'])} MB, +15 s {mb(med['after_15s_kb'])} MB "
          f"[bin={a.bin} env={' '.join(a.env) or '-'}]")


if __name__ == "__main__":
    main()
