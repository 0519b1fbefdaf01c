//! The gateway's side of a link: `RemoteEngine`, the gateway's `Backend`
//! when the shards live in another process.
//!
//! A connection's `hello` becomes `Connect` (the connection gets an id on
//! this link), each request `Request`, and the connection's end
//! `Disconnect`. Frames coming back are put in the connection's own
//! outbox, whose bound and slow-reader handling are the gateway's as usual.
//!
//! Two kinds of link:
//! - `connect`: a child gateway of `serve --gateways N`, over the Unix
//!   socket. The link's end is the process's end (`LinkClient::ended`): a
//!   child never outlives the serve process.
//! - `connect_resilient`: a cluster gateway's link to one SET, over TCP. It
//!   never ends by itself: a lost link is dialled again with backoff
//!   (`RECONNECT_MIN` doubling to `RECONNECT_MAX`), and on the new one every
//!   live connection is introduced again (`Connect` or `Attach`, under their
//!   old ids), so the SET's push hub finds them as before. Meanwhile nothing
//!   waits: every request sent and not answered when the link was lost is
//!   answered `unavailable` at once, and so is every request until the link
//!   is back. What waits is bounded by the connections and their in-flight
//!   limit.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hongbao_boundary::sync::{lock, read, write};
use hongbao_boundary::{Backend, EngineError, GateView, Outbox, Responder};
use hongbao_proto::{ErrorCode, Reply, Request, ServerFrame, ShakeResult};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::limits::{QUEUE_MESSAGES_MAX, READ_BUFFER_BYTES};
use crate::wire::{self, Down, Refused, SendQueue, Up};
use crate::LinkError;

/// First pause before a lost resilient link is dialled again.
pub const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// Longest pause between two tries: a SET that comes back is linked again
/// within this much.
pub const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// How often a gateway reports the shakes it answered itself.
const INLINE_REPORT_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait for a resilient link's last messages (disconnects) on close.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Where a link's core listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// The serve process's `<data>/link.sock`.
    Unix(PathBuf),
    /// A SET's link address, `host:port`.
    Tcp(String),
}

impl fmt::Display for LinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkTarget::Unix(path) => write!(f, "{}", path.display()),
            LinkTarget::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl LinkTarget {
    async fn open(&self) -> Result<(ReadHalf, WriteHalf), LinkError> {
        match self {
            LinkTarget::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .await
                    .map_err(|source| LinkError::Socket { path: path.clone(), source })?;
                let (read, write) = stream.into_split();
                Ok((Box::new(read), Box::new(write)))
            }
            LinkTarget::Tcp(addr) => {
                let connect_err = |source| LinkError::Connect { target: addr.clone(), source };
                let stream = TcpStream::connect(addr.as_str()).await.map_err(connect_err)?;
                stream.set_nodelay(true).map_err(connect_err)?;
                let (read, write) = stream.into_split();
                Ok((Box::new(read), Box::new(write)))
            }
        }
    }
}

/// The engine as a gateway process sees it: on the other end of a link.
/// Cheap to clone.
#[derive(Clone)]
pub struct RemoteEngine {
    link: Arc<Link>,
}

struct Link {
    /// What this link is, for logs and error messages ("SET 1 at …").
    name: String,
    /// The current stream's queue. A resilient link swaps in a new one on
    /// each reconnect (under the `conns` lock, with every connection's
    /// introduction already in it); while the link is down it holds the
    /// lost stream's queue, closed, which refuses everything.
    up: RwLock<Arc<SendQueue<Up>>>,
    /// This gateway's connections on this link, by their id on the link.
    conns: Mutex<HashMap<u64, Entry>>,
    next_conn: AtomicU64,
    /// The core's shake gates as last sent; empty (answer nothing) until then
    /// and while the link is down.
    gate: RwLock<GateView>,
    /// Shakes answered from `gate` and not yet reported to the core.
    inline_none: AtomicU64,
    inline_not_running: AtomicU64,
    /// Requests are remembered until answered, so that a lost link answers
    /// them (`connect_resilient`).
    resilient: bool,
}

/// One connection as this link knows it.
struct Entry {
    outbox: Outbox,
    user: u64,
    /// `Connect`ed (registered for pushes there) or only `Attach`ed.
    registered: bool,
    /// Requests sent and not yet answered (resilient links only); freed when
    /// empty, bounded by the gateway's in-flight limit per connection.
    pending: Vec<u64>,
}

impl Link {
    fn new(name: String, up: SendQueue<Up>, resilient: bool) -> Link {
        Link {
            name,
            up: RwLock::new(Arc::new(up)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            gate: RwLock::new(GateView::default()),
            inline_none: AtomicU64::new(0),
            inline_not_running: AtomicU64::new(0),
            resilient,
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        lock(&self.conns)
    }

    fn queue(&self) -> Arc<SendQueue<Up>> {
        read(&self.up).clone()
    }

    /// Queues `up` on the current stream (no clone of the queue's handle:
    /// this is every request's path).
    fn push(&self, up: Up) -> Result<(), Refused> {
        read(&self.up).push(up)
    }

    /// Reports the shakes answered here since the last report.
    fn report_inline_shakes(&self) {
        let none = self.inline_none.swap(0, Ordering::Relaxed);
        let not_running = self.inline_not_running.swap(0, Ordering::Relaxed);
        if none + not_running > 0 && self.queue().push(Up::InlineShakes { none, not_running }).is_err() {
            // Counted in the next report instead.
            self.inline_none.fetch_add(none, Ordering::Relaxed);
            self.inline_not_running.fetch_add(not_running, Ordering::Relaxed);
        }
    }

    /// A fresh stream's queue: the hello, then every live connection
    /// introduced again under its id, swapped in under the `conns` lock so
    /// no connection's own messages can come before its introduction.
    fn relink(&self, key: &str) -> Arc<SendQueue<Up>> {
        let queue = Arc::new(SendQueue::new(QUEUE_MESSAGES_MAX));
        let conns = self.conns();
        // One per connection, so bounded by the connection cap.
        let _ = queue.push_always(Up::Hello { key: key.to_owned(), pid: std::process::id() });
        for (&conn, entry) in conns.iter() {
            let user = entry.user;
            let _ = queue.push_always(if entry.registered {
                Up::Connect { conn, user }
            } else {
                Up::Attach { conn, user }
            });
        }
        let _ = queue.push_always(Up::Listening);
        *write(&self.up) = queue.clone();
        queue
    }

    /// The stream is gone: nothing more goes out on it, the gates are
    /// forgotten, and every request waiting for an answer is answered
    /// `unavailable` now.
    fn lost(&self) {
        let mut conns = self.conns();
        self.queue().close();
        *write(&self.gate) = GateView::default();
        let message = format!(
            "{} became unreachable with this request in flight: it may have been done; retry it (with the same key)",
            self.name
        );
        for entry in conns.values_mut() {
            for id in std::mem::take(&mut entry.pending) {
                let reply = Reply::error(ErrorCode::Unavailable, message.clone());
                entry.outbox.send(ServerFrame::Reply { id, reply });
            }
        }
    }

    /// A frame for connection `conn`; a reply settles its request.
    fn deliver(&self, conn: u64, frame: ServerFrame) {
        let mut conns = self.conns();
        // A frame for a connection that has just ended is dropped.
        let Some(entry) = conns.get_mut(&conn) else { return };
        if let (true, ServerFrame::Reply { id, .. }) = (self.resilient, &frame) {
            if let Some(at) = entry.pending.iter().position(|p| p == id) {
                entry.pending.swap_remove(at);
                if entry.pending.is_empty() {
                    entry.pending = Vec::new();
                }
            }
        }
        entry.outbox.send(frame);
    }

    /// Adds a connection and queues its introduction; `registered`: with
    /// `Connect` (pushes come over this link) or `Attach` (requests only).
    fn introduce(
        self: &Arc<Self>,
        user: u64,
        outbox: Outbox,
        registered: bool,
    ) -> Result<RemoteConnection, EngineError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut conns = self.conns();
        let up = if registered { Up::Connect { conn, user } } else { Up::Attach { conn, user } };
        match self.queue().push(up) {
            Ok(()) => {}
            // Down: the connection is introduced on the next link, and its
            // requests to this SET are answered `unavailable` meanwhile. A
            // user whose home SET is away can still log in and open other
            // SETs' packets; their pushes start when it is back.
            Err(Refused::Closed) if self.resilient => {}
            Err(Refused::Full) => return Err(EngineError::Overload),
            Err(Refused::Closed) => return Err(EngineError::Internal("the link to the engine is closed".into())),
        }
        conns.insert(conn, Entry { outbox, user, registered, pending: Vec::new() });
        Ok(RemoteConnection { conn, link: self.clone() })
    }
}

/// The running link of a child gateway: its reader and writer tasks.
pub struct LinkClient {
    link: Arc<Link>,
    reader: JoinHandle<()>,
    writer: JoinHandle<Result<(), LinkError>>,
    reporter: JoinHandle<()>,
    /// Becomes `true` when the core says `Shutdown` or the link is lost.
    ended: watch::Receiver<bool>,
}

/// Connects to the core's link socket and introduces this process with
/// `key`. The link ends when the core says so or the stream is lost.
pub async fn connect(target: &LinkTarget, key: &str) -> Result<(RemoteEngine, LinkClient), LinkError> {
    let (read, write) = target.open().await?;
    let link = Arc::new(Link::new(target.to_string(), SendQueue::new(QUEUE_MESSAGES_MAX), false));
    link.queue()
        .push(Up::Hello { key: key.to_owned(), pid: std::process::id() })
        .map_err(|_| LinkError::Protocol("link closed before hello".into()))?;
    let writer = {
        let queue = link.queue();
        tokio::spawn(async move { wire::write_loop(&queue, write).await })
    };
    let (ended_tx, ended) = watch::channel(false);
    let reader = {
        let link = link.clone();
        tokio::spawn(async move {
            match read_loop(&link, read).await {
                End::Shutdown => tracing::info!("the core asked this gateway to stop"),
                End::Lost(why) => tracing::warn!(why, "link to the core lost"),
            }
            let _ = ended_tx.send(true);
        })
    };
    let reporter = tokio::spawn(report_loop(link.clone()));
    Ok((RemoteEngine { link: link.clone() }, LinkClient { link, reader, writer, reporter, ended }))
}

async fn report_loop(link: Arc<Link>) {
    let mut tick = tokio::time::interval(INLINE_REPORT_INTERVAL);
    loop {
        tick.tick().await;
        link.report_inline_shakes();
    }
}

/// Why a stream's reading ended.
enum End {
    Shutdown,
    Lost(String),
}

async fn read_loop<R: AsyncRead + Unpin>(link: &Link, read: R) -> End {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let mut body = Vec::new();
    loop {
        match wire::read::<Down, _>(&mut reader, &mut body).await {
            Ok(Some(Down::Frame { conn, frame })) => link.deliver(conn, frame),
            Ok(Some(Down::ToAll(frame))) => {
                // Sent after the lock is released, so connects and
                // disconnects are not held up by thousands of sends.
                let outboxes: Vec<Outbox> = link.conns().values().map(|e| e.outbox.clone()).collect();
                for outbox in outboxes {
                    outbox.send(frame.clone());
                }
            }
            Ok(Some(Down::Gate(view))) => {
                *write(&link.gate) = view;
            }
            Ok(Some(Down::Shutdown)) => return End::Shutdown,
            Ok(None) => return End::Lost("closed by the core".into()),
            Err(e) => return End::Lost(e.to_string()),
        }
    }
}

impl LinkClient {
    /// Resolves when the core asked this gateway to stop or the link is gone.
    pub async fn ended(&mut self) {
        let _ = self.ended.wait_for(|e| *e).await;
    }

    /// Sends what is still queued (the disconnects of closing connections)
    /// and closes the link.
    pub async fn close(self) {
        self.reporter.abort();
        self.link.report_inline_shakes();
        self.link.queue().close();
        if let Ok(Err(e)) = self.writer.await {
            tracing::debug!(error = %e, "link writer ended");
        }
        self.reader.abort();
    }
}

/// A cluster gateway's link to one SET (`connect_resilient`): the task that
/// keeps it up.
pub struct LinkSupervisor {
    link: Arc<Link>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    up: watch::Receiver<bool>,
}

/// A link to `target` that is dialled until it answers and again whenever
/// it is lost; `name` says what it is in logs and errors ("SET 1 at …").
/// Returns at once: until the first link is up, requests are answered
/// `unavailable`.
pub fn connect_resilient(target: LinkTarget, key: String, name: String) -> (RemoteEngine, LinkSupervisor) {
    let down = SendQueue::new(0);
    down.close();
    let link = Arc::new(Link::new(name, down, true));
    let (stop, stop_rx) = watch::channel(false);
    let (up_tx, up) = watch::channel(false);
    let task = tokio::spawn(supervise(link.clone(), target, key, stop_rx, up_tx));
    (RemoteEngine { link: link.clone() }, LinkSupervisor { link, task, stop, up })
}

async fn supervise(
    link: Arc<Link>,
    target: LinkTarget,
    key: String,
    mut stop: watch::Receiver<bool>,
    up: watch::Sender<bool>,
) {
    let mut backoff = RECONNECT_MIN;
    let mut failures: u64 = 0;
    let reporter = tokio::spawn(report_loop(link.clone()));
    loop {
        let opened = tokio::select! {
            opened = target.open() => opened,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (read, write) = match opened {
            Ok(halves) => halves,
            Err(e) => {
                // Logged on the first failure and then every 64th: a SET that
                // is down for long does not flood the log.
                if failures.is_power_of_two() || failures.is_multiple_of(64) {
                    tracing::warn!(link = %link.name, error = %e, failures, "cannot link; retrying");
                }
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        failures = 0;
        backoff = RECONNECT_MIN;
        let queue = link.relink(&key);
        let writer = {
            let queue = queue.clone();
            tokio::spawn(async move { wire::write_loop(&queue, write).await })
        };
        tracing::info!(link = %link.name, "linked");
        let _ = up.send(true);
        let stopping = tokio::select! {
            end = read_loop(&link, read) => {
                match end {
                    End::Shutdown => tracing::warn!(link = %link.name, "the SET is stopping; linking again"),
                    End::Lost(why) => tracing::warn!(link = %link.name, why, "link lost; linking again"),
                }
                false
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            // The disconnects of the connections closing now go out first.
            link.report_inline_shakes();
            queue.close();
            let _ = tokio::time::timeout(CLOSE_FLUSH, writer).await;
            link.lost();
            let _ = up.send(false);
            break;
        }
        link.lost();
        let _ = up.send(false);
        writer.abort();
    }
    reporter.abort();
}

impl LinkSupervisor {
    /// Whether the link is up now.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Waits until the link is up, at most `within`; whether it is.
    pub async fn wait_up(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.up.wait_for(|u| *u)).await.is_ok_and(|r| r.is_ok())
    }

    /// How many connections this link knows (registered or attached).
    pub fn connections(&self) -> usize {
        self.link.conns().len()
    }

    /// Sends what is queued (the disconnects of closing connections) and
    /// stops linking.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl RemoteEngine {
    /// Tells the core this gateway's listeners are up.
    pub fn listening(&self) {
        let _ = self.link.queue().push_always(Up::Listening);
    }

    /// Registers a connection of `user` for requests only: its pushes come
    /// over another link (its home SET's). Never refused for a link that is
    /// down: it is introduced when the link is back.
    pub fn attach(&self, user: u64, outbox: Outbox) -> Result<RemoteConnection, EngineError> {
        self.link.introduce(user, outbox, false)
    }

    /// What this link is ("SET 1 at …").
    pub fn name(&self) -> &str {
        &self.link.name
    }
}

/// A connection registered through the link; its drop tells the core.
pub struct RemoteConnection {
    conn: u64,
    link: Arc<Link>,
}

impl Drop for RemoteConnection {
    fn drop(&mut self) {
        let mut conns = self.link.conns();
        conns.remove(&self.conn);
        // Must not be lost (the core would keep the connection registered),
        // so not shed when the queue is full; one per connection. Queued
        // under the lock: a relink either re-introduces the connection or
        // carries this.
        let _ = self.link.queue().push_always(Up::Disconnect { conn: self.conn });
    }
}

impl Backend for RemoteEngine {
    type Guard = RemoteConnection;

    fn answer_inline(&self, user: u64, req: &Request) -> Option<Reply> {
        let result = read(&self.link.gate).answer(user, req)?;
        let counter = if result == ShakeResult::None { &self.link.inline_none } else { &self.link.inline_not_running };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(Reply::Shake(result))
    }

    fn submit(&self, connection: &RemoteConnection, _user: u64, req: Request, responder: Responder) {
        let Responder::Client { request_id: id, .. } = &responder else {
            responder.send(Reply::error(ErrorCode::Internal, "a gateway only submits client requests"));
            return;
        };
        let id = *id;
        let is_shake = matches!(req, Request::Shake { .. });
        let conn = connection.conn;
        let pushed = if self.link.resilient {
            // Remembered before it goes, under the lock a lost link answers
            // the remembered ones under: each request is answered once.
            let mut conns = self.link.conns();
            let pushed = self.link.push(Up::Request { conn, id, req });
            if let (Ok(()), Some(entry)) = (&pushed, conns.get_mut(&conn)) {
                entry.pending.push(id);
            }
            pushed
        } else {
            self.link.push(Up::Request { conn, id, req })
        };
        if let Err(refused) = pushed {
            let reply = match refused {
                Refused::Full if is_shake => Reply::Shake(ShakeResult::Overload),
                Refused::Full => Reply::error(ErrorCode::Overload, "link to the engine is congested"),
                Refused::Closed if self.link.resilient => Reply::error(
                    ErrorCode::Unavailable,
                    format!("{} is unreachable: nothing was done; retry later", self.link.name),
                ),
                Refused::Closed => Reply::error(ErrorCode::ShuttingDown, "link to the engine is closed"),
            };
            responder.send(reply);
        }
    }

    fn connect(&self, user: u64, outbox: Outbox) -> impl Future<Output = Result<RemoteConnection, EngineError>> + Send {
        std::future::ready(self.link.introduce(user, outbox, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_request_and_disconnect_go_up_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (engine, _client) = connect(&LinkTarget::Unix(path.clone()), "key").await.unwrap();
        let (outbox, _rx) = Outbox::new(4);
        let conn = engine.connect(5, outbox.clone()).await.unwrap();
        engine.submit(&conn, 5, Request::Balance, Responder::Client { outbox, request_id: 3 });
        drop(conn);
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut body = Vec::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(wire::read::<Up, _>(&mut reader, &mut body).await.unwrap().unwrap());
        }
        assert!(matches!(&got[0], Up::Hello { key, .. } if key == "key"));
        assert_eq!(
            got[1..],
            [
                Up::Connect { conn: 1, user: 5 },
                Up::Request { conn: 1, id: 3, req: Request::Balance },
                Up::Disconnect { conn: 1 },
            ]
        );
    }

    #[tokio::test]
    async fn frames_reach_their_connection_and_a_broadcast_reaches_all() {
        use hongbao_proto::{Push, PushBody, ServerFrame};
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (engine, mut client) = connect(&LinkTarget::Unix(path.clone()), "key").await.unwrap();
        let (a, mut ra) = Outbox::new(4);
        let (b, mut rb) = Outbox::new(4);
        let _ca = engine.connect(1, a).await.unwrap();
        let _cb = engine.connect(2, b).await.unwrap();
        let (mut core, _) = listener.accept().await.unwrap();
        let push = ServerFrame::Push(Push { msg: 0, body: PushBody::Notice { topic: "t".into(), text: "x".into() } });
        let reply = ServerFrame::Reply { id: 4, reply: Reply::Pong };
        let mut buf = Vec::new();
        wire::encode(&Down::Frame { conn: 2, frame: reply.clone() }, &mut buf).unwrap();
        wire::encode(&Down::ToAll(push.clone()), &mut buf).unwrap();
        wire::encode(&Down::Frame { conn: 99, frame: reply.clone() }, &mut buf).unwrap();
        wire::encode(&Down::Shutdown, &mut buf).unwrap();
        core.write_all(&buf).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), client.ended()).await.expect("shutdown ends the link");
        assert_eq!(ra.try_recv(), Some(push.clone()));
        assert_eq!(ra.try_recv(), None, "a frame for an unknown connection goes nowhere");
        assert_eq!((rb.try_recv(), rb.try_recv()), (Some(reply), Some(push)));
    }

    /// The next frame queued for a connection, within 5 s.
    async fn next_frame(rx: &mut hongbao_boundary::OutboxReceiver) -> hongbao_proto::ServerFrame {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(frame) = rx.try_recv() {
                return frame;
            }
            assert!(tokio::time::Instant::now() < deadline, "no frame in time");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// The next message a fake core reads, within 5 s.
    async fn next_up<R: AsyncRead + Unpin>(reader: &mut R, body: &mut Vec<u8>) -> Up {
        let read = wire::read::<Up, _>(reader, body);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_resilient_link_answers_what_it_lost_and_introduces_its_connections_again() {
        use hongbao_proto::ServerFrame;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (engine, mut supervisor) =
            connect_resilient(LinkTarget::Tcp(addr.to_string()), "key".into(), "SET 1".into());
        let (outbox, mut replies) = Outbox::new(16);

        // The first link: hello, then a registered and an attached connection.
        let (stream, _) = listener.accept().await.unwrap();
        // No listener while the core is down: every redial is refused.
        drop(listener);
        let (read, mut core) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut body = Vec::new();
        assert!(matches!(next_up(&mut reader, &mut body).await, Up::Hello { key, .. } if key == "key"));
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Listening);
        assert!(supervisor.wait_up(std::time::Duration::from_secs(5)).await);
        let home = engine.connect(7, outbox.clone()).await.unwrap();
        let visitor = engine.attach(8, outbox.clone()).unwrap();
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Connect { conn: 1, user: 7 });
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Attach { conn: 2, user: 8 });
        // Two requests; the core answers one, then dies.
        engine.submit(&home, 7, Request::Balance, Responder::Client { outbox: outbox.clone(), request_id: 1 });
        engine.submit(
            &visitor,
            8,
            Request::Open { packet: 5 },
            Responder::Client { outbox: outbox.clone(), request_id: 2 },
        );
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Request { conn: 1, id: 1, req: Request::Balance });
        assert_eq!(
            next_up(&mut reader, &mut body).await,
            Up::Request { conn: 2, id: 2, req: Request::Open { packet: 5 } }
        );
        let answer = ServerFrame::Reply { id: 1, reply: Reply::Balance { balance_fen: 3 } };
        let mut buf = Vec::new();
        wire::encode(&Down::Frame { conn: 1, frame: answer.clone() }, &mut buf).unwrap();
        core.write_all(&buf).await.unwrap();
        assert_eq!(next_frame(&mut replies).await, answer);
        drop((reader, core));

        // The unanswered request is answered `unavailable`, once; so is a new one.
        let ServerFrame::Reply { id: 2, reply: Reply::Error { code: ErrorCode::Unavailable, message } } =
            next_frame(&mut replies).await
        else {
            panic!("the lost request is answered unavailable")
        };
        assert!(message.contains("SET 1"), "{message}");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while supervisor.is_up() {
            assert!(tokio::time::Instant::now() < deadline, "the loss is noticed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        engine.submit(&home, 7, Request::Balance, Responder::Client { outbox: outbox.clone(), request_id: 3 });
        assert!(matches!(
            next_frame(&mut replies).await,
            ServerFrame::Reply { id: 3, reply: Reply::Error { code: ErrorCode::Unavailable, .. } }
        ));
        // A connection made meanwhile is introduced with the others.
        let late = engine.connect(9, outbox.clone()).await.unwrap();

        // The next link introduces both connections again under their ids.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (read, _core) = stream.into_split();
        let mut reader = BufReader::new(read);
        assert!(matches!(next_up(&mut reader, &mut body).await, Up::Hello { .. }));
        let mut again = Vec::new();
        for _ in 0..3 {
            again.push(next_up(&mut reader, &mut body).await);
        }
        again.sort_by_key(|up| match up {
            Up::Connect { conn, .. } | Up::Attach { conn, .. } => *conn,
            _ => u64::MAX,
        });
        assert_eq!(
            again,
            [Up::Connect { conn: 1, user: 7 }, Up::Attach { conn: 2, user: 8 }, Up::Connect { conn: 3, user: 9 }]
        );
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Listening);
        drop(visitor);
        assert_eq!(next_up(&mut reader, &mut body).await, Up::Disconnect { conn: 2 });
        assert_eq!(supervisor.connections(), 2);
        drop((home, late));
        supervisor.close().await;
    }
}
