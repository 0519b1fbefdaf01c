//! What every connection task of one gateway shares, and what each
//! admitted connection holds.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use hongbao_boundary::sync::lock;
use hongbao_proto::{Reply, ShakeResult};
use metrics::Gauge;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::limits::{PENDING_TABLE_SHRINK_MIN, REJECTS_INFLIGHT_MAX};
use crate::park::Parking;
use crate::GatewayConfig;

/// State every connection task shares.
pub(crate) struct Shared<B> {
    pub config: GatewayConfig,
    pub engine: B,
    /// Flips to `true` once, when the server is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// One permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Bounds the work spent telling refused WebSocket clients why.
    pub rejects: Arc<Semaphore>,
    /// Connections not past `hello` yet, in all and per source address.
    pub pending: Arc<PendingTable>,
    pub hot_counters: HotCounters,
    /// Where idle connections park; `None` if they never do.
    pub parking: Option<Parking>,
    /// Never sent on: it is dropped with the last `Arc<Shared>`, held by the
    /// accept loops and every connection task, which closes `done_rx`.
    _done_tx: mpsc::Sender<()>,
}

impl<B> Shared<B> {
    pub(crate) fn new(
        config: GatewayConfig,
        engine: B,
        shutdown: watch::Receiver<bool>,
        parking: Option<Parking>,
    ) -> (Arc<Shared<B>>, mpsc::Receiver<()>) {
        let (done_tx, done_rx) = mpsc::channel(1);
        let shared = Shared {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            rejects: Arc::new(Semaphore::new(REJECTS_INFLIGHT_MAX)),
            pending: Arc::new(PendingTable::new(config.max_pending_hello, config.max_pending_hello_per_ip)),
            hot_counters: HotCounters::new(),
            parking,
            config,
            engine,
            shutdown,
            _done_tx: done_tx,
        };
        (Arc::new(shared), done_rx)
    }
}

/// What an admitted connection holds until it ends: its permit, and its
/// place in the open-connections gauge.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Admission {
    pub(crate) fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Admission {
        open.increment(1.0);
        Admission { _permit: permit, open }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// The connections that have not said `hello` yet, counted in all and per
/// source address, so strangers cannot take every connection slot, and one
/// address cannot take every stranger's.
///
/// Bounded: an address has an entry only while it has a pending connection
/// (entries are removed at zero), and every pending connection counts
/// toward `total_max`, so the map never holds more than `total_max` entries
/// (`max_pending_hello`, 4,500 by default: ~100 KiB at most). After a burst
/// from many addresses it gives its memory back (`release`).
pub(crate) struct PendingTable {
    total_max: usize,
    per_source_max: usize,
    counts: Mutex<PendingCounts>,
    /// `hongbao_connections_pending_hello`.
    gauge: Gauge,
}

#[derive(Default)]
struct PendingCounts {
    total: usize,
    /// Pending connections per source (`source_key`); never a zero.
    by_source: HashMap<IpAddr, u32>,
}

/// Why a connection was not admitted among the pending ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingRefused {
    /// `max_pending_hello` connections are waiting for hello.
    Total,
    /// `max_pending_hello_per_ip` of them come from this address.
    PerSource,
}

impl PendingRefused {
    /// The `reason` label of `hongbao_connections_rejected_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PendingRefused::Total => "pending_hello",
            PendingRefused::PerSource => "pending_hello_per_ip",
        }
    }

    /// What the refused peer is told.
    pub(crate) fn message(self) -> &'static str {
        match self {
            PendingRefused::Total => "too many connections waiting for hello",
            PendingRefused::PerSource => "too many connections from your address waiting for hello",
        }
    }
}

/// The address a peer's pending connections are counted under: an IPv4
/// address (also when it comes mapped into IPv6), or an IPv6 address's /64
/// prefix, because one IPv6 host commonly holds a whole /64 and could
/// otherwise pick a fresh address for every connection.
fn source_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

impl PendingTable {
    pub(crate) fn new(total_max: usize, per_source_max: usize) -> PendingTable {
        PendingTable {
            total_max,
            per_source_max,
            counts: Mutex::new(PendingCounts::default()),
            gauge: metrics::gauge!("hongbao_connections_pending_hello"),
        }
    }

    /// Admits a new connection from `peer` among the pending ones, until
    /// the returned guard is dropped.
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<PendingHello, PendingRefused> {
        let source = source_key(peer);
        let mut counts = lock(&self.counts);
        if counts.total >= self.total_max {
            return Err(PendingRefused::Total);
        }
        let from_source = counts.by_source.get(&source).copied().unwrap_or(0);
        if from_source as usize >= self.per_source_max {
            return Err(PendingRefused::PerSource);
        }
        counts.by_source.insert(source, from_source + 1);
        counts.total += 1;
        debug_assert!(counts.by_source.len() <= counts.total && counts.total <= self.total_max);
        drop(counts);
        self.gauge.increment(1.0);
        Ok(PendingHello { table: self.clone(), source })
    }

    fn release(&self, source: IpAddr) {
        let mut counts = lock(&self.counts);
        counts.total -= 1;
        if let Entry::Occupied(mut entry) = counts.by_source.entry(source) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        } else {
            debug_assert!(false, "a pending connection's source has no count");
        }
        // A burst from many addresses leaves a large table behind: give its
        // memory back once it is mostly empty.
        let (len, capacity) = (counts.by_source.len(), counts.by_source.capacity());
        if capacity > PENDING_TABLE_SHRINK_MIN && len * 4 < capacity {
            counts.by_source.shrink_to(len * 2);
        }
        drop(counts);
        self.gauge.decrement(1.0);
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let counts = lock(&self.counts);
        (counts.total, counts.by_source.len())
    }
}

/// A connection's place among those not past `hello`: given back when
/// dropped (hello succeeded, or the connection ended).
pub(crate) struct PendingHello {
    table: Arc<PendingTable>,
    source: IpAddr,
}

impl Drop for PendingHello {
    fn drop(&mut self) {
        self.table.release(self.source);
    }
}

/// Metric handles of what a busy server does most, made once per gateway
/// (the `counter!` and `histogram!` macros look their labels up in the
/// registry on every call): `hongbao_requests_total` of shakes that find
/// nothing and heartbeats (answered here), `hongbao_request_seconds` of the
/// requests the engine answers most (shakes that reach a shard, opens).
pub(crate) struct HotCounters {
    shake_none: metrics::Counter,
    shake_not_running: metrics::Counter,
    ping: metrics::Counter,
    shake_seconds: metrics::Histogram,
    open_seconds: metrics::Histogram,
    /// `hongbao_overload_read_pauses_total`: counted when the server is
    /// saturated, so it too is looked up once.
    pub(crate) overload_read_pauses: metrics::Counter,
}

impl HotCounters {
    pub(crate) fn new() -> HotCounters {
        let requests = |op: &'static str, result: &'static str| metrics::counter!("hongbao_requests_total", "op" => op, "result" => result);
        HotCounters {
            shake_none: requests("shake", "none"),
            shake_not_running: requests("shake", "not_running"),
            ping: requests("ping", "ok"),
            shake_seconds: metrics::histogram!("hongbao_request_seconds", "op" => "shake"),
            open_seconds: metrics::histogram!("hongbao_request_seconds", "op" => "open"),
            overload_read_pauses: metrics::counter!("hongbao_overload_read_pauses_total"),
        }
    }

    /// Records how long a request of `op` took to answer.
    pub(crate) fn record_latency(&self, op: &'static str, seconds: f64) {
        match op {
            "shake" => self.shake_seconds.record(seconds),
            "open" => self.open_seconds.record(seconds),
            _ => metrics::histogram!("hongbao_request_seconds", "op" => op).record(seconds),
        }
    }

    pub(crate) fn get(&self, op: &'static str, reply: &Reply) -> Option<&metrics::Counter> {
        match (op, reply) {
            ("shake", Reply::Shake(ShakeResult::None)) => Some(&self.shake_none),
            ("shake", Reply::Shake(ShakeResult::NotRunning)) => Some(&self.shake_not_running),
            ("ping", Reply::Pong) => Some(&self.ping),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_are_capped_in_all_and_per_source_and_forgotten_at_zero() {
        let table = Arc::new(PendingTable::new(4, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = table.admit(a).unwrap();
        let a2 = table.admit(a).unwrap();
        assert_eq!(table.admit(a).err(), Some(PendingRefused::PerSource));
        // The same address mapped into IPv6 is the same source.
        assert_eq!(table.admit("::ffff:10.0.0.1".parse().unwrap()).err(), Some(PendingRefused::PerSource));
        let b1 = table.admit(b).unwrap();
        let c1 = table.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(table.admit("10.0.0.3".parse().unwrap()).err(), Some(PendingRefused::Total));
        assert_eq!(table.counts(), (4, 3));
        drop((a1, b1, c1));
        assert_eq!(table.counts(), (1, 1), "sources without pending connections are removed");
        drop(a2);
        assert_eq!(table.counts(), (0, 0));
        table.admit(a).unwrap();
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let table = Arc::new(PendingTable::new(100, 2));
        let _held =
            [table.admit("2001:db8:0:1::1".parse().unwrap()), table.admit("2001:db8:0:1:ffff::9".parse().unwrap())];
        assert_eq!(table.admit("2001:db8:0:1:1234::".parse().unwrap()).err(), Some(PendingRefused::PerSource));
        assert!(table.admit("2001:db8:0:2::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_table_gives_its_memory_back_after_a_burst() {
        let table = Arc::new(PendingTable::new(10_000, 1));
        let held: Vec<_> = (0..5_000u32).map(|i| table.admit(IpAddr::from(i.to_be_bytes())).unwrap()).collect();
        let peak = lock(&table.counts).by_source.capacity();
        drop(held);
        let after = lock(&table.counts).by_source.capacity();
        assert!(after <= PENDING_TABLE_SHRINK_MIN && after < peak, "capacity {peak} -> {after}");
    }
}
