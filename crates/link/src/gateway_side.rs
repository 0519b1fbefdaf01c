//! The gateway's side of a link: `RemoteEngine`, the gateway's `Backend`
//! when the shards live in the core process.
//!
//! A connection's `hello` becomes `Connect` (the connection gets an id on
//! this link), each request `Request`, and the connection's end
//! `Disconnect`. Frames coming back are put in the connection's own
//! outbox, whose bound and slow-reader handling are the gateway's as usual.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hongbao_boundary::sync::{lock, read, write};
use hongbao_boundary::{Backend, EngineError, GateView, Outbox, Responder};
use hongbao_proto::{ErrorCode, Reply, Request, ShakeResult};
use tokio::io::BufReader;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::limits::{QUEUE_MESSAGES_MAX, READ_BUFFER_BYTES};
use crate::wire::{self, Down, Refused, SendQueue, Up};
use crate::LinkError;

/// The engine as a gateway process sees it: on the other end of a link.
/// Cheap to clone.
#[derive(Clone)]
pub struct RemoteEngine {
    link: Arc<Link>,
}

struct Link {
    up: SendQueue<Up>,
    /// This gateway's registered connections, by their id on the link.
    conns: Mutex<HashMap<u64, Outbox>>,
    next_conn: AtomicU64,
    /// The core's shake gates as last sent; empty (answer nothing) until then.
    gate: RwLock<GateView>,
    /// Shakes answered from `gate` and not yet reported to the core.
    inline_none: AtomicU64,
    inline_not_running: AtomicU64,
}

impl Link {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Outbox>> {
        lock(&self.conns)
    }

    /// Reports the shakes answered here since the last report.
    fn report_inline_shakes(&self) {
        let none = self.inline_none.swap(0, Ordering::Relaxed);
        let not_running = self.inline_not_running.swap(0, Ordering::Relaxed);
        if none + not_running > 0 && self.up.push(Up::InlineShakes { none, not_running }).is_err() {
            // Counted in the next report instead.
            self.inline_none.fetch_add(none, Ordering::Relaxed);
            self.inline_not_running.fetch_add(not_running, Ordering::Relaxed);
        }
    }
}

/// How often a gateway reports the shakes it answered itself.
const INLINE_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// The running link: its reader and writer tasks.
pub struct LinkClient {
    link: Arc<Link>,
    reader: JoinHandle<()>,
    writer: JoinHandle<Result<(), LinkError>>,
    reporter: JoinHandle<()>,
    /// Becomes `true` when the core says `Shutdown` or the link is lost.
    ended: watch::Receiver<bool>,
}

/// Connects to the core's link socket and introduces this process with `key`.
pub async fn connect(path: &Path, key: &str) -> Result<(RemoteEngine, LinkClient), LinkError> {
    let stream =
        UnixStream::connect(path).await.map_err(|source| LinkError::Socket { path: path.to_owned(), source })?;
    let (read, write) = stream.into_split();
    let link = Arc::new(Link {
        up: SendQueue::new(QUEUE_MESSAGES_MAX),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        gate: RwLock::new(GateView::default()),
        inline_none: AtomicU64::new(0),
        inline_not_running: AtomicU64::new(0),
    });
    link.up
        .push(Up::Hello { key: key.to_owned(), pid: std::process::id() })
        .map_err(|_| LinkError::Protocol("link closed before hello".into()))?;
    let writer = {
        let link = link.clone();
        tokio::spawn(async move { wire::write_loop(&link.up, write).await })
    };
    let (ended_tx, ended) = watch::channel(false);
    let reader = tokio::spawn(read_loop(link.clone(), read, ended_tx));
    let reporter = {
        let link = link.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INLINE_REPORT_INTERVAL);
            loop {
                tick.tick().await;
                link.report_inline_shakes();
            }
        })
    };
    Ok((RemoteEngine { link: link.clone() }, LinkClient { link, reader, writer, reporter, ended }))
}

async fn read_loop(link: Arc<Link>, read: OwnedReadHalf, ended: watch::Sender<bool>) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let mut body = Vec::new();
    loop {
        match wire::read::<Down, _>(&mut reader, &mut body).await {
            Ok(Some(Down::Frame { conn, frame })) => {
                // A frame for a connection that has just ended is dropped.
                if let Some(outbox) = link.conns().get(&conn) {
                    outbox.send(frame);
                }
            }
            Ok(Some(Down::ToAll(frame))) => {
                // Sent after the lock is released, so connects and
                // disconnects are not held up by thousands of sends.
                let outboxes: Vec<Outbox> = link.conns().values().cloned().collect();
                for outbox in outboxes {
                    outbox.send(frame.clone());
                }
            }
            Ok(Some(Down::Gate(view))) => {
                *write(&link.gate) = view;
            }
            Ok(Some(Down::Shutdown)) => {
                tracing::info!("the core asked this gateway to stop");
                break;
            }
            Ok(None) => {
                tracing::warn!("link to the core lost");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "link to the core failed");
                break;
            }
        }
    }
    let _ = ended.send(true);
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
        self.link.up.close();
        if let Ok(Err(e)) = self.writer.await {
            tracing::debug!(error = %e, "link writer ended");
        }
        self.reader.abort();
    }
}

impl RemoteEngine {
    /// Tells the core this gateway's listeners are up.
    pub fn listening(&self) {
        let _ = self.link.up.push_always(Up::Listening);
    }

    fn connect_now(&self, user: u64, outbox: Outbox) -> Result<RemoteConnection, EngineError> {
        let conn = self.link.next_conn.fetch_add(1, Ordering::Relaxed);
        self.link.conns().insert(conn, outbox);
        match self.link.up.push(Up::Connect { conn, user }) {
            Ok(()) => Ok(RemoteConnection { conn, link: self.link.clone() }),
            Err(refused) => {
                self.link.conns().remove(&conn);
                Err(match refused {
                    Refused::Full => EngineError::Overload,
                    Refused::Closed => EngineError::Internal("the link to the engine is closed".into()),
                })
            }
        }
    }
}

/// A connection registered through the link; its drop tells the core.
pub struct RemoteConnection {
    conn: u64,
    link: Arc<Link>,
}

impl Drop for RemoteConnection {
    fn drop(&mut self) {
        self.link.conns().remove(&self.conn);
        // Must not be lost (the core would keep the connection registered),
        // so not shed when the queue is full; one per connection.
        let _ = self.link.up.push_always(Up::Disconnect { conn: self.conn });
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
        if let Err(refused) = self.link.up.push(Up::Request { conn: connection.conn, id, req }) {
            let reply = match refused {
                Refused::Full if is_shake => Reply::Shake(ShakeResult::Overload),
                Refused::Full => Reply::error(ErrorCode::Overload, "link to the engine is congested"),
                Refused::Closed => Reply::error(ErrorCode::ShuttingDown, "link to the engine is closed"),
            };
            responder.send(reply);
        }
    }

    fn connect(&self, user: u64, outbox: Outbox) -> impl Future<Output = Result<RemoteConnection, EngineError>> + Send {
        std::future::ready(self.connect_now(user, outbox))
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
        let (engine, _client) = connect(&path, "key").await.unwrap();
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
        let (engine, mut client) = connect(&path, "key").await.unwrap();
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
}
