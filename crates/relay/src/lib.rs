//! The road between SETs: this SET's cross-SET messages (credits of opens
//! by users homed elsewhere, notices of packets to them) carried through
//! NATS JetStream to the SET that applies them.
//!
//! Owns: the JetStream stream (`STREAM`, one subject per destination SET,
//! `hongbao.cross.<set>`, work-queue retention, file storage, a dedup window),
//! the publisher (the engine's unpublished outbox rows → JetStream, each with
//! its key as `Nats-Msg-Id`; marked published once JetStream has them
//! durably, in the background, while the next batch goes) and the consumer (this SET's durable pull consumer → the
//! engine's `apply_cross`, acked only after the apply committed).
//!
//! Must not: decide or change money. The outbox rows are written by the
//! engine in the same commit as the open or send that made them, and
//! `apply_cross` is idempotent by key on the receiving SET, so this crate
//! may lose, repeat or reorder nothing that matters: a crash anywhere
//! leaves a row unpublished (published again) or a message unacked
//! (delivered again, applied as a repeat). It holds nothing unbounded: one
//! batch out (`PUBLISH_BATCH_MAX`) at a time and at most twice that being
//! marked; in, at most `2 × APPLY_BATCH_MAX` messages being applied or
//! delivered and unacked; while NATS is away, what waits is the outbox, on
//! disk.

mod relay;

pub use relay::{start, subject, Relay, RelayConfig, RelayStatus, APPLY_BATCH_MAX, PUBLISH_BATCH_MAX, STREAM};
