//! What the connection loop reads and writes through: a transport's frame
//! reader and writer (`FrameIo`), with raw TCP's here and WebSocket's in
//! `ws`. A leaf beside `codec`: it knows frames, not connections.

use std::task::{Context, Poll};

use hongbao_proto::{binary, ClientFrame, ErrorCode, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::codec::{FrameError, FrameReader, ReadOutcome};

/// Which listener a connection came from; also the `transport` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}

/// What a transport read gave.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Boxed: this travels through the connection's wait state, which every
    /// idle connection holds; a decoded frame is several times a pointer.
    Frame(Box<ClientFrame>),
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
    /// The next frame. All progress lives in `self`: the connection polls
    /// this beside its other event sources, holding no read future.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Incoming>;
    /// Writes and flushes `frames` (an empty slice just flushes).
    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()>;
    /// Closes the connection politely (FIN, or a WebSocket close frame).
    async fn close(&mut self, code: ErrorCode);
}

/// Raw TCP: `[u32 BE length][postcard]` both ways.
pub(crate) struct TcpIo<S> {
    stream: S,
    reader: FrameReader,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TcpIo<S> {
    pub fn new(stream: S) -> TcpIo<S> {
        TcpIo { stream, reader: FrameReader::new() }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo for TcpIo<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Incoming> {
        self.reader.poll_read_frame(cx, &mut self.stream).map(|read| match read {
            Ok(ReadOutcome::Frame(frame)) => Incoming::Frame(Box::new(frame)),
            Ok(ReadOutcome::Eof) => Incoming::Closed,
            Ok(ReadOutcome::Truncated) => Incoming::Truncated,
            Ok(ReadOutcome::Bad(e)) => Incoming::Bad(e),
            Err(_) => Incoming::Closed,
        })
    }

    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()> {
        // The encoded batch lives only for this write (one `write_all`), so
        // an idle connection holds no write buffer.
        let bytes = match frames {
            [frame] => binary::encode_server(frame),
            frames => {
                let mut bytes = Vec::new();
                for frame in frames {
                    bytes.extend_from_slice(&binary::encode_server(frame));
                }
                bytes
            }
        };
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await
    }

    async fn close(&mut self, _code: ErrorCode) {
        let _ = self.stream.shutdown().await;
    }
}
