//! The client-side toolkit of hongbao, shared by the black-box tests, the
//! load simulator (`hongbao-sim`) and the perf figures (`hongbao-perf`):
//! - `Client`: a TCP protocol client (replies matched to requests by id,
//!   pushes collected), and `Admin`, a blocking admin-API client;
//! - `frames` (binary frames: encode client frames, split or read server
//!   frames), `handshake` (hello, welcome) and `net` (connections from a
//!   chosen loopback address and port): the pieces the lean clients of the
//!   simulator and the perf figures are built from;
//! - `spawn_server` (start a `hongbao serve` child and read its ready line)
//!   and `procfs` (CPU time, memory, sockets and limits of processes).
//!
//! Must not: know anything about the server's internals; it speaks only the
//! documented protocol (docs/protocol.md) and HTTP API (docs/api.md), and
//! reads other processes only through `/proc`.

pub mod frames;
pub mod handshake;
pub mod net;
pub mod probe;
mod process;
pub mod procfs;

pub use process::{spawn_ready, spawn_server, ServerAddrs, SpawnError};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hongbao_proto::{ErrorCode, Push, Reply, Request, ServerFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Pushes buffered per client before further ones are dropped (and counted).
const PUSHES_BUFFERED_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection: {code:?} {message}")]
    Closed { code: ErrorCode, message: String },
    #[error("connection ended without a reply")]
    Disconnected,
    #[error("no reply within the timeout")]
    Timeout,
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Requests waiting for their reply, and whether the reader has ended: a
/// request made after that would wait for a reply that cannot come.
#[derive(Default)]
struct Waiting {
    replies: HashMap<u64, oneshot::Sender<Reply>>,
    ended: bool,
}

type Pending = Arc<Mutex<Waiting>>;

/// One TCP connection speaking binary frames.
pub struct Client {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    pushes: mpsc::Receiver<Push>,
    closed: Arc<Mutex<Option<(ErrorCode, String)>>>,
    pub dropped_pushes: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let closed: Arc<Mutex<Option<(ErrorCode, String)>>> = Arc::default();
        let dropped_pushes = Arc::new(AtomicU64::new(0));
        let (push_tx, pushes) = mpsc::channel(PUSHES_BUFFERED_MAX);
        let reader = {
            let (pending, closed, dropped) = (pending.clone(), closed.clone(), dropped_pushes.clone());
            tokio::spawn(async move {
                loop {
                    match frames::read(&mut read).await {
                        Ok(ServerFrame::Reply { id, reply }) => {
                            if let Some(tx) = pending.lock().expect("pending poisoned").replies.remove(&id) {
                                let _ = tx.send(reply);
                            }
                        }
                        Ok(ServerFrame::Push(p)) => {
                            if push_tx.try_send(p).is_err() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(ServerFrame::Close { code, message }) => {
                            *closed.lock().expect("closed poisoned") = Some((code, message));
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Wake everyone still waiting: their replies will not come;
                // nor will those of later requests.
                let mut waiting = pending.lock().expect("pending poisoned");
                waiting.ended = true;
                waiting.replies.clear();
            })
        };
        Ok(Client {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            pushes,
            closed,
            dropped_pushes,
            reader,
        })
    }

    /// Connects and completes the handshake.
    pub async fn connect_with_token(addr: SocketAddr, token: &str) -> Result<(Client, Reply), ClientError> {
        let client = Client::connect(addr).await?;
        let welcome = client.request(Request::Hello { token: token.to_owned() }).await?;
        Ok((client, welcome))
    }

    /// Sends a request and waits (up to 10 s) for its reply.
    pub async fn request(&self, req: Request) -> Result<Reply, ClientError> {
        self.request_timeout(req, Duration::from_secs(10)).await
    }

    pub async fn request_timeout(&self, req: Request, timeout: Duration) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.pending.lock().expect("pending poisoned");
            if waiting.ended {
                return Err(self.close_error());
            }
            waiting.replies.insert(id, tx);
        }
        self.send_raw(&frames::encode(id, req)).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(self.close_error()),
            Err(_) => {
                self.pending.lock().expect("pending poisoned").replies.remove(&id);
                Err(ClientError::Timeout)
            }
        }
    }

    fn close_error(&self) -> ClientError {
        match self.close_reason() {
            Some((code, message)) => ClientError::Closed { code, message },
            None => ClientError::Disconnected,
        }
    }

    /// Writes bytes as they are: for tests of malformed input.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await?;
        Ok(())
    }

    /// Shuts down the write side (the server sees EOF).
    pub async fn shutdown_write(&self) -> Result<(), ClientError> {
        self.writer.lock().await.shutdown().await?;
        Ok(())
    }

    /// The next push, waiting up to `timeout`.
    pub async fn next_push(&mut self, timeout: Duration) -> Option<Push> {
        tokio::time::timeout(timeout, self.pushes.recv()).await.ok().flatten()
    }

    /// Why the server closed this connection, once it has.
    pub fn close_reason(&self) -> Option<(ErrorCode, String)> {
        self.closed.lock().expect("closed poisoned").clone()
    }

    /// Waits until the server closes the connection, up to `timeout`.
    pub async fn wait_closed(&self, timeout: Duration) -> Option<(ErrorCode, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.reader.is_finished() {
                return self.close_reason();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.close_reason()
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }
}

/// Blocking admin-API client (call it from `spawn_blocking` in async code).
#[derive(Clone)]
pub struct Admin {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

/// An admin API response: status and JSON body.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

impl AdminResponse {
    /// The body, if the status is 2xx; otherwise an error naming both.
    pub fn ok(self) -> Result<serde_json::Value, String> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            Err(format!("HTTP {}: {}", self.status, self.body))
        }
    }
}

impl Admin {
    pub fn new(addr: SocketAddr, key: Option<String>) -> Admin {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Admin { base: format!("http://{addr}"), key, agent }
    }

    fn finish(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<AdminResponse, String> {
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Ok(AdminResponse { status, body })
    }

    pub fn get(&self, path: &str) -> Result<AdminResponse, String> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        Self::finish(req.call())
    }

    /// POST (or PUT when `put`) a raw body, for tests of malformed JSON.
    pub fn send_raw(&self, method: &str, path: &str, body: &str) -> Result<AdminResponse, String> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "PUT" => self.agent.put(url),
            _ => self.agent.post(url),
        };
        req = req.header("content-type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        Self::finish(req.send(body))
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<AdminResponse, String> {
        self.send_raw("POST", path, &body.to_string())
    }

    pub fn put(&self, path: &str, body: &serde_json::Value) -> Result<AdminResponse, String> {
        self.send_raw("PUT", path, &body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request made after the server closed the connection fails as
    /// disconnected instead of waiting out its time limit for a reply that
    /// cannot come.
    #[tokio::test]
    async fn a_request_after_the_connection_ended_fails_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Client::connect(addr).await.unwrap();
        drop(listener.accept().await.unwrap());
        assert!(client.wait_closed(Duration::from_secs(30)).await.is_none(), "closed without a close frame");
        assert!(client.is_closed());
        let r = client.request_timeout(Request::Ping, Duration::from_secs(3600)).await;
        assert!(matches!(r, Err(ClientError::Disconnected)), "{r:?}");
    }
}
