//! One client connection: handshake, request dispatch, reply and push
//! delivery, timeouts.
//!
//! A connection is one task running `Session::run`, a `select!` over the
//! shutdown signal, the outbox's overflow flag, the outbox (replies and
//! pushes to write), the next frame from the peer and the idle deadline.
//! Transports differ only in how frames are read and written (`FrameIo`).
//!
//! Per-connection state is small and bounded: a frame buffer of at most
//! `FRAME_BYTES_MAX`, an outbox of `CONNECTION_OUTBOX_FRAMES_MAX` frames, and
//! at most `CONNECTION_INFLIGHT_MAX` in-flight request records.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hongbao_core::limits::{CONNECTION_INFLIGHT_MAX, CONNECTION_OUTBOX_FRAMES_MAX, FRAME_BYTES_MAX};
use hongbao_proto::{binary, ClientFrame, ErrorCode, Reply, Request, ServerFrame, ShakeResult, PROTOCOL_VERSION};
use hongbao_shard::{Outbox, Responder};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::codec::{decode_json, FrameError, FrameReader, ReadOutcome};
use crate::limits::{WRITE_BATCH_FRAMES_MAX, WRITE_TIMEOUT_S, WS_READ_BUFFER_BYTES, WS_WRITE_BUFFER_BYTES};
use crate::server::{Backend, Shared, Transport};

/// Runs one accepted connection to its end.
pub(crate) async fn run<B: Backend>(stream: TcpStream, peer: SocketAddr, transport: Transport, shared: &Shared<B>) {
    // The hello deadline starts at accept, so a WebSocket client cannot
    // hold a connection by upgrading slowly.
    let hello_deadline = Instant::now() + Duration::from_secs(shared.config.hello_timeout_s.into());
    match transport {
        Transport::Tcp => serve(TcpIo::new(stream), peer, transport, shared, hello_deadline).await,
        Transport::Ws => match tokio::time::timeout_at(hello_deadline, ws_accept(stream)).await {
            Ok(Ok(ws)) => serve(WsIo::new(ws), peer, transport, shared, hello_deadline).await,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "websocket handshake failed");
                count_protocol_error(ErrorCode::Malformed);
            }
            Err(_) => count_protocol_error(ErrorCode::IdleTimeout),
        },
    }
}

/// Serves a connection until it ends, then tells the peer why (if it
/// should hear) and closes the socket.
pub(crate) async fn serve<B: Backend, I: FrameIo>(
    mut io: I,
    peer: SocketAddr,
    transport: Transport,
    shared: &Shared<B>,
    hello_deadline: Instant,
) {
    let (mut session, mut outbox_rx) = Session::new(shared, transport);
    let end = session.run(&mut io, &mut outbox_rx, hello_deadline).await;
    // Unregister from pushes before the socket goes.
    drop(session);
    let write_timeout = Duration::from_secs(WRITE_TIMEOUT_S);
    match end {
        End::Fatal(code, message) => {
            tracing::debug!(%peer, code = code.as_str(), %message, "closing connection");
            if code != ErrorCode::ShuttingDown {
                count_protocol_error(code);
            }
            // Best effort: the peer may already be gone.
            let _ = timeout(write_timeout, io.send(&[ServerFrame::Close { code, message }])).await;
            let _ = timeout(write_timeout, io.close(code)).await;
        }
        End::Quiet => {
            let _ = timeout(write_timeout, io.close(ErrorCode::ShuttingDown)).await;
        }
    }
}

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Close with this code and message (a `Close` frame is still to be sent).
    Fatal(ErrorCode, String),
    /// The peer is gone, or it has already been sent its `Close` frame.
    Quiet,
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> End {
    End::Fatal(code, message.into())
}

fn count_protocol_error(code: ErrorCode) {
    metrics::counter!("hongbao_protocol_errors_total", "code" => code.as_str()).increment(1);
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The `result` metric label of a reply.
fn result_label(reply: &Reply) -> &'static str {
    match reply {
        Reply::Shake(ShakeResult::Won { .. }) => "won",
        Reply::Shake(ShakeResult::None) => "none",
        Reply::Shake(ShakeResult::Overload) => "overload",
        Reply::Shake(ShakeResult::NotRunning) => "not_running",
        Reply::Error { code, .. } => code.as_str(),
        _ => "ok",
    }
}

fn count_request(op: &'static str, reply: &Reply) {
    metrics::counter!("hongbao_requests_total", "op" => op, "result" => result_label(reply)).increment(1);
}

/// A request handed to the engine and not yet answered.
struct InFlight {
    id: u64,
    op: &'static str,
    started: Instant,
}

struct Session<'a, B: Backend> {
    shared: &'a Shared<B>,
    transport: Transport,
    /// The authenticated user; `None` until `hello` succeeds.
    user: Option<u64>,
    /// Keeps this connection registered for pushes; dropping it unregisters.
    registration: Option<B::Guard>,
    /// Cloned into every request's `Responder` and into the push hub.
    outbox: Outbox,
    /// Submitted requests not yet answered, for the in-flight limit and the
    /// latency histogram. A `Vec` because it holds at most
    /// `CONNECTION_INFLIGHT_MAX` entries, and most connections have none.
    inflight: Vec<InFlight>,
}

impl<'a, B: Backend> Session<'a, B> {
    fn new(shared: &'a Shared<B>, transport: Transport) -> (Session<'a, B>, hongbao_shard::OutboxReceiver) {
        let (outbox, rx) = Outbox::new(CONNECTION_OUTBOX_FRAMES_MAX);
        (Session { shared, transport, user: None, registration: None, outbox, inflight: Vec::new() }, rx)
    }
}

impl<B: Backend> Session<'_, B> {
    async fn run<I: FrameIo>(
        &mut self,
        io: &mut I,
        rx: &mut hongbao_shard::OutboxReceiver,
        hello_deadline: Instant,
    ) -> End {
        let mut shutdown = self.shared.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return fatal(ErrorCode::ShuttingDown, "server is shutting down");
        }
        let idle = Duration::from_secs(self.shared.config.idle_timeout_s.into());
        let deadline = sleep_until(hello_deadline);
        tokio::pin!(deadline);
        let mut batch = Vec::with_capacity(0);
        loop {
            // Biased: shutdown and slow-consumer checks first, then write
            // what is queued before reading more, so a client that floods
            // requests is held back by its own replies.
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    // A dropped sender also ends the server.
                    if changed.is_err() || *shutdown.borrow() {
                        return fatal(ErrorCode::ShuttingDown, "server is shutting down");
                    }
                }
                () = rx.overflow.notified() => {
                    return fatal(ErrorCode::SlowConsumer, "too many replies and pushes queued; read faster");
                }
                Some(frame) = rx.frames.recv() => {
                    batch.push(frame);
                    while batch.len() < WRITE_BATCH_FRAMES_MAX {
                        match rx.frames.try_recv() {
                            Ok(frame) => batch.push(frame),
                            Err(_) => break,
                        }
                    }
                    let end = self.write_outbox(io, &mut batch).await;
                    batch.clear();
                    if let Some(end) = end {
                        return end;
                    }
                }
                incoming = io.recv() => {
                    match incoming {
                        Incoming::Frame(frame) => {
                            if let Err(end) = self.handle(io, frame).await {
                                return end;
                            }
                            if self.user.is_some() {
                                deadline.as_mut().reset(Instant::now() + idle);
                            }
                        }
                        Incoming::Heartbeat => {
                            if self.user.is_some() {
                                deadline.as_mut().reset(Instant::now() + idle);
                            }
                            // Sends the pong the WebSocket layer queued.
                            if let Err(end) = self.write(io, &[]).await {
                                return end;
                            }
                        }
                        Incoming::Closed => return End::Quiet,
                        Incoming::Truncated => {
                            // Nobody is left to tell; count it and go.
                            count_protocol_error(ErrorCode::Malformed);
                            return End::Quiet;
                        }
                        Incoming::Bad(e) => return End::Fatal(e.code, e.message),
                    }
                }
                () = &mut deadline => {
                    return match self.user {
                        None => fatal(ErrorCode::IdleTimeout, "no hello in time"),
                        Some(_) => fatal(ErrorCode::IdleTimeout, "no frame within the idle timeout"),
                    };
                }
            }
        }
    }

    /// Writes frames from the outbox, settling the in-flight record of each
    /// reply. A `Close` from the engine (e.g. too many devices) is written
    /// and ends the connection.
    async fn write_outbox<I: FrameIo>(&mut self, io: &mut I, batch: &mut Vec<ServerFrame>) -> Option<End> {
        let mut closing = false;
        let mut upto = batch.len();
        for (i, frame) in batch.iter().enumerate() {
            match frame {
                ServerFrame::Reply { id, reply } => self.settle(*id, reply),
                ServerFrame::Push(_) => {}
                ServerFrame::Close { code, .. } => {
                    tracing::debug!(code = code.as_str(), "engine closed connection");
                    closing = true;
                    upto = i + 1;
                    break;
                }
            }
        }
        batch.truncate(upto);
        if let Err(end) = self.write(io, batch).await {
            return Some(end);
        }
        closing.then_some(End::Quiet)
    }

    /// Records the latency and result of a reply the engine sent.
    fn settle(&mut self, id: u64, reply: &Reply) {
        let Some(pos) = self.inflight.iter().position(|r| r.id == id) else {
            // Not ours to count (the engine answers each request once).
            return;
        };
        let done = self.inflight.swap_remove(pos);
        metrics::histogram!("hongbao_request_seconds", "op" => done.op).record(done.started.elapsed().as_secs_f64());
        count_request(done.op, reply);
    }

    /// Writes frames with a deadline; a peer that does not read is cut off.
    async fn write<I: FrameIo>(&mut self, io: &mut I, frames: &[ServerFrame]) -> Result<(), End> {
        match timeout(Duration::from_secs(WRITE_TIMEOUT_S), io.send(frames)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, transport = self.transport.as_str(), "write failed");
                Err(End::Quiet)
            }
            Err(_) => {
                // The socket is stuck mid-frame; a Close frame would not get through either.
                count_protocol_error(ErrorCode::SlowConsumer);
                Err(End::Quiet)
            }
        }
    }

    /// Writes one reply made by the gateway itself.
    async fn reply<I: FrameIo>(&mut self, io: &mut I, id: u64, op: &'static str, reply: Reply) -> Result<(), End> {
        count_request(op, &reply);
        self.write(io, &[ServerFrame::Reply { id, reply }]).await
    }

    async fn handle<I: FrameIo>(&mut self, io: &mut I, frame: ClientFrame) -> Result<(), End> {
        let ClientFrame { id, req } = frame;
        let op = req.op_name();
        let Some(user) = self.user else {
            let Request::Hello { token } = req else {
                return Err(fatal(ErrorCode::HelloRequired, "the first request must be hello"));
            };
            return self.hello(io, id, &token).await;
        };
        match req {
            Request::Hello { .. } => Err(fatal(ErrorCode::HelloRequired, "hello was already done on this connection")),
            Request::Ping => self.reply(io, id, op, Reply::Pong).await,
            req if self.inflight.len() >= CONNECTION_INFLIGHT_MAX => {
                let reply = match req {
                    Request::Shake { .. } => Reply::Shake(ShakeResult::Overload),
                    _ => Reply::error(ErrorCode::Overload, "too many requests in flight on this connection"),
                };
                self.reply(io, id, op, reply).await
            }
            _ if self.inflight.iter().any(|r| r.id == id) => {
                // Two requests with one id would make their replies ambiguous.
                let reply = Reply::error(ErrorCode::InvalidRequest, format!("request id {id} is already in flight"));
                self.reply(io, id, op, reply).await
            }
            req => {
                self.inflight.push(InFlight { id, op, started: Instant::now() });
                let responder = Responder::Client { outbox: self.outbox.clone(), request_id: id };
                self.shared.engine.submit(user, req, responder);
                Ok(())
            }
        }
    }

    async fn hello<I: FrameIo>(&mut self, io: &mut I, id: u64, token: &str) -> Result<(), End> {
        let config = &self.shared.config;
        let now = unix_now();
        let user = match config.signer.authenticate(token, now.as_secs(), config.dev) {
            Ok(user) => user,
            Err(e) => {
                count_request("hello", &Reply::error(e.code(), ""));
                return Err(fatal(e.code(), e.to_string()));
            }
        };
        let welcome = Reply::Welcome {
            user,
            protocol: PROTOCOL_VERSION,
            heartbeat_s: config.heartbeat_s,
            server_time_ms: now.as_millis() as u64,
        };
        // Welcome goes first, so pending messages queued by `connect` follow it.
        self.reply(io, id, "hello", welcome).await?;
        match self.shared.engine.connect(user, self.outbox.clone()).await {
            Ok(guard) => {
                self.registration = Some(guard);
                self.user = Some(user);
                Ok(())
            }
            Err(e) => Err(fatal(e.code(), format!("cannot register connection: {e}"))),
        }
    }
}

/// What a transport read gave.
#[derive(Debug)]
pub(crate) enum Incoming {
    Frame(ClientFrame),
    /// A WebSocket ping or pong: activity, and a pong may need flushing.
    Heartbeat,
    /// The peer closed (EOF, close frame, or a socket error).
    Closed,
    /// The peer closed in the middle of a frame.
    Truncated,
    /// A frame we refuse; fatal.
    Bad(FrameError),
}

/// Frame-level reading and writing for one transport.
pub(crate) trait FrameIo {
    /// The next frame. Must be cancel-safe: it races other events in `select!`.
    async fn recv(&mut self) -> Incoming;
    /// Writes and flushes `frames` (an empty slice just flushes).
    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()>;
    /// Closes the connection politely (FIN, or a WebSocket close frame).
    async fn close(&mut self, code: ErrorCode);
}

/// Raw TCP: `[u32 BE length][postcard]` both ways.
pub(crate) struct TcpIo<S> {
    stream: S,
    reader: FrameReader,
    /// Encoded frames of one batch, written with one `write_all`.
    write_buf: Vec<u8>,
}

/// Write buffer capacity kept between batches (see `BODY_CAPACITY_KEPT_BYTES`).
const WRITE_CAPACITY_KEPT_BYTES: usize = 4096;

impl<S: AsyncRead + AsyncWrite + Unpin> TcpIo<S> {
    pub fn new(stream: S) -> TcpIo<S> {
        TcpIo { stream, reader: FrameReader::new(), write_buf: Vec::new() }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo for TcpIo<S> {
    async fn recv(&mut self) -> Incoming {
        match self.reader.read_frame(&mut self.stream).await {
            Ok(ReadOutcome::Frame(frame)) => Incoming::Frame(frame),
            Ok(ReadOutcome::Eof) => Incoming::Closed,
            Ok(ReadOutcome::Truncated) => Incoming::Truncated,
            Ok(ReadOutcome::Bad(e)) => Incoming::Bad(e),
            Err(_) => Incoming::Closed,
        }
    }

    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()> {
        for frame in frames {
            self.write_buf.extend_from_slice(&binary::encode_server(frame));
        }
        let result = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        }
        .await;
        self.write_buf.clear();
        self.write_buf.shrink_to(WRITE_CAPACITY_KEPT_BYTES);
        result
    }

    async fn close(&mut self, _code: ErrorCode) {
        let _ = self.stream.shutdown().await;
    }
}

/// How a WebSocket client wants server frames encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WsEncoding {
    /// JSON in text frames.
    Json,
    /// Postcard in binary frames (no length header: WebSocket frames it).
    Binary,
}

/// WebSocket: JSON in text frames or postcard in binary frames. The first
/// data frame the client sends (its `hello`) fixes the encoding of every
/// frame the server sends on the connection.
pub(crate) struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// `None` until the first data frame.
    encoding: Option<WsEncoding>,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(Some(FRAME_BYTES_MAX))
        .max_frame_size(Some(FRAME_BYTES_MAX))
}

async fn ws_accept<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Result<WebSocketStream<S>, WsError> {
    tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
}

/// Upgrades a connection refused over capacity just to tell it why.
pub(crate) async fn ws_reject(stream: TcpStream, close: ServerFrame) {
    if let Ok(ws) = ws_accept(stream).await {
        let mut io = WsIo::new(ws);
        let _ = io.send(&[close]).await;
        io.close(ErrorCode::Overload).await;
    }
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo { ws, encoding: None }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo for WsIo<S> {
    async fn recv(&mut self) -> Incoming {
        loop {
            // `next` is cancel-safe: partial frames stay in tungstenite's buffer.
            let message = match self.ws.next().await {
                None => return Incoming::Closed,
                Some(Ok(message)) => message,
                Some(Err(e)) => return ws_error(e),
            };
            return match message {
                Message::Text(text) => {
                    self.encoding.get_or_insert(WsEncoding::Json);
                    decode_json(text.as_str()).map_or_else(Incoming::Bad, Incoming::Frame)
                }
                Message::Binary(body) => {
                    self.encoding.get_or_insert(WsEncoding::Binary);
                    binary::decode_client(&body).map_or_else(|e| Incoming::Bad(e.into()), Incoming::Frame)
                }
                // Tungstenite queues the pong itself; the caller flushes it.
                Message::Ping(_) | Message::Pong(_) => Incoming::Heartbeat,
                Message::Close(_) => Incoming::Closed,
                // Raw frames are never returned by a read.
                Message::Frame(_) => continue,
            };
        }
    }

    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()> {
        for frame in frames {
            let message = match self.encoding.unwrap_or(WsEncoding::Json) {
                WsEncoding::Json => Message::text(serde_json::to_string(frame).map_err(std::io::Error::other)?),
                WsEncoding::Binary => {
                    // The binary codec writes a length header; WebSocket frames
                    // carry their own length, so it is dropped.
                    let bytes = binary::encode_server(frame);
                    Message::binary(bytes[hongbao_proto::FRAME_HEADER_BYTES..].to_vec())
                }
            };
            self.ws.feed(message).await.map_err(std::io::Error::other)?;
        }
        self.ws.flush().await.map_err(std::io::Error::other)
    }

    async fn close(&mut self, code: ErrorCode) {
        let code = match code {
            ErrorCode::ShuttingDown => CloseCode::Away,
            ErrorCode::FrameTooLarge => CloseCode::Size,
            code if code.is_fatal() => CloseCode::Policy,
            _ => CloseCode::Normal,
        };
        let _ = self.ws.close(Some(CloseFrame { code, reason: "".into() })).await;
    }
}

fn ws_error(e: WsError) -> Incoming {
    match e {
        WsError::Capacity(e) => Incoming::Bad(FrameError::new(ErrorCode::FrameTooLarge, e.to_string())),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Incoming::Closed,
        WsError::Protocol(e) => Incoming::Bad(FrameError::new(ErrorCode::Malformed, e.to_string())),
        WsError::Utf8(_) => Incoming::Bad(FrameError::new(ErrorCode::Malformed, "text frame is not UTF-8")),
        // Io, ConnectionClosed, AlreadyClosed and the rest: the peer is gone.
        _ => Incoming::Closed,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hongbao_proto::FRAME_HEADER_BYTES;
    use hongbao_shard::EngineError;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::sync::watch;

    use super::*;
    use crate::{GatewayConfig, TokenSigner};

    /// Answers at once, or (with `held`) keeps every responder unanswered.
    #[derive(Clone, Default)]
    struct FakeEngine {
        held: Option<Arc<Mutex<Vec<Responder>>>>,
    }

    impl Backend for FakeEngine {
        type Guard = ();
        fn submit(&self, _user: u64, req: Request, responder: Responder) {
            if let Some(held) = &self.held {
                held.lock().unwrap().push(responder);
                return;
            }
            responder.send(match req {
                Request::Open { packet } => Reply::Opened { packet, amount_fen: 5, repeat: false, finished: false },
                Request::Shake { .. } => Reply::Shake(ShakeResult::None),
                _ => Reply::error(ErrorCode::NotFound, "nothing here"),
            });
        }
        async fn connect(&self, _user: u64, _outbox: Outbox) -> Result<(), EngineError> {
            Ok(())
        }
    }

    const SECRET: &str = "a test secret of reasonable length";

    struct Client {
        io: DuplexStream,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Client {
        fn start(engine: FakeEngine) -> Client {
            let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let mut config = GatewayConfig::new(addr, addr, TokenSigner::new(SECRET));
            config.dev = true;
            let (shutdown, shutdown_rx) = watch::channel(false);
            let (shared, _done) = Shared::new(config, engine, shutdown_rx);
            let (io, server) = tokio::io::duplex(FRAME_BYTES_MAX);
            let task = tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(shared.config.hello_timeout_s.into());
                serve(TcpIo::new(server), addr, Transport::Tcp, &shared, deadline).await;
            });
            Client { io, shutdown, task }
        }

        async fn send(&mut self, id: u64, req: Request) {
            self.io.write_all(&binary::encode_client(&ClientFrame { id, req })).await.unwrap();
        }

        async fn recv(&mut self) -> ServerFrame {
            let mut header = [0u8; FRAME_HEADER_BYTES];
            self.io.read_exact(&mut header).await.unwrap();
            let len = binary::body_len(&header).unwrap().unwrap();
            let mut body = vec![0; len];
            self.io.read_exact(&mut body).await.unwrap();
            binary::decode_server(&body).unwrap()
        }

        async fn expect_close(mut self, code: ErrorCode) {
            match self.recv().await {
                ServerFrame::Close { code: got, .. } => assert_eq!(got, code),
                other => panic!("expected close {code:?}, got {other:?}"),
            }
            // Then EOF.
            assert_eq!(self.io.read(&mut [0u8; 1]).await.unwrap(), 0);
            self.task.await.unwrap();
        }

        async fn hello(&mut self) {
            self.send(1, Request::Hello { token: "42".into() }).await;
            match self.recv().await {
                ServerFrame::Reply { id: 1, reply: Reply::Welcome { user: 42, protocol, heartbeat_s: 30, .. } } => {
                    assert_eq!(protocol, PROTOCOL_VERSION)
                }
                other => panic!("expected welcome, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn hello_then_requests_then_second_hello_is_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.send(2, Request::Ping).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 2, reply: Reply::Pong });
        c.send(3, Request::Open { packet: 9 }).await;
        assert_eq!(
            c.recv().await,
            ServerFrame::Reply {
                id: 3,
                reply: Reply::Opened { packet: 9, amount_fen: 5, repeat: false, finished: false }
            }
        );
        c.send(4, Request::Hello { token: "42".into() }).await;
        c.expect_close(ErrorCode::HelloRequired).await;
    }

    #[tokio::test]
    async fn first_request_must_be_hello() {
        let mut c = Client::start(FakeEngine::default());
        c.send(1, Request::Balance).await;
        c.expect_close(ErrorCode::HelloRequired).await;
    }

    #[tokio::test]
    async fn bad_tokens_are_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.send(1, Request::Hello { token: "v1.42.99.AAAA".into() }).await;
        c.expect_close(ErrorCode::BadToken).await;
        let mut c = Client::start(FakeEngine::default());
        let expired = TokenSigner::new(SECRET).issue(42, 1, 1);
        c.send(1, Request::Hello { token: expired }).await;
        c.expect_close(ErrorCode::TokenExpired).await;
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.io.write_all(&((FRAME_BYTES_MAX + 1) as u32).to_be_bytes()).await.unwrap();
        c.expect_close(ErrorCode::FrameTooLarge).await;
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.io.write_all(&[0, 0, 0, 2, 7, 99]).await.unwrap();
        c.expect_close(ErrorCode::UnknownOp).await;
    }

    #[tokio::test(start_paused = true)]
    async fn no_hello_in_time_is_an_idle_timeout() {
        let c = Client::start(FakeEngine::default());
        c.expect_close(ErrorCode::IdleTimeout).await;
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_hello_is_an_idle_timeout() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        let started = Instant::now();
        c.expect_close(ErrorCode::IdleTimeout).await;
        assert!(started.elapsed() >= Duration::from_secs(crate::IDLE_TIMEOUT_S_DEFAULT.into()));
    }

    #[tokio::test]
    async fn shutdown_closes_connections() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.shutdown.send(true).unwrap();
        c.expect_close(ErrorCode::ShuttingDown).await;
    }

    #[tokio::test]
    async fn requests_over_the_in_flight_limit_are_refused_without_submitting() {
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut c = Client::start(FakeEngine { held: Some(held.clone()) });
        c.hello().await;
        for id in 0..CONNECTION_INFLIGHT_MAX as u64 {
            c.send(100 + id, Request::Open { packet: 1 }).await;
        }
        c.send(999, Request::Shake { campaign: 0, key: None }).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 999, reply: Reply::Shake(ShakeResult::Overload) });
        c.send(1000, Request::Balance).await;
        match c.recv().await {
            ServerFrame::Reply { id: 1000, reply: Reply::Error { code: ErrorCode::Overload, .. } } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(held.lock().unwrap().len(), CONNECTION_INFLIGHT_MAX);
        // Answering one frees a slot.
        let first = held.lock().unwrap().remove(0);
        first.send(Reply::Balance { balance_fen: 1 });
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 100, reply: Reply::Balance { balance_fen: 1 } });
        c.send(1001, Request::Open { packet: 2 }).await;
        c.send(1002, Request::Ping).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 1002, reply: Reply::Pong });
        assert_eq!(held.lock().unwrap().len(), CONNECTION_INFLIGHT_MAX);
    }
}
