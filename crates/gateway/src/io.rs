//! What the connection loop reads and writes through: a transport's frame
//! reader and writer (`FrameIo`), with raw TCP's here and WebSocket's in
//! `ws`. A leaf beside `codec`: it knows frames, not connections.

use std::future::poll_fn;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hongbao_proto::{binary, ClientFrame, ErrorCode, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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
    /// The next frame, of at most `frame_bytes_max` body bytes (smaller
    /// before `hello`). All progress lives in `self`: the connection polls
    /// this beside its other event sources, holding no read future.
    fn poll_recv(&mut self, cx: &mut Context<'_>, frame_bytes_max: usize) -> Poll<Incoming>;
    /// Encodes `frames` for one write, after anything the transport owes
    /// the peer first (a WebSocket pong). The bytes live only for that
    /// write, so an idle connection holds no write buffer.
    fn encode(&mut self, frames: &[ServerFrame]) -> std::io::Result<Vec<u8>>;
    /// Writes some of `bytes` to the socket.
    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    /// Closes the connection politely (FIN, or a WebSocket close frame).
    async fn close(&mut self, code: ErrorCode);

    /// Writes and flushes `frames` (an empty slice just flushes, or sends a
    /// pong that is due).
    async fn send(&mut self, frames: &[ServerFrame]) -> std::io::Result<()>
    where
        Self: Sized,
    {
        let mut out = Unsent::new(self.encode(frames)?);
        poll_fn(|cx| out.poll_write_all(cx, self)).await
    }
}

/// Encoded frames on their way to the socket; what is left of them when a
/// write is given up (the peer does not read), so a `Close` frame can still
/// follow on a frame boundary.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Unsent {
    bytes: Vec<u8>,
    /// How many of `bytes` the socket took.
    written: usize,
}

impl Unsent {
    pub fn new(bytes: Vec<u8>) -> Unsent {
        Unsent { bytes, written: 0 }
    }

    /// Writes the rest, then flushes.
    pub fn poll_write_all<I: FrameIo>(&mut self, cx: &mut Context<'_>, io: &mut I) -> Poll<std::io::Result<()>> {
        while self.written < self.bytes.len() {
            let n = ready!(io.poll_write(cx, &self.bytes[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        io.poll_flush(cx)
    }

    /// Drops the rest if none of it was written: the socket is then on a
    /// frame boundary already, and those frames need not go out first.
    pub fn skip_if_unstarted(&mut self) {
        if self.written == 0 {
            self.bytes = Vec::new();
        }
    }

    pub async fn write_all<I: FrameIo>(&mut self, io: &mut I) -> std::io::Result<()> {
        poll_fn(|cx| self.poll_write_all(cx, io)).await
    }
}

/// A transport whose idle connection can give up its task (`park`): its
/// socket leaves tokio's reactor, and everything else it holds stays as it
/// is until `unpark` puts the socket back.
pub(crate) trait Parkable: FrameIo + Sized + Send + 'static {
    /// The transport while parked: the same state over a plain socket.
    type Parked: AsRawFd + Send + 'static;
    /// True if nothing is half done: no bytes received and not yet decoded,
    /// nothing (a pong) waiting to be written. Only such a transport parks.
    fn is_quiet(&self) -> bool;
    /// Takes the socket out of tokio's reactor. An error loses the socket
    /// (the connection then ends).
    fn park(self) -> std::io::Result<Self::Parked>;
    /// Registers the socket with the reactor of the calling runtime again.
    fn unpark(parked: Self::Parked) -> std::io::Result<Self>;
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

impl AsRawFd for TcpIo<std::net::TcpStream> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl Parkable for TcpIo<TcpStream> {
    type Parked = TcpIo<std::net::TcpStream>;

    fn is_quiet(&self) -> bool {
        self.reader.is_empty()
    }

    fn park(self) -> std::io::Result<Self::Parked> {
        Ok(TcpIo { stream: self.stream.into_std()?, reader: self.reader })
    }

    fn unpark(parked: Self::Parked) -> std::io::Result<Self> {
        Ok(TcpIo { stream: TcpStream::from_std(parked.stream)?, reader: parked.reader })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo for TcpIo<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>, frame_bytes_max: usize) -> Poll<Incoming> {
        self.reader.poll_read_frame(cx, &mut self.stream, frame_bytes_max).map(|read| match read {
            Ok(ReadOutcome::Frame(frame)) => Incoming::Frame(Box::new(frame)),
            Ok(ReadOutcome::Eof) => Incoming::Closed,
            Ok(ReadOutcome::Truncated) => Incoming::Truncated,
            Ok(ReadOutcome::Bad(e)) => Incoming::Bad(e),
            Err(_) => Incoming::Closed,
        })
    }

    fn encode(&mut self, frames: &[ServerFrame]) -> std::io::Result<Vec<u8>> {
        Ok(match frames {
            [frame] => binary::encode_server(frame),
            frames => {
                let mut bytes = Vec::new();
                for frame in frames {
                    bytes.extend_from_slice(&binary::encode_server(frame));
                }
                bytes
            }
        })
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, bytes)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    async fn close(&mut self, _code: ErrorCode) {
        let _ = self.stream.shutdown().await;
    }
}
