//! Lean pipelined connections for `perf overload`: each connection is one
//! user that keeps up to `WINDOW` requests in flight (the server's limit
//! per connection), written in batches by one task and read in batches by
//! another, counting every request sent and every answer by kind.
//!
//! Two ways to drive them: *closed* (every answer makes room for the next
//! request at once: the most the server can answer, for capacity), and
//! *paced* (a pacer hands out a target rate over the connections every
//! `TICK`; a connection sends what is due as soon as its window has room,
//! keeping at most `BACKLOG` due requests waiting; what is due beyond that
//! is *held back*, never sent: the client-side view of backpressure, as a
//! user who gives up rather than queue without end).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hongbao_client::{frames, handshake};
use hongbao_proto::{ErrorCode, Reply, Request, ServerFrame, ShakeResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Requests in flight per connection: the server's limit (one more is
/// answered `overload` by the gateway itself).
pub const WINDOW: u32 = 64;
/// How often the pacer hands out requests.
const TICK: Duration = Duration::from_millis(5);
/// Due requests a paced connection keeps waiting for room in its window.
const BACKLOG: u64 = WINDOW as u64;
/// Bytes read per read call at most.
const READ_BYTES: usize = 64 * 1024;

/// What a connection asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Shakes without a key: almost all answered on the gateway's thread.
    PlainShake { campaign: u64 },
    /// Shakes with a fresh key each: the ones that find nothing read
    /// storage through the read gate.
    KeyedShake { campaign: u64 },
    /// Opens of the connection's queue of packets.
    Open,
}

impl Work {
    pub fn name(self) -> &'static str {
        match self {
            Work::PlainShake { .. } => "shake_plain",
            Work::KeyedShake { .. } => "shake_keyed",
            Work::Open => "open",
        }
    }
}

/// How the writers send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Idle = 0,
    Closed = 1,
    Paced = 2,
    Stop = 3,
}

/// Counters of every request and answer, over all connections, since
/// they were opened (phases subtract snapshots).
#[derive(Default)]
pub struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    won: AtomicU64,
    none: AtomicU64,
    not_running: AtomicU64,
    opened: AtomicU64,
    finished: AtomicU64,
    /// `shake: "overload"` and `error: overload`.
    overload: AtomicU64,
    other: AtomicU64,
    held_back: AtomicU64,
    /// Credits a connection could not use: no packet left to open.
    no_work: AtomicU64,
    /// Other answers by name (errors by code), for the report.
    odd: Mutex<BTreeMap<String, u64>>,
}

/// A copy of the tally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub answered: u64,
    pub won: u64,
    pub none: u64,
    pub not_running: u64,
    pub opened: u64,
    pub finished: u64,
    pub overload: u64,
    pub other: u64,
    pub held_back: u64,
    pub no_work: u64,
}

impl Counts {
    /// Answers that did the work asked (not `overload`, not an error).
    pub fn useful(&self) -> u64 {
        self.won + self.none + self.not_running + self.opened + self.finished
    }

    pub fn since(&self, b: &Counts) -> Counts {
        Counts {
            sent: self.sent - b.sent,
            answered: self.answered - b.answered,
            won: self.won - b.won,
            none: self.none - b.none,
            not_running: self.not_running - b.not_running,
            opened: self.opened - b.opened,
            finished: self.finished - b.finished,
            overload: self.overload - b.overload,
            other: self.other - b.other,
            held_back: self.held_back - b.held_back,
            no_work: self.no_work - b.no_work,
        }
    }
}

impl Tally {
    pub fn counts(&self) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Acquire);
        Counts {
            sent: l(&self.sent),
            answered: l(&self.answered),
            won: l(&self.won),
            none: l(&self.none),
            not_running: l(&self.not_running),
            opened: l(&self.opened),
            finished: l(&self.finished),
            overload: l(&self.overload),
            other: l(&self.other),
            held_back: l(&self.held_back),
            no_work: l(&self.no_work),
        }
    }

    pub fn odd(&self) -> BTreeMap<String, u64> {
        self.odd.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, reply: &Reply) {
        let counter = match reply {
            Reply::Shake(ShakeResult::Won { .. }) => &self.won,
            Reply::Shake(ShakeResult::None) => &self.none,
            Reply::Shake(ShakeResult::NotRunning) => &self.not_running,
            Reply::Shake(ShakeResult::Overload) | Reply::Error { code: ErrorCode::Overload, .. } => &self.overload,
            Reply::Opened { .. } => &self.opened,
            Reply::Error { code: ErrorCode::Finished | ErrorCode::Expired, .. } => &self.finished,
            other => {
                let name = match other {
                    Reply::Error { code, .. } => format!("error {code:?}"),
                    other => format!("{other:?}").split([' ', '(', '{']).next().unwrap_or("?").to_owned(),
                };
                *self.odd.lock().unwrap_or_else(|e| e.into_inner()).entry(name).or_default() += 1;
                &self.other
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Release);
    }
}

/// What a connection's writer and reader share.
struct Conn {
    in_flight: AtomicU32,
    credits: AtomicU64,
    wake: Notify,
    /// Open requests in flight: request id → packet, so a packet answered
    /// `overload` goes back to the front of the queue.
    opens: Mutex<HashMap<u64, u64>>,
    queue: Mutex<VecDeque<u64>>,
    /// The connection ended (server close or EOF); `close` says why.
    ended: AtomicBool,
    close: Mutex<Option<ErrorCode>>,
    /// Requests in flight when it ended: never to be answered.
    lost: AtomicU32,
}

/// Every connection of one kind of work, and their tasks.
pub struct Fleet {
    work: Work,
    conns: Vec<Arc<Conn>>,
    mode: Arc<AtomicU8>,
    /// Requests in flight per connection in the closed loop (paced: `WINDOW`).
    window: Arc<AtomicU32>,
    pub tally: Arc<Tally>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Connects `users` (one connection each, dev tokens), each with its
    /// queue of packets to open (`Work::Open`; empty otherwise). Counts go
    /// to `tally`, which may outlive the fleet.
    pub async fn open(
        addr: SocketAddr,
        work: Work,
        users: &[u64],
        queues: Vec<VecDeque<u64>>,
        tally: Arc<Tally>,
    ) -> anyhow::Result<Fleet> {
        let mode = Arc::new(AtomicU8::new(Mode::Idle as u8));
        let window = Arc::new(AtomicU32::new(WINDOW));
        let mut fleet = Fleet { work, conns: Vec::new(), mode, window, tally, tasks: Vec::new() };
        let mut queues = queues.into_iter();
        for (i, &user) in users.iter().enumerate() {
            let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
            stream.set_nodelay(true)?;
            let mut buf = Vec::new();
            let token = user.to_string();
            let hello = handshake::hello(&mut stream, &mut buf, &token);
            tokio::time::timeout(Duration::from_secs(30), hello)
                .await
                .with_context(|| format!("user {user}: no welcome"))??
                .for_user(user)?;
            let conn = Arc::new(Conn {
                in_flight: AtomicU32::new(0),
                credits: AtomicU64::new(0),
                wake: Notify::new(),
                opens: Mutex::default(),
                queue: Mutex::new(queues.next().unwrap_or_default()),
                ended: AtomicBool::new(false),
                close: Mutex::new(None),
                lost: AtomicU32::new(0),
            });
            let (read, write) = stream.into_split();
            let (c, t, m) = (conn.clone(), fleet.tally.clone(), fleet.mode.clone());
            fleet.tasks.push(tokio::spawn(read_answers(read, buf, c, t, m)));
            let (c, t, m, w) = (conn.clone(), fleet.tally.clone(), fleet.mode.clone(), fleet.window.clone());
            fleet.tasks.push(tokio::spawn(write_requests(write, work, i as u64, c, t, (m, w))));
            fleet.conns.push(conn);
        }
        Ok(fleet)
    }

    pub fn work(&self) -> Work {
        self.work
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        for c in &self.conns {
            c.wake.notify_one();
        }
    }

    /// Every connection keeps `window` requests in flight from now on
    /// (at most `WINDOW`).
    pub fn closed_loop(&self, window: u32) {
        self.window.store(window.clamp(1, WINDOW), Ordering::Release);
        self.set_mode(Mode::Closed);
    }

    /// Sends at `rate_per_s` over all connections until `until`, then stops
    /// sending (answers still come).
    pub async fn paced(&self, rate_per_s: f64, until: Instant) {
        self.window.store(WINDOW, Ordering::Release);
        self.set_mode(Mode::Paced);
        let started = Instant::now();
        let mut handed = 0u64;
        let mut next = 0usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while Instant::now() < until {
            tick.tick().await;
            let due = (rate_per_s * started.elapsed().as_secs_f64()) as u64 - handed;
            handed += due;
            // An even share each, the remainder to the next ones in turn.
            let n = self.conns.len();
            let (each, rest) = (due / n as u64, (due % n as u64) as usize);
            for j in 0..n {
                let share = each + u64::from(j < rest);
                let c = &self.conns[(next + j) % n];
                if share > 0 {
                    c.credits.fetch_add(share, Ordering::AcqRel);
                    c.wake.notify_one();
                }
            }
            next = (next + rest) % n;
        }
        self.idle();
    }

    /// Stops sending; what is in flight is still answered and counted.
    pub fn idle(&self) {
        self.mode.store(Mode::Idle as u8, Ordering::Release);
        for c in &self.conns {
            c.credits.store(0, Ordering::Release);
        }
    }

    /// Requests in flight on connections still open.
    pub fn in_flight(&self) -> u64 {
        self.conns
            .iter()
            .filter(|c| !c.ended.load(Ordering::Acquire))
            .map(|c| u64::from(c.in_flight.load(Ordering::Acquire)))
            .sum()
    }

    /// Waits until nothing is in flight on an open connection, or `timeout`.
    pub async fn drain(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.in_flight()
    }

    /// Connections the server ended, by reason, and the requests they had
    /// in flight then (never answered).
    pub fn ended(&self) -> (BTreeMap<String, u64>, u64) {
        let mut why = BTreeMap::new();
        let mut lost = 0;
        for c in self.conns.iter().filter(|c| c.ended.load(Ordering::Acquire)) {
            let reason = match *c.close.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(code) => format!("close {code:?}"),
                None => "closed without a reason".to_owned(),
            };
            *why.entry(reason).or_default() += 1;
            lost += u64::from(c.lost.load(Ordering::Acquire));
        }
        (why, lost)
    }

    /// Packets still queued for opening, over all connections.
    pub fn queued(&self) -> usize {
        self.conns.iter().map(|c| c.queue.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Every connection's queue of packets still to open (in the order of
    /// `users`), emptied.
    pub fn take_queues(&self) -> Vec<VecDeque<u64>> {
        self.conns.iter().map(|c| std::mem::take(&mut *c.queue.lock().unwrap_or_else(|e| e.into_inner()))).collect()
    }

    /// Stops the tasks and closes the connections.
    pub fn close(self) {
        self.mode.store(Mode::Stop as u8, Ordering::Release);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Writes requests whenever woken: as many as the window has room for
/// (closed loop) or as the credits say (paced; the rest held back).
async fn write_requests(
    mut w: OwnedWriteHalf,
    work: Work,
    conn_index: u64,
    conn: Arc<Conn>,
    tally: Arc<Tally>,
    (mode, window): (Arc<AtomicU8>, Arc<AtomicU32>),
) {
    let mut next_id = handshake::HELLO_ID + 1;
    let mut buf = Vec::new();
    loop {
        conn.wake.notified().await;
        let m = mode.load(Ordering::Acquire);
        if m == Mode::Stop as u8 || conn.ended.load(Ordering::Acquire) {
            return;
        }
        let room = window.load(Ordering::Acquire).saturating_sub(conn.in_flight.load(Ordering::Acquire));
        let n = if m == Mode::Closed as u8 {
            room
        } else if m == Mode::Paced as u8 {
            let due = conn.credits.swap(0, Ordering::AcqRel);
            let n = due.min(u64::from(room));
            let waiting = (due - n).min(BACKLOG);
            conn.credits.fetch_add(waiting, Ordering::AcqRel);
            tally.held_back.fetch_add(due - n - waiting, Ordering::Relaxed);
            n as u32
        } else {
            0
        };
        buf.clear();
        let mut sent = 0;
        for _ in 0..n {
            let Some(req) = request(work, conn_index, next_id, &conn) else {
                tally.no_work.fetch_add(u64::from(n - sent), Ordering::Relaxed);
                break;
            };
            buf.extend_from_slice(&frames::encode(next_id, req));
            next_id += 1;
            sent += 1;
        }
        if sent == 0 {
            continue;
        }
        conn.in_flight.fetch_add(sent, Ordering::AcqRel);
        tally.sent.fetch_add(u64::from(sent), Ordering::Relaxed);
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// The next request of `work` (`None`: no packet left to open).
fn request(work: Work, conn_index: u64, id: u64, conn: &Conn) -> Option<Request> {
    Some(match work {
        Work::PlainShake { campaign } => Request::Shake { campaign, key: None },
        Work::KeyedShake { campaign } => Request::Shake { campaign, key: Some(format!("o{conn_index}-{id}")) },
        Work::Open => {
            let packet = conn.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()?;
            conn.opens.lock().unwrap_or_else(|e| e.into_inner()).insert(id, packet);
            Request::Open { packet }
        }
    })
}

/// Reads answers in batches and counts them; a packet answered `overload`
/// goes back to the front of the queue. Pushes are read and dropped.
async fn read_answers(mut r: OwnedReadHalf, mut buf: Vec<u8>, conn: Arc<Conn>, tally: Arc<Tally>, mode: Arc<AtomicU8>) {
    loop {
        let mut replies = 0;
        loop {
            match frames::take(&mut buf) {
                Ok(Some(ServerFrame::Reply { id, reply })) => {
                    answered(id, &reply, &conn);
                    tally.count(&reply);
                    replies += 1;
                }
                Ok(Some(ServerFrame::Push(_))) => {}
                Ok(Some(ServerFrame::Close { code, .. })) => {
                    *conn.close.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
                    return end(&conn);
                }
                Ok(None) => break,
                Err(_) => return end(&conn),
            }
        }
        if replies > 0 {
            conn.in_flight.fetch_sub(replies, Ordering::AcqRel);
            let m = mode.load(Ordering::Acquire);
            if m == Mode::Closed as u8 || (m == Mode::Paced as u8 && conn.credits.load(Ordering::Acquire) > 0) {
                conn.wake.notify_one();
            }
        }
        buf.reserve(READ_BYTES);
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return end(&conn),
            Ok(_) => {}
        }
    }
}

/// A packet answered `overload` is the next one this user tries again, as
/// a client told "retry later" would: the users of a block keep racing for
/// the same packets (each batch of the writer holds many opens of one
/// packet), instead of drifting apart over their queues.
fn answered(id: u64, reply: &Reply, conn: &Conn) {
    let packet = conn.opens.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    if let (Some(packet), Reply::Error { code: ErrorCode::Overload, .. }) = (packet, reply) {
        conn.queue.lock().unwrap_or_else(|e| e.into_inner()).push_front(packet);
    }
}

fn end(conn: &Conn) {
    conn.lost.store(conn.in_flight.load(Ordering::Acquire), Ordering::Release);
    conn.ended.store(true, Ordering::Release);
}
