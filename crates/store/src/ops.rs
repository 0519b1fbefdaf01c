//! The writer's contract: every operation that changes durable state, and
//! what each one answers.
//!
//! Each operation is its own type (`Deposit`, `OpenShare`, …) with its own
//! outcome type (`Op::Outcome`), so a completion receives exactly what its
//! operation can answer and nothing else. The writer queues them as one
//! closed enum (`Command`), applies each with its own function, and settles
//! every completion only after the transaction holding it has committed — or
//! with the batch's error if it did not. Nothing here knows SQL: a store
//! applies these, this module only says what they are.

use hongbao_core::campaign::{CampaignSpec, CampaignStatus};
use hongbao_core::cross::{CrossKind, CrossMessage};
use hongbao_core::packet::Recipients;
use hongbao_core::sets::SetId;
use hongbao_core::split::SplitKind;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};

/// Why an operation did not happen. Every variant but `Storage`,
/// `QueueFull` and `Stale` is a decision on the request itself; with those
/// three nothing was applied and the same request may be retried.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OpError {
    #[error("insufficient funds: balance {balance_fen} fen, needs {needed_fen} fen")]
    InsufficientFunds { balance_fen: i64, needed_fen: i64 },
    #[error("idempotency key was already used for a different request")]
    KeyConflict,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The batch holding the operation did not commit, or the writer has stopped.
    #[error("storage failed: {0}; restart the server to recover")]
    Storage(String),
    /// `Writer::try_submit` found the queue full; nothing was queued.
    #[error("the writer's queue is full")]
    QueueFull,
    /// The sender has too many undelivered notices stored.
    #[error("{0}")]
    RateLimited(String),
    /// The operation was decided on state that storage no longer has (an
    /// earlier operation it built on failed); the caller reloads and retries.
    #[error("{0} changed since this was decided")]
    Stale(String),
}

impl From<hongbao_core::ledger::LedgerError> for OpError {
    fn from(e: hongbao_core::ledger::LedgerError) -> Self {
        match e {
            hongbao_core::ledger::LedgerError::InsufficientFunds { balance_fen, needed_fen } => {
                OpError::InsufficientFunds { balance_fen, needed_fen }
            }
            other => OpError::Invalid(other.to_string()),
        }
    }
}

/// What runs when an operation is settled: on the writer thread, after the
/// commit (keep it short; hand anything slow to another task).
pub struct Completion<T>(Box<dyn FnOnce(Result<T, OpError>) + Send>);

impl<T> Completion<T> {
    pub fn new(f: impl FnOnce(Result<T, OpError>) + Send + 'static) -> Completion<T> {
        Completion(Box::new(f))
    }

    fn complete(self, result: Result<T, OpError>) {
        (self.0)(result)
    }
}

/// An operation with its completion, queued to the writer. Applying it sets
/// `result`; settling it runs the completion once the batch's fate is known.
pub struct Slot<O: Op> {
    pub op: O,
    result: Option<Result<O::Outcome, OpError>>,
    done: Completion<O::Outcome>,
}

impl<O: Op> Slot<O> {
    pub(crate) fn new(op: O, done: Completion<O::Outcome>) -> Slot<O> {
        Slot { op, result: None, done }
    }

    /// Records what applying the operation decided; it reaches the
    /// completion only if the batch commits.
    pub(crate) fn decided(&mut self, result: Result<O::Outcome, OpError>) {
        debug_assert!(self.result.is_none(), "{} applied twice", O::NAME);
        self.result = Some(result);
    }

    /// True once applied with an Ok decision.
    pub(crate) fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn settle(self, failure: Option<&OpError>) {
        let result = match failure {
            Some(e) => Err(e.clone()),
            None => self.result.unwrap_or_else(|| panic!("{} committed without being applied", O::NAME)),
        };
        self.done.complete(result);
    }
}

/// An operation the writer can apply. Implemented by each operation type
/// through `commands!` below; the outcome type is what its completion gets.
pub trait Op: Send + Sized + 'static {
    type Outcome: Send + 'static;
    /// The `op` label of `hongbao_writer_ops_total`.
    const NAME: &'static str;
    fn into_command(slot: Slot<Self>) -> Command;
}

macro_rules! commands {
    ($($(#[$doc:meta])* $variant:ident => $outcome:ty, $name:literal;)*) => {
        /// Every operation the writer applies: a closed set, so a store
        /// sees each kind and can apply it in its own way.
        pub enum Command {
            $($(#[$doc])* $variant(Slot<$variant>),)*
        }

        $(impl Op for $variant {
            type Outcome = $outcome;
            const NAME: &'static str = $name;
            fn into_command(slot: Slot<Self>) -> Command {
                Command::$variant(slot)
            }
        })*

        impl Command {
            pub fn name(&self) -> &'static str {
                match self {
                    $(Command::$variant(_) => $name,)*
                }
            }

            /// Runs the completion: with the decision when `failure` is
            /// `None` (the batch committed), else with that error.
            pub(crate) fn settle(self, failure: Option<&OpError>) {
                match self {
                    $(Command::$variant(slot) => slot.settle(failure),)*
                }
            }

            /// True once applied with an Ok decision (for metrics).
            pub(crate) fn succeeded(&self) -> bool {
                match self {
                    $(Command::$variant(slot) => slot.succeeded(),)*
                }
            }
        }
    };
}

commands! {
    Deposit => MoneyMoved, "deposit";
    Withdraw => MoneyMoved, "withdraw";
    /// Debit the sender, create the packet, store a message for each recipient.
    FundPacket => Funded, "fund_packet";
    /// One share of a packet to a user.
    OpenShare => (), "open";
    /// The committed share of a user in a packet, if any.
    FindClaim => Option<i64>, "find_claim";
    /// An expired packet's remainder back to its sender, once.
    Refund => Refunded, "refund";
    ReserveIds => (), "reserve_ids";
    CreateCampaign => CampaignCreated, "create_campaign";
    StartCampaign => (), "start_campaign";
    ShakeWin => ShakeWon, "shake_win";
    FindShakeWin => Option<FirstWin>, "find_shake_win";
    /// Everything left in a campaign's escrow back to its funder.
    CloseCampaign => CampaignClosed, "close_campaign";
    StoreMessages => Vec<(UserId, u64)>, "store_messages";
    AckMessage => bool, "ack_message";
    ChangeGroup => Vec<UserId>, "change_group";
    /// A message of another SET applied here, once per key.
    ApplyCross => CrossApplied, "apply_cross";
    /// Outbox rows the transport has handed over; answers how many were
    /// not marked before.
    MarkCrossPublished => u64, "mark_cross_published";
    /// Completes after everything queued before it has committed.
    Barrier => (), "barrier";
    /// Like `Barrier`, then the writer stops: later operations fail.
    Close => (), "close";
}

/// Money in from outside, keyed: a retry with the same key and request gets
/// the first result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deposit {
    pub user: UserId,
    pub amount_fen: i64,
    pub key: String,
    pub at_ms: u64,
}

/// Money out to outside, keyed like `Deposit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Withdraw {
    pub user: UserId,
    pub amount_fen: i64,
    pub key: String,
    pub at_ms: u64,
}

/// The balance after a deposit or withdrawal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoneyMoved {
    pub balance_fen: i64,
    /// A retry: the first result is returned and nothing moved.
    pub repeat: bool,
}

/// A new group packet, as funded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPacket {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: SplitKind,
    pub total_fen: i64,
    pub count: u32,
    pub recipients: Recipients,
    pub greeting: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundPacket {
    pub packet: NewPacket,
    /// The sender's idempotency key: one packet per `(sender, key)`.
    pub key: String,
    /// The `packet_received` push body stored for each recipient (opaque).
    pub notice: Vec<u8>,
    /// The recipients homed on other SETs, each with their SET (empty on a
    /// single node): instead of a stored message, each gets an outbox
    /// notice carrying `notice`, in the same commit.
    pub away: Vec<(UserId, SetId)>,
    pub at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Funded {
    /// The packet was funded; the stored message id of each recipient homed
    /// on this SET.
    New { messages: Vec<(UserId, u64)> },
    /// The key had already funded this packet; nothing moved.
    Repeat(ExistingPacket),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingPacket {
    pub id: PacketId,
    pub total_fen: i64,
    pub count: u32,
    pub expires_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenShare {
    pub packet: PacketId,
    pub user: UserId,
    pub amount_fen: i64,
    /// Open order within the packet, from 0.
    pub seq: u32,
    pub at_ms: u64,
    /// Set when this open was the packet's last: who had the best luck.
    pub best_luck: Option<UserId>,
    /// What the shard saw left in the packet before this share. Storage must
    /// have the same (committed plus this batch's earlier opens), or the open
    /// is refused as `Stale`: an earlier open it was decided after failed.
    pub remaining_before_fen: i64,
    /// The SET the opener is homed on, when it is not this one: the share
    /// is paid into that SET's transit account, and an outbox credit for it
    /// is written in the same commit (its SET pays the user).
    pub cross_to: Option<SetId>,
}

/// Looks up a committed claim: the answer to a repeated open must be durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindClaim {
    pub packet: PacketId,
    pub user: UserId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    pub packet: PacketId,
    pub sender: UserId,
    /// What the shard says is left; the stored row must agree.
    pub amount_fen: i64,
    pub at_ms: u64,
    /// The `packet_refunded` push body stored for the sender (opaque).
    pub notice: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refunded {
    /// The sender's stored message, when anything was refunded.
    pub message: Option<u64>,
}

/// Packet ids of `shard` below `mark` may be used (durably reserved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveIds {
    pub shard: u16,
    pub mark: u64,
}

/// A new campaign, funded by its funder (homed on this SET, `set`) in full.
/// On a cluster (`parts` not empty: part `x` for SET `x`, as
/// `CampaignSpec::split` makes them) this SET keeps its own part (its row
/// is that part), and in the same commit sends every other SET its part's
/// budget: campaign escrow → that SET's transit account, with an outbox
/// `fund` carrying the part's spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateCampaign {
    pub spec: CampaignSpec,
    pub key: String,
    pub at_ms: u64,
    /// This SET: the campaign's id carries it.
    pub set: SetId,
    /// The parts of a campaign split over the cluster; empty on a single node.
    pub parts: Vec<CampaignSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignCreated {
    pub id: CampaignId,
    pub repeat: bool,
}

/// A created campaign starts running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartCampaign {
    pub id: CampaignId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShakeWin {
    pub campaign: CampaignId,
    pub packet: PacketId,
    pub user: UserId,
    pub amount_fen: i64,
    pub at_ms: u64,
    /// The shake's idempotency key: one win per `(user, key)`.
    pub key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShakeWon {
    Won,
    /// The key had won before: that first win, and nothing moved.
    Repeat(FirstWin),
}

/// The first win of a shake key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstWin {
    pub campaign: CampaignId,
    pub packet: PacketId,
    pub amount_fen: i64,
}

/// Looks up the first win of a shake key (moves no money).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindShakeWin {
    pub user: UserId,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseCampaign {
    pub id: CampaignId,
    /// `Stopped` or `Finished`.
    pub status: CampaignStatus,
    pub at_ms: u64,
    /// The campaign's home SET when it is not this one (this SET holds a
    /// part of a campaign split over the cluster): what is left goes back
    /// through the home SET's transit account, with an outbox `refund` for
    /// the funder, instead of to the funder here.
    pub home: Option<SetId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignClosed {
    /// What went back to the funder now (0 if it was closed already).
    pub refunded_fen: i64,
}

/// A persistent message for each of `users`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreMessages {
    pub users: Vec<UserId>,
    pub body: Vec<u8>,
    pub at_ms: u64,
}

/// Deletes a delivered persistent message; answers whether it existed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckMessage {
    pub user: UserId,
    pub msg: u64,
}

/// A change of a group's membership; answers the members after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeGroup {
    pub group: GroupId,
    pub change: GroupChange,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupChange {
    Replace(Vec<UserId>),
    Add(Vec<UserId>),
    Remove(Vec<UserId>),
}

/// A message from another SET (checked by the engine: addressed to this
/// SET, for a user homed here). A credit pays the user from the sending
/// SET's transit account; a notice is stored for the user as another
/// user's notice (capped like them); a fund creates this SET's part of a
/// campaign, funded from the sending SET's transit account; a refund pays
/// a campaign part's unreleased money from it to the funder. Once per `CrossMessage::key`: a
/// repeat changes nothing, and a repeat that differs is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyCross {
    pub msg: CrossMessage,
    /// Wall-clock ms now: when it was applied.
    pub at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossApplied {
    /// Applied before: nothing changed now.
    pub repeat: bool,
    /// A notice applied now: the stored message's id, to push.
    pub message: Option<u64>,
}

/// Marks this SET's outbox rows `(kind, packet, user)` published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkCrossPublished {
    pub keys: Vec<(CrossKind, PacketId, UserId)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Barrier;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close;
