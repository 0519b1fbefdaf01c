//! The push hub: who is connected where, and delivery of pushes to them.
//!
//! Presence is a striped map `user → outboxes` (one per device). A push only
//! touches the stripe of its user; a broadcast snapshots stripe by stripe and
//! delivers in chunks as a background task that can be stopped. Delivery never
//! waits on a connection: a full outbox closes that connection (slow reader)
//! instead of holding up the rest.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hongbao_core::limits::DEVICES_PER_USER_MAX;
use hongbao_core::{GroupId, UserId};
use hongbao_proto::{ErrorCode, Push, PushBody, ServerFrame};
use serde::{Deserialize, Serialize};

use hongbao_boundary::sync::lock;
use hongbao_boundary::{FrameSink, Outbox};

use crate::clock::Clock;
use crate::types::TaskInfo;

const STRIPES: usize = 64;
/// Broadcast tasks remembered (finished ones are forgotten oldest first).
const TASKS_KEPT_MAX: usize = 128;
/// Broadcast tasks delivering at once.
const BROADCASTS_RUNNING_MAX: usize = 4;
const _: () = assert!(BROADCASTS_RUNNING_MAX < TASKS_KEPT_MAX);
/// Deliveries between yields in a broadcast, so it shares the runtime.
const BROADCAST_CHUNK: usize = 1024;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushTarget {
    // `Id`: the range the engine checks.
    #[cfg_attr(feature = "openapi", schema(value_type = hongbao_core::openapi::Id))]
    User(UserId),
    /// At most 500.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<hongbao_core::openapi::Id>))]
    Users(Vec<UserId>),
    #[cfg_attr(feature = "openapi", schema(value_type = hongbao_core::openapi::Id))]
    Group(GroupId),
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PushReceipt {
    /// Users targeted.
    pub targets: u64,
    /// Connections (devices) the push was queued to now.
    pub delivered: u64,
    /// Persistent messages stored (one per target user).
    pub stored: u64,
}

struct Task {
    info: Mutex<TaskInfo>,
    stop: AtomicBool,
}

impl Task {
    /// Still delivering (`running`, or `stopping` until its loop notices).
    fn is_running(&self) -> bool {
        matches!(lock(&self.info).state.as_str(), "running" | "stopping")
    }
}

/// One stripe of presence: each online user's devices.
type Stripe = Mutex<HashMap<UserId, Devices>>;

/// One online user's connections, oldest first. Almost every user has one,
/// which is kept inline: a `Vec` would cost every connection an allocation.
#[derive(Debug)]
enum Devices {
    One(Outbox),
    Many(Vec<Outbox>),
}

impl Devices {
    fn as_slice(&self) -> &[Outbox] {
        match self {
            Devices::One(o) => std::slice::from_ref(o),
            Devices::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn retain(&mut self, keep: impl FnMut(&Outbox) -> bool) {
        let mut kept: Vec<Outbox> = std::mem::replace(self, Devices::Many(Vec::new())).into_vec();
        kept.retain(keep);
        *self = Devices::from_vec(kept);
    }

    fn push(&mut self, outbox: Outbox) {
        match self {
            Devices::Many(v) if v.is_empty() => *self = Devices::One(outbox),
            Devices::Many(v) => v.push(outbox),
            Devices::One(_) => {
                let mut all = std::mem::replace(self, Devices::Many(Vec::new())).into_vec();
                all.push(outbox);
                *self = Devices::Many(all);
            }
        }
    }

    /// Removes and returns the oldest device.
    fn remove_oldest(&mut self) -> Option<Outbox> {
        let mut all = std::mem::replace(self, Devices::Many(Vec::new())).into_vec();
        let oldest = (!all.is_empty()).then(|| all.remove(0));
        *self = Devices::from_vec(all);
        oldest
    }

    fn into_vec(self) -> Vec<Outbox> {
        match self {
            Devices::One(o) => vec![o],
            Devices::Many(v) => v,
        }
    }

    fn from_vec(mut v: Vec<Outbox>) -> Devices {
        match v.len() {
            1 => Devices::One(v.pop().expect("one element")),
            _ => Devices::Many(v),
        }
    }
}

pub(crate) struct PushHub {
    stripes: Box<[Stripe]>,
    connections: AtomicU64,
    tasks: Mutex<BTreeMap<u64, Arc<Task>>>,
    next_task: AtomicU64,
    clock: Clock,
}

impl PushHub {
    pub(crate) fn new(clock: Clock) -> Arc<PushHub> {
        Arc::new(PushHub {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            connections: AtomicU64::new(0),
            tasks: Mutex::new(BTreeMap::new()),
            next_task: AtomicU64::new(1),
            clock,
        })
    }

    fn stripe(&self, user: UserId) -> &Stripe {
        &self.stripes[(user as usize) % STRIPES]
    }

    /// Adds a device. The oldest device is closed when a user has too many.
    pub(crate) fn register(&self, user: UserId, outbox: Outbox) {
        let mut map = lock(self.stripe(user));
        let devices = map.entry(user).or_insert(Devices::Many(Vec::new()));
        // Devices whose outbox takes nothing more (gone, or being closed as
        // slow consumers) make room; each was counted once, so it is
        // uncounted here (its own `unregister` then finds nothing).
        let before = devices.len();
        devices.retain(|o| !o.is_closed());
        self.connections.fetch_sub((before - devices.len()) as u64, Ordering::Relaxed);
        if devices.len() >= DEVICES_PER_USER_MAX {
            if let Some(oldest) = devices.remove_oldest() {
                oldest.send(ServerFrame::Close {
                    code: ErrorCode::Overload,
                    message: "too many devices for this user".into(),
                });
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
        devices.push(outbox);
        self.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("hongbao_connections").set(self.connections.load(Ordering::Relaxed) as f64);
    }

    pub(crate) fn unregister(&self, user: UserId, outbox: &Outbox) {
        let mut map = lock(self.stripe(user));
        if let Some(devices) = map.get_mut(&user) {
            let before = devices.len();
            devices.retain(|o| !o.same(outbox));
            if devices.len() < before {
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
            if devices.is_empty() {
                map.remove(&user);
            }
        }
        metrics::gauge!("hongbao_connections").set(self.connections.load(Ordering::Relaxed) as f64);
    }

    /// Queues a push to every device of `user`; returns how many took it.
    pub(crate) fn deliver(&self, user: UserId, push: &Push) -> usize {
        let map = lock(self.stripe(user));
        let Some(devices) = map.get(&user) else { return 0 };
        let mut n = 0;
        for o in devices.as_slice() {
            if o.send(ServerFrame::Push(push.clone())) {
                n += 1;
            }
        }
        metrics::counter!("hongbao_pushes_total").increment(n as u64);
        n
    }

    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn users_online(&self) -> u64 {
        self.stripes.iter().map(|s| lock(s).len() as u64).sum()
    }

    /// Starts a broadcast task; `None` when `BROADCASTS_RUNNING_MAX` run
    /// already (each holds a snapshot of up to a stripe of outboxes and
    /// takes turns on the runtime: an unbounded number would be a flood).
    pub(crate) fn broadcast(self: &Arc<Self>, body: PushBody) -> Option<TaskInfo> {
        let id = self.next_task.fetch_add(1, Ordering::Relaxed);
        let info = TaskInfo {
            id,
            state: "running".into(),
            targets: self.connections(),
            delivered: 0,
            created_ms: self.clock.now_ms(),
        };
        let task = Arc::new(Task { info: Mutex::new(info.clone()), stop: AtomicBool::new(false) });
        if !remember(&mut lock(&self.tasks), id, task.clone()) {
            return None;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            let push = Push { msg: 0, body };
            let mut delivered = 0u64;
            // Gateways in other processes get the push once each, and
            // deliver it to their connections themselves; their connections
            // here only count.
            let mut links: Vec<(Arc<dyn FrameSink>, bool)> = Vec::new();
            'stripes: for stripe in hub.stripes.iter() {
                let targets: Vec<Outbox> = lock(stripe).values().flat_map(Devices::as_slice).cloned().collect();
                for chunk in targets.chunks(BROADCAST_CHUNK) {
                    if task.stop.load(Ordering::Relaxed) {
                        break 'stripes;
                    }
                    for o in chunk {
                        if let Some(sink) = o.sink() {
                            let queued = match links.iter().find(|(l, _)| Arc::ptr_eq(l, sink)) {
                                Some((_, queued)) => *queued,
                                None => {
                                    let queued = sink.forward_to_all(ServerFrame::Push(push.clone()));
                                    links.push((sink.clone(), queued));
                                    queued
                                }
                            };
                            if queued && !o.is_closed() {
                                delivered += 1;
                            }
                        } else if o.send(ServerFrame::Push(push.clone())) {
                            delivered += 1;
                        }
                    }
                    lock(&task.info).delivered = delivered;
                    tokio::task::yield_now().await;
                }
            }
            metrics::counter!("hongbao_pushes_total").increment(delivered);
            let mut info = lock(&task.info);
            info.delivered = delivered;
            info.state = if task.stop.load(Ordering::Relaxed) { "stopped".into() } else { "done".into() };
        });
        Some(info)
    }

    pub(crate) fn task(&self, id: u64) -> Option<TaskInfo> {
        let tasks = lock(&self.tasks);
        tasks.get(&id).map(|t| lock(&t.info).clone())
    }

    pub(crate) fn stop_task(&self, id: u64) -> Option<TaskInfo> {
        let task = lock(&self.tasks).get(&id).cloned()?;
        task.stop.store(true, Ordering::Relaxed);
        let mut info = lock(&task.info);
        if info.state == "running" {
            info.state = "stopping".into();
        }
        Some(info.clone())
    }

    pub(crate) fn tasks(&self) -> Vec<TaskInfo> {
        let tasks = lock(&self.tasks);
        tasks.values().map(|t| lock(&t.info).clone()).collect()
    }
}

/// Adds a new running task unless `BROADCASTS_RUNNING_MAX` run already.
/// Forgets the oldest finished tasks to stay within `TASKS_KEPT_MAX`; a
/// running one is never forgotten (it could no longer be stopped), and
/// fewer run than are kept, so there is always a finished one to forget.
fn remember(tasks: &mut BTreeMap<u64, Arc<Task>>, id: u64, task: Arc<Task>) -> bool {
    if tasks.values().filter(|t| t.is_running()).count() >= BROADCASTS_RUNNING_MAX {
        return false;
    }
    while tasks.len() >= TASKS_KEPT_MAX {
        let oldest_finished = tasks.iter().find(|(_, t)| !t.is_running()).map(|(id, _)| *id);
        tasks.remove(&oldest_finished.expect("fewer tasks run than are kept"));
    }
    tasks.insert(id, task);
    true
}

/// A registered connection; unregisters itself when dropped.
pub struct Connection {
    hub: Arc<PushHub>,
    user: UserId,
    outbox: Outbox,
}

impl Connection {
    /// Registers `outbox` as a device of `user` until the guard is dropped.
    pub(crate) fn register(hub: &Arc<PushHub>, user: UserId, outbox: Outbox) -> Connection {
        hub.register(user, outbox.clone());
        Connection { hub: hub.clone(), user, outbox }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.hub.unregister(self.user, &self.outbox);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pushes_reach_every_device_and_stop_after_disconnect() {
        let hub = PushHub::new(Clock::system());
        let (a, mut ra) = Outbox::new(4);
        let (b, mut rb) = Outbox::new(4);
        hub.register(7, a.clone());
        hub.register(7, b.clone());
        let push = Push { msg: 0, body: PushBody::Notice { topic: "t".into(), text: "x".into() } };
        assert_eq!(hub.deliver(7, &push), 2);
        assert!(ra.try_recv().is_some() && rb.try_recv().is_some());
        hub.unregister(7, &a);
        assert_eq!(hub.deliver(7, &push), 1);
        assert_eq!(hub.connections(), 1);
    }

    #[tokio::test]
    async fn too_many_devices_close_the_oldest() {
        let hub = PushHub::new(Clock::system());
        let mut devices: Vec<_> = (0..=DEVICES_PER_USER_MAX).map(|_| Outbox::new(4)).collect();
        for (o, _) in &devices {
            hub.register(3, o.clone());
        }
        assert_eq!(hub.connections(), DEVICES_PER_USER_MAX as u64);
        assert!(matches!(devices[0].1.try_recv(), Some(ServerFrame::Close { code: ErrorCode::Overload, .. })));
        let push = Push { msg: 0, body: PushBody::Notice { topic: "t".into(), text: "x".into() } };
        assert_eq!(hub.deliver(3, &push), DEVICES_PER_USER_MAX);
        assert!(devices[0].1.try_recv().is_none());
        for (o, _) in &devices[1..] {
            hub.unregister(3, o);
        }
        assert_eq!((hub.connections(), hub.users_online()), (0, 0));
    }

    /// A device whose outbox overflowed is dropped when the same user
    /// registers another, and counted out once: its own `unregister` later
    /// finds nothing (the count used to stay one too high).
    #[tokio::test]
    async fn an_overflowed_device_is_counted_out_once() {
        let hub = PushHub::new(Clock::system());
        let (slow, _slow_rx) = Outbox::new(1);
        hub.register(5, slow.clone());
        let push = Push { msg: 0, body: PushBody::Notice { topic: "t".into(), text: "x".into() } };
        assert_eq!(hub.deliver(5, &push), 1);
        assert_eq!(hub.deliver(5, &push), 0, "the second overflows the outbox");
        let (other, _other_rx) = Outbox::new(4);
        hub.register(5, other.clone());
        assert_eq!(hub.connections(), 1);
        hub.unregister(5, &slow);
        assert_eq!(hub.connections(), 1);
        hub.unregister(5, &other);
        assert_eq!((hub.connections(), hub.users_online()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_outbox_is_flagged_not_waited_on() {
        let hub = PushHub::new(Clock::system());
        let (a, mut ra) = Outbox::new(1);
        hub.register(1, a);
        let push = Push { msg: 0, body: PushBody::Notice { topic: "t".into(), text: "x".into() } };
        assert_eq!(hub.deliver(1, &push), 1);
        assert_eq!(hub.deliver(1, &push), 0);
        let received = tokio::time::timeout(std::time::Duration::from_secs(1), ra.recv(64)).await.unwrap();
        assert_eq!(received, Err(hongbao_boundary::Overflow));
    }

    /// Issue 9: broadcast tasks had no limit, and forgetting the oldest of
    /// the remembered tasks could forget one still running, which then could
    /// not be stopped.
    #[test]
    fn broadcasts_running_at_once_are_bounded_and_a_running_one_is_never_forgotten() {
        let task = |state: &str| {
            let info = TaskInfo { id: 0, state: state.into(), targets: 0, delivered: 0, created_ms: 0 };
            Arc::new(Task { info: Mutex::new(info), stop: AtomicBool::new(false) })
        };
        let mut tasks = BTreeMap::new();
        // The oldest task still runs, behind it finished ones up to the limit.
        assert!(remember(&mut tasks, 1, task("running")));
        for id in 2..=TASKS_KEPT_MAX as u64 {
            assert!(remember(&mut tasks, id, task("done")));
        }
        for id in 1_000..1_000 + TASKS_KEPT_MAX as u64 {
            assert!(remember(&mut tasks, id, task("stopped")));
            assert!(tasks.len() <= TASKS_KEPT_MAX);
            assert!(tasks.contains_key(&1), "the running task was forgotten");
        }
        for id in 2_000..2_000 + BROADCASTS_RUNNING_MAX as u64 - 1 {
            assert!(remember(&mut tasks, id, task("running")));
        }
        assert!(!remember(&mut tasks, 3_000, task("running")), "one more than may run at once");
        assert!(!tasks.contains_key(&3_000));
    }
}
