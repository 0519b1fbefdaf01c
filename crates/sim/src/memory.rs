//! What holding the connections costs in memory: the server's resident
//! memory summed over its processes, the kernel's memory for sockets, both
//! per connection; and the idle hold's memory series and its drift.
//!
//! Everything is read from `/proc` (`hongbao_client::procfs`); the
//! arithmetic is plain functions, tested on numbers. Kernel figures are the
//! whole machine's: on loopback both ends of every connection (the
//! simulated user's socket and the server's) are on this machine, so a
//! kernel figure per connection is per client + server pair, and anything
//! else running on the machine moves it too.

use hongbao_client::procfs::{self, Slab, TcpSockets};
use serde::Serialize;

/// The idle hold's memory series starts counting drift only this far into
/// the hold (or half the hold, if shorter): right after the connect phase
/// the server's blocking-pool threads that served the hellos are still
/// idling out (10 s) and the allocator is still giving back the burst's
/// buffers, which is the connect phase's cost, not drift.
pub const IDLE_SETTLE_S: f64 = 30.0;
/// Memory is sampled this often during the idle hold (more often in holds
/// under a minute, so a short hold still has a series).
pub const IDLE_SAMPLE_EVERY_S: u64 = 10;
/// The server's resident memory is flat over the idle hold if it grew by
/// less than both of these from the first settled sample to the last. 2 %
/// is what a leak of ~40 B per connection per 10 minutes would show at a
/// million; 16 MiB bounds it on small runs, where the server's fixed
/// memory (runtime, SQLite cache, metrics) is most of its RSS and 2 % of it
/// is a few MiB of allocator noise.
pub const FLAT_GROWTH_SHARE_MAX: f64 = 0.02;
pub const FLAT_GROWTH_BYTES_MAX: i64 = 16 * 1024 * 1024;

/// The server's processes, found again at every reading: the ones named
/// (the serve process first) and the children of the first (its gateway
/// processes, by their parent pid), less the processes to leave out (the
/// bench's own simulator workers, when the server runs in the bench's
/// process and they are its children too).
#[derive(Clone, Debug, Default)]
pub struct ServerProcesses {
    pub named: Vec<u32>,
}

impl ServerProcesses {
    pub fn pids(&self, exclude: &[u32]) -> Vec<u32> {
        let Some(&serve) = self.named.first() else { return Vec::new() };
        let mut pids: Vec<u32> = self.named.iter().copied().chain(procfs::children(serve)).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| !exclude.contains(p));
        pids
    }

    /// Resident memory of every server process, summed; `None` when the
    /// server's processes are not known (a remote server without
    /// `--server-pid`) or none can be read.
    pub fn rss(&self, exclude: &[u32]) -> Option<u64> {
        let readings: Vec<u64> = self.pids(exclude).into_iter().filter_map(procfs::rss_bytes).collect();
        (!readings.is_empty()).then(|| readings.iter().sum())
    }
}

/// The kernel's socket-related memory at one instant (whole machine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelReading {
    pub slab_bytes: u64,
    pub slab_reclaimable_bytes: u64,
    pub slab_unreclaimable_bytes: u64,
    /// `/proc/net/sockstat`'s TCP line.
    pub tcp_inuse: u64,
    pub tcp_alloc: u64,
    pub tcp_mem_pages: u64,
}

impl KernelReading {
    pub fn of(slab: Slab, tcp: TcpSockets) -> KernelReading {
        KernelReading {
            slab_bytes: slab.total,
            slab_reclaimable_bytes: slab.reclaimable,
            slab_unreclaimable_bytes: slab.unreclaimable,
            tcp_inuse: tcp.inuse,
            tcp_alloc: tcp.alloc,
            tcp_mem_pages: tcp.mem_pages,
        }
    }

    /// Now; `None` if `/proc/meminfo` or `/proc/net/sockstat` cannot be read.
    pub fn now() -> Option<KernelReading> {
        Some(KernelReading::of(procfs::slab()?, procfs::tcp_sockets()?))
    }
}

/// `after - before` bytes shared over `connections`, signed: memory may
/// shrink between two readings (the kernel drops caches, the allocator
/// returns pages).
pub fn per_connection(before: u64, after: u64, connections: u64) -> i64 {
    (after as i64 - before as i64) / connections.max(1) as i64
}

/// Kernel memory per connection, from a reading before the connect phase
/// and one after it settled.
#[derive(Clone, Debug, Serialize)]
pub struct KernelSummary {
    pub before: KernelReading,
    pub after: KernelReading,
    pub connections: u64,
    /// Bytes of a page, the unit of `tcp_mem_pages`.
    pub page_size: u64,
    /// Growth of `Slab` per connection, and its two parts.
    pub slab_bytes_per_conn: i64,
    pub slab_reclaimable_bytes_per_conn: i64,
    pub slab_unreclaimable_bytes_per_conn: i64,
    /// Growth of the TCP sockets' buffer memory (`sockstat` `mem` × page
    /// size) per connection: what buffered data costs (little when idle).
    pub sockstat_bytes_per_conn: i64,
    /// Growth of TCP sockets in use per connection (2 on loopback: both ends).
    pub tcp_inuse_per_conn: f64,
    pub note: &'static str,
}

pub const KERNEL_NOTE: &str = "whole machine; on loopback both ends of each connection are on this machine, so \
                                per connection means per client + server socket pair";

impl KernelSummary {
    pub fn of(before: KernelReading, after: KernelReading, connections: u64, page_size: u64) -> KernelSummary {
        let per = |b: u64, a: u64| per_connection(b, a, connections);
        KernelSummary {
            before,
            after,
            connections,
            page_size,
            slab_bytes_per_conn: per(before.slab_bytes, after.slab_bytes),
            slab_reclaimable_bytes_per_conn: per(before.slab_reclaimable_bytes, after.slab_reclaimable_bytes),
            slab_unreclaimable_bytes_per_conn: per(before.slab_unreclaimable_bytes, after.slab_unreclaimable_bytes),
            sockstat_bytes_per_conn: per(before.tcp_mem_pages * page_size, after.tcp_mem_pages * page_size),
            tcp_inuse_per_conn: (after.tcp_inuse as f64 - before.tcp_inuse as f64) / connections.max(1) as f64,
            note: KERNEL_NOTE,
        }
    }
}

/// Memory per connection: the server's RSS (all its processes) and the
/// kernel's, before the connect phase, once it settled, and at the end of
/// the idle hold (when the connections have been idle longest).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemorySummary {
    /// Users connected when the after-connect reading was taken.
    pub connections: u64,
    /// Server processes summed (serve process and gateway children), at
    /// the after-connect reading; 0 when the server's pids are unknown.
    pub server_processes: usize,
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_after_connect_bytes: Option<u64>,
    pub server_rss_end_of_idle_bytes: Option<u64>,
    pub server_rss_bytes_per_conn: Option<i64>,
    pub server_rss_bytes_per_conn_end_of_idle: Option<i64>,
    /// Seconds waited after the connect phase for the server's RSS to settle.
    pub settle_s: f64,
    pub kernel: Option<KernelSummary>,
}

/// One reading of the idle hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct IdleSample {
    /// Seconds into the hold.
    pub at_s: f64,
    /// The server's processes summed (`None`: not known).
    pub server_rss_bytes: Option<u64>,
    /// Every simulator worker summed (their last per-second report).
    pub sim_rss_bytes: u64,
    /// Users connected (their last per-second report).
    pub connected: i64,
}

/// How much a series grew from its first settled sample to its last.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Drift {
    pub from_s: f64,
    pub to_s: f64,
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// `to - from`: negative when it shrank.
    pub bytes: i64,
    /// `bytes` as a share of `from_bytes`, in percent.
    pub pct: f64,
}

impl Drift {
    /// Whether the growth is within both bounds (`FLAT_*`).
    pub fn flat(&self) -> bool {
        self.bytes < FLAT_GROWTH_BYTES_MAX && self.pct < FLAT_GROWTH_SHARE_MAX * 100.0
    }
}

/// How often to sample a hold of `hold_s` seconds: every 10 s, or a sixth
/// of a hold under a minute (at least every second).
pub fn sample_every_s(hold_s: u64) -> u64 {
    (hold_s / 6).clamp(1, IDLE_SAMPLE_EVERY_S)
}

/// Where drift starts counting in a hold of `hold_s`: `IDLE_SETTLE_S`, or
/// half the hold if that is shorter.
pub fn settle_s(hold_s: u64) -> f64 {
    IDLE_SETTLE_S.min(hold_s as f64 / 2.0)
}

/// The drift of `value` over `samples` (in time order), from the first
/// sample at or after `from_s` to the last; `None` without two distinct
/// such samples with values.
pub fn drift(samples: &[IdleSample], from_s: f64, value: impl Fn(&IdleSample) -> Option<u64>) -> Option<Drift> {
    let settled: Vec<(f64, u64)> =
        samples.iter().filter(|s| s.at_s >= from_s).filter_map(|s| Some((s.at_s, value(s)?))).collect();
    let [(from_s, from), .., (to_s, to)] = settled[..] else { return None };
    let bytes = to as i64 - from as i64;
    Some(Drift { from_s, to_s, from_bytes: from, to_bytes: to, bytes, pct: bytes as f64 * 100.0 / from.max(1) as f64 })
}

/// The idle hold as it ran.
#[derive(Clone, Debug, Serialize)]
pub struct IdleSummary {
    pub duration_s: f64,
    pub samples: Vec<IdleSample>,
    /// Drift counted from this far into the hold (`settle_s`).
    pub settle_s: f64,
    pub server_rss_drift: Option<Drift>,
    pub sim_rss_drift: Option<Drift>,
    /// Users connected at the end of the hold; reconnects and connection
    /// errors during it.
    pub connected_end: i64,
    pub reconnects: u64,
    pub conn_errors: u64,
    pub probe: Option<crate::probe::ProbeSummary>,
    /// Why there is no probe summary, if there is none.
    pub probe_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: f64, server: Option<u64>) -> IdleSample {
        IdleSample { at_s, server_rss_bytes: server, sim_rss_bytes: 1_000, connected: 5 }
    }

    #[test]
    fn drift_counts_from_the_first_settled_sample_to_the_last() {
        let samples = [
            sample(0.0, Some(500)),
            sample(10.0, Some(900)),
            sample(30.0, Some(1_000)),
            sample(40.0, None),
            sample(50.0, Some(1_010)),
        ];
        let d = drift(&samples, 30.0, |s| s.server_rss_bytes).unwrap();
        assert_eq!((d.from_s, d.to_s, d.from_bytes, d.to_bytes, d.bytes), (30.0, 50.0, 1_000, 1_010, 10));
        assert!((d.pct - 1.0).abs() < 1e-9);
        assert!(d.flat());
        // A shrinking series drifts negatively and is flat.
        let d = drift(&[sample(30.0, Some(1_000)), sample(40.0, Some(900))], 30.0, |s| s.server_rss_bytes).unwrap();
        assert_eq!(d.bytes, -100);
        assert!(d.flat());
    }

    #[test]
    fn drift_needs_two_settled_samples() {
        assert_eq!(drift(&[], 0.0, |s| s.server_rss_bytes), None);
        assert_eq!(drift(&[sample(0.0, Some(1)), sample(30.0, Some(2))], 30.0, |s| s.server_rss_bytes), None);
        assert_eq!(drift(&[sample(30.0, None), sample(40.0, None)], 30.0, |s| s.server_rss_bytes), None);
    }

    #[test]
    fn flat_means_under_both_bounds() {
        let d = |from: u64, bytes: i64| Drift {
            from_s: 30.0,
            to_s: 600.0,
            from_bytes: from,
            to_bytes: (from as i64 + bytes) as u64,
            bytes,
            pct: bytes as f64 * 100.0 / from as f64,
        };
        // 1 GiB grown by 15 MiB: 1.5 %, under 16 MiB.
        assert!(d(1 << 30, 15 << 20).flat());
        // 4 GiB grown by 20 MiB: 0.5 %, but over 16 MiB.
        assert!(!d(4 << 30, 20 << 20).flat());
        // 100 MiB grown by 3 MiB: under 16 MiB, but 3 %.
        assert!(!d(100 << 20, 3 << 20).flat());
    }

    #[test]
    fn sampling_and_settling_scale_with_short_holds() {
        assert_eq!((sample_every_s(600), settle_s(600)), (10, 30.0));
        assert_eq!((sample_every_s(30), settle_s(30)), (5, 15.0));
        assert_eq!((sample_every_s(3), settle_s(3)), (1, 1.5));
    }

    #[test]
    fn per_connection_figures_are_signed_deltas() {
        assert_eq!(per_connection(1_000, 21_000, 10), 2_000);
        assert_eq!(per_connection(21_000, 1_000, 10), -2_000);
        assert_eq!(per_connection(0, 500, 0), 500);
        let before = KernelReading {
            slab_bytes: 1_000_000,
            slab_reclaimable_bytes: 600_000,
            slab_unreclaimable_bytes: 400_000,
            tcp_inuse: 3,
            tcp_alloc: 5,
            tcp_mem_pages: 10,
        };
        let after = KernelReading {
            slab_bytes: 5_000_000,
            slab_reclaimable_bytes: 1_600_000,
            slab_unreclaimable_bytes: 3_400_000,
            tcp_inuse: 2_003,
            tcp_alloc: 2_005,
            tcp_mem_pages: 60,
        };
        let k = KernelSummary::of(before, after, 1_000, 4096);
        assert_eq!(
            (k.slab_bytes_per_conn, k.slab_reclaimable_bytes_per_conn, k.slab_unreclaimable_bytes_per_conn),
            (4_000, 1_000, 3_000)
        );
        assert_eq!(k.sockstat_bytes_per_conn, 50 * 4096 / 1_000);
        assert_eq!(k.tcp_inuse_per_conn, 2.0);
    }
}
