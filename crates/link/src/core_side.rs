//! The core's side of the links: one listening socket (a Unix socket for
//! the gateway processes `serve --gateways N` starts, a TCP address for the
//! gateways of a cluster, `hongbao set`), one task per gateway process
//! linked to it.
//!
//! Each remote connection is registered with the engine like a local one,
//! with a forwarding outbox (`Outbox::forwarding`) whose frames go to this
//! link's writer tagged with the connection's id on the gateway. Requests
//! are handed to the engine exactly as the in-process gateway does
//! (`answer_inline`, then `submit`), so shards, the push hub and storage
//! neither know nor care which process holds a connection.
//!
//! A cluster gateway sends `Connect` only to its connection's home SET (the
//! registration there is what pushes reach); requests it sends to another
//! SET come from connections it `Attach`es there: known by id and user so
//! the reply finds its way back, never registered for pushes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hongbao_boundary::listen::{AcceptBackoff, LogLimiter};
use hongbao_boundary::sync::lock;
use hongbao_boundary::{constant_time_eq, FrameSink, LinkedEngine, Outbox, Responder};
use hongbao_proto::{ErrorCode, Request, ServerFrame, ShakeResult};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::limits::{HELLO_TIMEOUT_MS, QUEUE_MESSAGES_MAX, READ_BUFFER_BYTES};
use crate::wire::{self, Down, Refused, SendQueue, Up};
use crate::LinkError;

/// A bound link socket, not yet accepting.
pub struct LinkListener<E> {
    listener: Listener,
    key: Arc<str>,
    engine: E,
}

enum Listener {
    /// Removed again when the listener stops.
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// One accepted link's two halves, whatever the transport.
type Halves = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>);

impl Listener {
    async fn accept(&self) -> std::io::Result<Halves> {
        match self {
            Listener::Unix(listener, _) => {
                let (read, write) = listener.accept().await?.0.into_split();
                Ok((Box::new(read), Box::new(write)))
            }
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // The writer batches on its own; Nagle would only add delay.
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                Ok((Box::new(read), Box::new(write)))
            }
        }
    }
}

impl<E: LinkedEngine> LinkListener<E> {
    /// Binds the link socket at `path`, readable and writable by this user
    /// only. A socket file left by an earlier run is replaced: the caller
    /// holds the data directory's lock, so no live server owns it.
    pub fn bind(path: &Path, key: String, engine: E) -> Result<LinkListener<E>, LinkError> {
        let socket_err = |source| LinkError::Socket { path: path.to_owned(), source };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
        Ok(LinkListener { listener: Listener::Unix(listener, path.to_owned()), key: key.into(), engine })
    }

    /// Binds a TCP link listener (a SET of a cluster). Anyone who can reach
    /// the address may connect; only a peer that sends `key` first is served.
    pub async fn bind_tcp(addr: SocketAddr, key: String, engine: E) -> Result<LinkListener<E>, LinkError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| LinkError::Bind { addr, source })?;
        Ok(LinkListener { listener: Listener::Tcp(listener), key: key.into(), engine })
    }

    /// The Unix socket's path, for a Unix listener.
    pub fn path(&self) -> Option<&Path> {
        match &self.listener {
            Listener::Unix(_, path) => Some(path),
            Listener::Tcp(_) => None,
        }
    }

    /// The bound TCP address (port 0 resolved), for a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(listener) => listener.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Accepts gateway links until `shutdown` turns `true`; then tells every
    /// linked gateway to close its connections and exit.
    pub fn start(self, shutdown: watch::Receiver<bool>) -> LinkServer {
        let (listening_tx, listening_rx) = mpsc::channel(64);
        let census = LinkCensus::default();
        let accept = tokio::spawn(accept_loop(self, shutdown, listening_tx, census.clone()));
        LinkServer { listening: listening_rx, accept, census }
    }
}

/// How many connections each linked gateway process holds now, for the live
/// view (`hongbao-watch`): one entry per link, added at its hello and removed
/// when it ends, so it is bounded by the gateway processes `serve` starts.
#[derive(Clone, Default)]
pub struct LinkCensus(Arc<Mutex<BTreeMap<u32, Arc<dyn Counted>>>>);

/// Something that can say how many connections it holds.
trait Counted: Send + Sync {
    fn count(&self) -> usize;
}

impl<G: Send> Counted for Conns<G> {
    fn count(&self) -> usize {
        self.lock().len()
    }
}

impl LinkCensus {
    /// `(gateway pid, connections)` of every live link, by pid.
    pub fn read(&self) -> Vec<(u32, u64)> {
        // Counted outside the census lock: each count takes its link's lock.
        let links: Vec<(u32, Arc<dyn Counted>)> = lock(&self.0).iter().map(|(p, c)| (*p, c.clone())).collect();
        links.into_iter().map(|(pid, conns)| (pid, conns.count() as u64)).collect()
    }

    fn enter(&self, pid: u32, conns: Arc<dyn Counted>) {
        lock(&self.0).insert(pid, conns);
    }

    fn leave(&self, pid: u32) {
        lock(&self.0).remove(&pid);
    }
}

/// Accepting gateway links.
pub struct LinkServer {
    /// The pid of each gateway that reported its listeners up.
    listening: mpsc::Receiver<u32>,
    accept: JoinHandle<()>,
    census: LinkCensus,
}

impl LinkServer {
    /// The connections of each linked gateway process, read when asked.
    pub fn census(&self) -> LinkCensus {
        self.census.clone()
    }

    /// The pid of the next gateway to report its listeners up, if one does
    /// within `within`.
    pub async fn next_listening(&mut self, within: Duration) -> Result<Option<u32>, LinkError> {
        match tokio::time::timeout(within, self.listening.recv()).await {
            Ok(Some(pid)) => Ok(Some(pid)),
            Ok(None) => Err(LinkError::Protocol("the link listener stopped".into())),
            Err(_) => Ok(None),
        }
    }

    /// Waits until, after shutdown, every link has ended.
    pub async fn wait(self) {
        let _ = self.accept.await;
    }
}

async fn accept_loop<E: LinkedEngine>(
    listener: LinkListener<E>,
    mut shutdown: watch::Receiver<bool>,
    listening: mpsc::Sender<u32>,
    census: LinkCensus,
) {
    let mut links = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut accept_log = LogLimiter::for_accepts();
    loop {
        let accepted = tokio::select! {
            accepted = listener.listener.accept() => accepted,
            _ = shutdown.wait_for(|s| *s) => break,
            // Reap finished links so the set does not grow.
            Some(_) = links.join_next(), if !links.is_empty() => continue,
        };
        match accepted {
            Ok((read, write)) => {
                backoff.succeeded();
                let link = run_link(
                    read,
                    write,
                    listener.key.clone(),
                    listener.engine.clone(),
                    shutdown.clone(),
                    listening.clone(),
                    census.clone(),
                );
                links.spawn(link);
            }
            Err(e) => {
                let pause = backoff.failed();
                if let Some(suppressed) = accept_log.admit(tokio::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "link accept failed; pausing before the next try");
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener.listener {
        let _ = std::fs::remove_file(path);
    }
    while links.join_next().await.is_some() {}
}

/// The frames of one link's remote connections, on their way to its writer.
struct DownSink {
    queue: SendQueue<Down>,
}

impl FrameSink for DownSink {
    fn forward(&self, conn: u64, frame: ServerFrame) -> bool {
        match self.queue.push(Down::Frame { conn, frame }) {
            Ok(()) => true,
            Err(Refused::Full) => {
                // The gateway process is not keeping up: this connection is
                // closed (once: its outbox refuses from now on) rather than
                // left with a hole in its replies.
                metrics::counter!("hongbao_link_overflows_total").increment(1);
                let close = ServerFrame::Close { code: ErrorCode::Overload, message: "gateway link congested".into() };
                let _ = self.queue.push_always(Down::Frame { conn, frame: close });
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    fn forward_to_all(&self, frame: ServerFrame) -> bool {
        self.queue.push(Down::ToAll(frame)).is_ok()
    }
}

/// One remote connection as the core sees it; `G` is the engine's guard
/// that keeps it registered for pushes.
struct RemoteConn<G> {
    user: u64,
    outbox: Outbox,
    /// The push hub's registration, once the engine's `connect` is done.
    registration: Option<G>,
}

/// The remote connections of one link, by their id on the gateway.
struct Conns<G>(Mutex<HashMap<u64, RemoteConn<G>>>);

impl<G> Conns<G> {
    fn new() -> Conns<G> {
        Conns(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, RemoteConn<G>>> {
        lock(&self.0)
    }

    /// Stores the registration of a connection still there; otherwise
    /// (it ended while registering) drops it, which unregisters it.
    fn attach(&self, conn: u64, outbox: &Outbox, registration: G) {
        let mut map = self.lock();
        match map.get_mut(&conn) {
            Some(c) if c.outbox.same(outbox) => c.registration = Some(registration),
            _ => {
                drop(map);
                drop(registration);
            }
        }
    }

    /// Removes a connection. Its registration is dropped after the lock is
    /// released: unregistering takes a push-hub lock, and the hub may be
    /// forwarding to this link (which takes no lock of ours) meanwhile.
    fn remove(&self, conn: u64) {
        let removed = self.lock().remove(&conn);
        if let Some(c) = removed {
            c.outbox.close_forwarding();
            drop(c);
        }
    }

    fn remove_all(&self) -> usize {
        let all: Vec<RemoteConn<G>> = self.lock().drain().map(|(_, c)| c).collect();
        for c in &all {
            c.outbox.close_forwarding();
        }
        all.len()
    }
}

/// Keeps the gateway's copy of the shake gates current: the view now, then
/// a fresh one after every change (changes in between coalesce).
async fn send_gates<E: LinkedEngine>(engine: E, sink: Arc<DownSink>) {
    let mut changes = engine.gate_changes();
    loop {
        changes.borrow_and_update();
        match sink.queue.push(Down::Gate(engine.gate_view())) {
            Ok(()) => {}
            Err(Refused::Full) => {
                // Retried with a then-current view; the gateway meanwhile
                // sends shakes on, which the shards answer correctly.
                tokio::time::sleep(Duration::from_millis(GATE_RETRY_MS)).await;
                continue;
            }
            Err(Refused::Closed) => return,
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Pause before a gate update refused by a full link queue is retried.
const GATE_RETRY_MS: u64 = 10;

async fn run_link<E: LinkedEngine>(
    read: Box<dyn AsyncRead + Send + Unpin>,
    write: Box<dyn AsyncWrite + Send + Unpin>,
    key: Arc<str>,
    engine: E,
    mut shutdown: watch::Receiver<bool>,
    listening: mpsc::Sender<u32>,
    census: LinkCensus,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let mut body = Vec::new();
    let Some(pid) = hello(&mut reader, &mut body, &key).await else { return };
    tracing::info!(gateway_pid = pid, "gateway linked");
    let sink = Arc::new(DownSink { queue: SendQueue::new(QUEUE_MESSAGES_MAX) });
    let writer = {
        let sink = sink.clone();
        tokio::spawn(async move { wire::write_loop(&sink.queue, write).await })
    };
    // Shutdown is told by a task of its own: reading must not be interrupted
    // mid-message.
    let stopper = {
        let sink = sink.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            let _ = sink.queue.push_always(Down::Shutdown);
        })
    };
    let gates = tokio::spawn(send_gates(engine.clone(), sink.clone()));
    let link = LinkedGateway { engine, conns: Arc::new(Conns::new()), sink: sink.clone(), pid, listening };
    census.enter(pid, link.conns.clone());
    let end = loop {
        match wire::read::<Up, _>(&mut reader, &mut body).await {
            Ok(Some(msg)) => {
                if let Err(e) = link.handle(msg) {
                    break Err(e);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    census.leave(pid);
    let dropped = link.conns.remove_all();
    match end {
        // The stopper has finished only if shutdown was asked for.
        Ok(()) if stopper.is_finished() => tracing::info!(gateway_pid = pid, "gateway link closed"),
        Ok(()) => tracing::warn!(gateway_pid = pid, connections = dropped, "gateway link lost"),
        Err(e) => tracing::warn!(gateway_pid = pid, connections = dropped, error = %e, "gateway link failed"),
    }
    stopper.abort();
    gates.abort();
    sink.queue.close();
    if let Ok(Err(e)) = writer.await {
        tracing::debug!(gateway_pid = pid, error = %e, "link writer ended");
    }
}

/// The gateway's first message must carry the link key: its pid, if it did
/// in time; `None` (logged) ends the link.
async fn hello<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, body: &mut Vec<u8>, key: &str) -> Option<u32> {
    let hello = tokio::time::timeout(Duration::from_millis(HELLO_TIMEOUT_MS), wire::read::<Up, _>(reader, body));
    match hello.await {
        // Compared in constant time: a local process may guess the key.
        Ok(Ok(Some(Up::Hello { key: given, pid }))) if constant_time_eq(given.as_bytes(), key.as_bytes()) => Some(pid),
        Ok(Ok(Some(Up::Hello { .. }))) => {
            tracing::warn!("a gateway link with a wrong key was refused");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a gateway link failed before its hello");
            None
        }
        _ => {
            tracing::warn!("a gateway link sent no hello in time");
            None
        }
    }
}

/// One linked gateway process as the core serves it.
struct LinkedGateway<E: LinkedEngine> {
    engine: E,
    conns: Arc<Conns<E::Registration>>,
    sink: Arc<DownSink>,
    pid: u32,
    /// Told the gateway's pid once its listeners are up.
    listening: mpsc::Sender<u32>,
}

impl<E: LinkedEngine> LinkedGateway<E> {
    /// One message from the gateway; an error ends the link.
    fn handle(&self, msg: Up) -> Result<(), LinkError> {
        match msg {
            Up::Request { conn, id, req } => self.request(conn, id, req),
            Up::Connect { conn, user } => return self.connect(conn, user),
            Up::Attach { conn, user } => return self.attach(conn, user),
            Up::Disconnect { conn } => self.conns.remove(conn),
            Up::InlineShakes { none, not_running } => {
                self.engine.count_remote_shakes(&ShakeResult::None, none);
                self.engine.count_remote_shakes(&ShakeResult::NotRunning, not_running);
            }
            Up::Listening => {
                let _ = self.listening.try_send(self.pid);
            }
            Up::Hello { .. } => return Err(LinkError::Protocol("a second hello".into())),
        }
        Ok(())
    }

    /// A request of a remote connection, handed to the engine exactly as the
    /// in-process gateway does.
    fn request(&self, conn: u64, id: u64, req: Request) {
        let Some((user, outbox)) = self.conns.lock().get(&conn).map(|c| (c.user, c.outbox.clone())) else {
            // The connection ended while its request was on the way.
            return;
        };
        match self.engine.answer_inline(user, &req) {
            Some(reply) => {
                outbox.send(ServerFrame::Reply { id, reply });
            }
            None => self.engine.submit(user, req, Responder::Client { outbox, request_id: id }),
        }
    }

    /// A new remote connection: registered with the engine behind a
    /// forwarding outbox, in the background.
    fn connect(&self, conn: u64, user: u64) -> Result<(), LinkError> {
        let outbox = self.insert(conn, user)?;
        let (engine, conns) = (self.engine.clone(), self.conns.clone());
        tokio::spawn(async move {
            match engine.register(user, outbox.clone()).await {
                Ok(registration) => conns.attach(conn, &outbox, registration),
                Err(e) => {
                    let message = format!("cannot register connection: {e}");
                    outbox.send(ServerFrame::Close { code: e.code(), message });
                }
            }
        });
        Ok(())
    }

    /// A remote connection whose requests come here but whose pushes come
    /// from its home SET: known, never registered with the push hub.
    fn attach(&self, conn: u64, user: u64) -> Result<(), LinkError> {
        self.insert(conn, user).map(drop)
    }

    /// Adds a connection with its forwarding outbox; an id in use ends the link.
    fn insert(&self, conn: u64, user: u64) -> Result<Outbox, LinkError> {
        let sink: Arc<dyn FrameSink> = self.sink.clone();
        let outbox = Outbox::forwarding(conn, sink);
        let replaced = self.conns.lock().insert(conn, RemoteConn { user, outbox: outbox.clone(), registration: None });
        if let Some(old) = replaced {
            // Dropped outside the lock (unregistering takes a hub lock).
            old.outbox.close_forwarding();
            drop(old);
            return Err(LinkError::Protocol(format!("connection id {conn} used twice")));
        }
        Ok(outbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{Push, PushBody, Reply, Request};
    use hongbao_shard::{Engine, EngineConfig, PushTarget};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    struct Peer {
        reader: BufReader<tokio::net::unix::OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
        body: Vec<u8>,
    }

    impl Peer {
        async fn connect(path: &Path) -> Peer {
            let (read, writer) = UnixStream::connect(path).await.unwrap().into_split();
            Peer { reader: BufReader::new(read), writer, body: Vec::new() }
        }
        async fn send(&mut self, msg: Up) {
            let mut buf = Vec::new();
            wire::encode(&msg, &mut buf).unwrap();
            self.writer.write_all(&buf).await.unwrap();
        }
        async fn recv(&mut self) -> Option<Down> {
            let next = wire::read::<Down, _>(&mut self.reader, &mut self.body);
            tokio::time::timeout(Duration::from_secs(5), next).await.expect("a message or the end in time").ok()?
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_keyed_link_speaks_for_users_and_bad_links_harm_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(EngineConfig::default(), dir.path()).await.unwrap();
        let path = dir.path().join("link.sock");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut server = LinkListener::bind(&path, "right".into(), engine.clone()).unwrap().start(stop_rx);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is private to its user");

        // A wrong key, garbage, and an oversized message: each link is closed.
        let mut wrong = Peer::connect(&path).await;
        wrong.send(Up::Hello { key: "wrong".into(), pid: 1 }).await;
        assert_eq!(wrong.recv().await, None);
        let mut garbage = Peer::connect(&path).await;
        garbage.writer.write_all(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert_eq!(garbage.recv().await, None);

        // The right key: a connection registers, asks, and gets pushes.
        let mut good = Peer::connect(&path).await;
        good.send(Up::Hello { key: "right".into(), pid: 2 }).await;
        good.send(Up::Listening).await;
        assert_eq!(server.next_listening(Duration::from_secs(5)).await.unwrap(), Some(2));
        // First the shake gates: no campaign runs, so every shard is closed.
        let Some(Down::Gate(view)) = good.recv().await else { panic!("gates first") };
        assert_eq!(view.gates.len(), 4);
        assert!(view.gates.iter().all(|g| !g.open && !g.ready));
        good.send(Up::Connect { conn: 1, user: 7 }).await;
        good.send(Up::Request { conn: 1, id: 9, req: Request::Balance }).await;
        let reply = good.recv().await.unwrap();
        assert_eq!(
            reply,
            Down::Frame { conn: 1, frame: ServerFrame::Reply { id: 9, reply: Reply::Balance { balance_fen: 0 } } }
        );
        let body = PushBody::Notice { topic: "t".into(), text: "x".into() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            // Registration finishes in the background after `Connect`.
            let receipt = engine.push(PushTarget::User(7), body.clone(), false).await.unwrap();
            if receipt.delivered == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "connection never registered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.census().read(), vec![(2, 1)], "the census counts the link's connection");
        let push = good.recv().await.unwrap();
        assert_eq!(push, Down::Frame { conn: 1, frame: ServerFrame::Push(Push { msg: 0, body: body.clone() }) });
        // A broadcast crosses the link once, for the gateway to fan out.
        let task = engine.broadcast(body.clone()).unwrap();
        assert_eq!(good.recv().await.unwrap(), Down::ToAll(ServerFrame::Push(Push { msg: 0, body: body.clone() })));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while engine.task(task.id).unwrap().state != "done" {
            assert!(tokio::time::Instant::now() < deadline, "broadcast task never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(engine.task(task.id).unwrap().delivered, 1, "the remote connection counts as reached");

        // A request for an unknown connection is ignored; a disconnect
        // unregisters; a reused connection id ends the link.
        good.send(Up::Request { conn: 99, id: 1, req: Request::Balance }).await;
        good.send(Up::Disconnect { conn: 1 }).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while engine.stats().await.connections != 0 {
            assert!(tokio::time::Instant::now() < deadline, "connection never unregistered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        good.send(Up::Connect { conn: 2, user: 8 }).await;
        good.send(Up::Connect { conn: 2, user: 8 }).await;
        assert_eq!(good.recv().await, None, "a protocol error closes the link");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !server.census().read().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "an ended link stays in the census");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Shutdown is announced to linked gateways.
        let mut last = Peer::connect(&path).await;
        last.send(Up::Hello { key: "right".into(), pid: 3 }).await;
        last.send(Up::Listening).await;
        assert_eq!(server.next_listening(Duration::from_secs(5)).await.unwrap(), Some(3));
        assert!(matches!(last.recv().await, Some(Down::Gate(_))));
        stop_tx.send(true).unwrap();
        assert_eq!(last.recv().await, Some(Down::Shutdown));
        drop(last);
        tokio::time::timeout(Duration::from_secs(5), server.wait()).await.expect("links end after shutdown");
        assert!(!path.exists(), "the socket file is removed");
        engine.shutdown().await;
    }
}
