//! Entry points for the fuzz targets in `fuzz/`, compiled only with
//! `--cfg fuzzing` (which `cargo fuzz` sets), so the product's public API
//! does not grow: the binary TCP frame reader, the WebSocket frame reader
//! with the JSON decoding behind it, and `decode_json` alone.
//!
//! Each wraps the private decoder without changing what it does; a
//! `FrameError` becomes its `(code, message)` because the type itself is
//! private. The properties the targets check (chunking does not change
//! what is decoded, frames round-trip, buffers stay bounded) live with the
//! targets.

use std::task::{Context, Poll};

use hongbao_proto::{ClientFrame, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::{FrameError, FrameReader, ReadOutcome};
use crate::io::{FrameIo, Incoming};
use crate::ws::WsIo;

/// A refused frame: the code the client is closed with, and the message.
pub type Refused = (ErrorCode, String);

fn refused(e: FrameError) -> Refused {
    (e.code, e.message)
}

/// What `TcpReader::poll_read_frame` gave (`codec::ReadOutcome`).
#[derive(Debug, PartialEq)]
pub enum TcpRead {
    Frame(ClientFrame),
    Eof,
    Truncated,
    Bad(Refused),
}

/// The raw TCP connection's frame reader (`codec::FrameReader`).
#[derive(Default)]
pub struct TcpReader(FrameReader);

impl TcpReader {
    pub fn new() -> TcpReader {
        TcpReader(FrameReader::new())
    }

    /// The next frame of at most `frame_bytes_max` body bytes
    /// (`FRAME_BYTES_MAX`, or `limits::HELLO_FRAME_BYTES_MAX` before `hello`).
    pub fn poll_read_frame<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
        frame_bytes_max: usize,
    ) -> Poll<std::io::Result<TcpRead>> {
        self.0.poll_read_frame(cx, io, frame_bytes_max).map_ok(|outcome| match outcome {
            ReadOutcome::Frame(frame) => TcpRead::Frame(frame),
            ReadOutcome::Eof => TcpRead::Eof,
            ReadOutcome::Truncated => TcpRead::Truncated,
            ReadOutcome::Bad(e) => TcpRead::Bad(refused(e)),
        })
    }

    /// Heap bytes the reader holds.
    pub fn buffered_capacity(&self) -> usize {
        self.0.buffered_capacity()
    }
}

/// What `WsReader::poll_recv` gave (`io::Incoming`).
#[derive(Debug, PartialEq)]
pub enum WsRead {
    Frame(ClientFrame),
    Heartbeat,
    Closed,
    Truncated,
    Bad(Refused),
}

/// A WebSocket connection after the upgrade (`ws::WsIo`): reads client
/// frames from `S` and writes pongs, replies and the close frame to it.
pub struct WsReader<S>(WsIo<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> WsReader<S> {
    pub fn new(stream: S) -> WsReader<S> {
        WsReader(WsIo::new(stream))
    }

    /// The next message of at most `frame_bytes_max` bytes, as
    /// `TcpReader::poll_read_frame`.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>, frame_bytes_max: usize) -> Poll<WsRead> {
        self.0.poll_recv(cx, frame_bytes_max).map(|incoming| match incoming {
            Incoming::Frame(frame) => WsRead::Frame(*frame),
            Incoming::Heartbeat => WsRead::Heartbeat,
            Incoming::Closed => WsRead::Closed,
            Incoming::Truncated => WsRead::Truncated,
            Incoming::Bad(e) => WsRead::Bad(refused(e)),
        })
    }

    /// Writes what the connection owes the peer (a pong) and `frames`.
    pub async fn send(&mut self, frames: &[hongbao_proto::ServerFrame]) -> std::io::Result<()> {
        self.0.send(frames).await
    }

    /// Closes as the connection loop does after `code` (echoing the peer's
    /// close frame if it sent one).
    pub async fn close(&mut self, code: ErrorCode) {
        self.0.close(code).await;
    }

    /// Heap bytes the reader holds.
    pub fn buffered_capacity(&self) -> usize {
        self.0.buffered_capacity()
    }

    pub fn stream_mut(&mut self) -> &mut S {
        self.0.stream_mut()
    }
}

/// `codec::decode_json`: a WebSocket text frame to a `ClientFrame`.
pub fn decode_json(text: &str) -> Result<ClientFrame, Refused> {
    crate::codec::decode_json(text).map_err(refused)
}
