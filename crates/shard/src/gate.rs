//! Each shard's shake gate: what a gateway thread may read without a round
//! trip to the shard.

use std::sync::atomic::{AtomicU64, Ordering};

use hongbao_boundary::GateState;

/// How many campaign pools run in a shard and how many of their packets
/// are ready. Written only by the shard's loop after each turn; a stale read
/// answers as the shake would have been answered a moment earlier, which is
/// all a client can tell apart anyway.
#[derive(Default)]
pub(crate) struct ShakeGate {
    pools: AtomicU64,
    ready: AtomicU64,
}

impl ShakeGate {
    /// The gate as the gateway reads it.
    pub(crate) fn state(&self) -> GateState {
        GateState { open: self.pools.load(Ordering::Relaxed) > 0, ready: self.ready.load(Ordering::Relaxed) > 0 }
    }

    /// Publishes the shard's pools; true when a copy that tells only zero
    /// from non-zero (`GateState`) would change.
    pub(crate) fn publish(&self, pools: u64, ready: u64) -> bool {
        // Stored only on change: gateway threads read these on every shake.
        let old_pools = self.pools.load(Ordering::Relaxed);
        let old_ready = self.ready.load(Ordering::Relaxed);
        if old_pools != pools {
            self.pools.store(pools, Ordering::Relaxed);
        }
        if old_ready != ready {
            self.ready.store(ready, Ordering::Relaxed);
        }
        (old_pools > 0) != (pools > 0) || (old_ready > 0) != (ready > 0)
    }
}
