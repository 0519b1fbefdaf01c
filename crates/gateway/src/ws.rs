//! WebSocket after the upgrade (RFC 6455, server side): client frames read
//! and server frames written directly on the socket.
//!
//! The HTTP upgrade is tungstenite's (`handshake`); after it the socket is
//! ours. Tungstenite's stream would hold, for the connection's whole life, a
//! read buffer allocated up front, a write buffer that keeps the size of the
//! largest batch it ever wrote and two waker cells: several KiB per idle
//! connection. Here an idle connection holds a 14-byte header array and no
//! heap memory: a frame's payload grows as its bytes arrive once its header
//! is checked (length against the connection's limit — `FRAME_BYTES_MAX`,
//! `HELLO_FRAME_BYTES_MAX` before `hello` — before anything is allocated,
//! as in the binary `FrameReader`) and is freed once decoded.
//!
//! What the server enforces: client frames are masked, reserved bits are
//! clear, opcodes are known, control frames are unfragmented and at most 125
//! bytes, data frames and whole messages are within the limit, and
//! text is UTF-8. Pings are answered with a pong of the same payload (the
//! latest ping wins); a close frame ends the connection and is echoed.

use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hongbao_proto::{binary, ErrorCode, ServerFrame, FRAME_HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::codec::{check_frame_len, consume_frame, decode_json, poll_read_more, FrameError};
use crate::io::{FrameIo, Incoming, Parkable};

/// Longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const HEAD_BYTES_MAX: usize = 14;
/// Largest control frame payload (RFC 6455 §5.5).
const CONTROL_PAYLOAD_MAX: usize = 125;
/// Read buffer of the tungstenite stream used for the upgrade only; it is
/// dropped as soon as the upgrade is done.
const HANDSHAKE_READ_BUFFER_BYTES: usize = 256;
/// Largest HTTP upgrade request read, in bytes. A browser's is well under
/// 1 KiB without cookies, and this leaves room for a cookie or two (4 KiB
/// each at most, RFC 6265 §6.1); it is what a stranger may make the server
/// buffer before `hello` on the WebSocket port (the frame limit is
/// `HELLO_FRAME_BYTES_MAX` after it).
const UPGRADE_REQUEST_BYTES_MAX: usize = 8 * 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close status codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_SIZE: u16 = 1009;

/// Performs the HTTP upgrade on `stream`; afterwards it carries frames.
///
/// Tungstenite refuses bytes sent after the upgrade request before its
/// response (`JunkAfterRequest`), so the stream it wraps for the upgrade has
/// nothing buffered when it is dropped: no client frame is lost. It reads at
/// most `UPGRADE_REQUEST_BYTES_MAX` (tungstenite alone would buffer 64 KiB
/// of a stranger's request).
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(), WsError> {
    let config = WebSocketConfig::default().read_buffer_size(HANDSHAKE_READ_BUFFER_BYTES).write_buffer_size(0);
    let limited = UpgradeStream { inner: stream, left: UPGRADE_REQUEST_BYTES_MAX };
    tokio_tungstenite::accept_async_with_config(limited, Some(config)).await.map(drop)
}

/// The socket as the upgrade sees it: reads stop with an error once
/// `left` bytes have been read.
struct UpgradeStream<'a, S> {
    inner: &'a mut S,
    left: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for UpgradeStream<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.left == 0 {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "upgrade request too large");
            return Poll::Ready(Err(e));
        }
        // Through a chunk on the stack: a `ReadBuf` cannot be shortened and
        // advanced again without `unsafe`.
        let mut chunk = [0u8; HANDSHAKE_READ_BUFFER_BYTES];
        let want = chunk.len().min(this.left).min(buf.remaining());
        let mut limited = ReadBuf::new(&mut chunk[..want]);
        ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut limited))?;
        this.left -= limited.filled().len();
        buf.put_slice(limited.filled());
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UpgradeStream<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, bytes)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a client wants server frames encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// JSON in text frames.
    Json,
    /// Postcard in binary frames (no length header: WebSocket frames it).
    Binary,
}

/// WebSocket: JSON in text frames or postcard in binary frames. The first
/// data message the client sends (its `hello`) fixes the encoding of every
/// frame the server sends on the connection.
pub(crate) struct WsIo<S> {
    stream: S,
    reader: FrameReader,
    /// `None` until the first data message.
    encoding: Option<Encoding>,
    /// The pong answering the latest ping, encoded, until it is written.
    pong: Option<Box<[u8]>>,
    /// Set once the peer sent a close frame: the status code to echo.
    peer_close: Option<Option<u16>>,
}

impl<S> WsIo<S> {
    pub fn new(stream: S) -> WsIo<S> {
        WsIo { stream, reader: FrameReader::default(), encoding: None, pong: None, peer_close: None }
    }

    /// The socket, for the upgrade before any frame.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn message(&mut self, opcode: u8, payload: Vec<u8>) -> Incoming {
        if opcode == OP_TEXT {
            self.encoding.get_or_insert(Encoding::Json);
            match std::str::from_utf8(&payload) {
                Ok(text) => decode_json(text).map_or_else(Incoming::Bad, |f| Incoming::Frame(Box::new(f))),
                Err(_) => Incoming::Bad(FrameError::new(ErrorCode::Malformed, "text frame is not UTF-8")),
            }
        } else {
            self.encoding.get_or_insert(Encoding::Binary);
            binary::decode_client(&payload).map_or_else(|e| Incoming::Bad(e.into()), |f| Incoming::Frame(Box::new(f)))
        }
    }
}

impl AsRawFd for WsIo<std::net::TcpStream> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl Parkable for WsIo<tokio::net::TcpStream> {
    type Parked = WsIo<std::net::TcpStream>;

    fn is_quiet(&self) -> bool {
        self.reader.buf.is_empty()
            && self.reader.partial_opcode == 0
            && self.pong.is_none()
            && self.peer_close.is_none()
    }

    fn park(self) -> std::io::Result<Self::Parked> {
        let WsIo { stream, reader, encoding, pong, peer_close } = self;
        Ok(WsIo { stream: stream.into_std()?, reader, encoding, pong, peer_close })
    }

    fn unpark(parked: Self::Parked) -> std::io::Result<Self> {
        let WsIo { stream, reader, encoding, pong, peer_close } = parked;
        Ok(WsIo { stream: tokio::net::TcpStream::from_std(stream)?, reader, encoding, pong, peer_close })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo for WsIo<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>, frame_bytes_max: usize) -> Poll<Incoming> {
        loop {
            let (head, payload) = match ready!(self.reader.poll_frame(cx, &mut self.stream, frame_bytes_max)) {
                // A socket error or EOF, between frames or in one: the peer is gone.
                Err(_) | Ok(Read::Eof) => return Poll::Ready(Incoming::Closed),
                Ok(Read::Bad(e)) => return Poll::Ready(Incoming::Bad(e)),
                Ok(Read::Frame(head, payload)) => (head, payload),
            };
            let bad = |m: &str| Poll::Ready(Incoming::Bad(FrameError::new(ErrorCode::Malformed, m)));
            match head.opcode {
                OP_PING => {
                    let mut pong = Vec::new();
                    put_frame(&mut pong, OP_PONG, &payload);
                    self.pong = Some(pong.into_boxed_slice());
                    return Poll::Ready(Incoming::Heartbeat);
                }
                OP_PONG => return Poll::Ready(Incoming::Heartbeat),
                OP_CLOSE => {
                    // Echoed later; codes that must not appear on the wire
                    // (RFC 6455 §7.4) are not.
                    let code = payload
                        .get(..2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999));
                    self.peer_close = Some(code);
                    return Poll::Ready(Incoming::Closed);
                }
                OP_TEXT | OP_BINARY if self.reader.partial_opcode != 0 => {
                    return bad("a new message began before the previous one ended");
                }
                OP_TEXT | OP_BINARY if !head.fin => {
                    self.reader.partial_opcode = head.opcode;
                    self.reader.partial = payload;
                }
                OP_TEXT | OP_BINARY => return Poll::Ready(self.message(head.opcode, payload)),
                _ => {
                    // A continuation (the reader refuses unknown opcodes, and
                    // a continuation that would make the message too large).
                    let opcode = std::mem::take(&mut self.reader.partial_opcode);
                    if opcode == 0 {
                        return bad("continuation frame without a message to continue");
                    }
                    let mut message = std::mem::take(&mut self.reader.partial);
                    message.extend_from_slice(&payload);
                    if !head.fin {
                        self.reader.partial_opcode = opcode;
                        self.reader.partial = message;
                        continue;
                    }
                    return Poll::Ready(self.message(opcode, message));
                }
            }
        }
    }

    fn encode(&mut self, frames: &[ServerFrame]) -> std::io::Result<Vec<u8>> {
        let mut out = self.pong.take().map(Vec::from).unwrap_or_default();
        for frame in frames {
            match self.encoding.unwrap_or(Encoding::Json) {
                Encoding::Json => put_frame(&mut out, OP_TEXT, &serde_json::to_vec(frame)?),
                Encoding::Binary => {
                    // The binary codec writes a length header; WebSocket
                    // frames carry their own length, so it is dropped.
                    let bytes = binary::encode_server(frame);
                    put_frame(&mut out, OP_BINARY, &bytes[FRAME_HEADER_BYTES..]);
                }
            }
        }
        Ok(out)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, bytes)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    async fn close(&mut self, code: ErrorCode) {
        let status = match self.peer_close {
            // Echo the peer's close (RFC 6455 §5.5.1).
            Some(peer) => peer,
            None => Some(match code {
                ErrorCode::ShuttingDown => CLOSE_AWAY,
                ErrorCode::FrameTooLarge => CLOSE_SIZE,
                code if code.is_fatal() => CLOSE_POLICY,
                _ => CLOSE_NORMAL,
            }),
        };
        let mut out = self.pong.take().map(Vec::from).unwrap_or_default();
        let status = status.map(u16::to_be_bytes);
        put_frame(&mut out, OP_CLOSE, status.as_ref().map_or(&[][..], |s| &s[..]));
        // Best effort: the peer may be gone.
        if self.stream.write_all(&out).await.is_ok() {
            let _ = self.stream.flush().await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// For the fuzz targets (`fuzz/`): the heap the reader holds (the frame
/// being read and a fragmented message's bytes so far).
#[cfg(fuzzing)]
impl<S> WsIo<S> {
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.reader.buf.capacity() + self.reader.partial.capacity()
    }
}

/// Appends one unmasked, unfragmented server frame.
fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.reserve(HEAD_BYTES_MAX + payload.len());
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// A frame header, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
}

/// What reading the next frame gave.
#[derive(Debug)]
enum Read {
    /// A whole frame, payload unmasked.
    Frame(Head, Vec<u8>),
    Eof,
    Bad(FrameError),
}

/// Reads client frames. Like the binary `FrameReader`, all progress lives in
/// `self`, so polling it is cancel-safe; small frames come in with one read
/// (`poll_read_more`), and between frames it holds no heap memory.
#[derive(Debug, Default)]
struct FrameReader {
    /// Bytes received and not yet returned: part of a frame, or frames that
    /// arrived together. Empty and unallocated between frames.
    buf: Vec<u8>,
    /// The opcode of a fragmented data message being read, 0 if none.
    partial_opcode: u8,
    /// Its bytes so far.
    partial: Vec<u8>,
}

/// Header bytes of the frame starting `bytes`, as far as they tell.
fn head_len(bytes: &[u8]) -> usize {
    if bytes.len() < 2 {
        return 2;
    }
    let extended = match bytes[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if bytes[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

impl FrameReader {
    /// The next frame; a data message may be at most `message_bytes_max`
    /// bytes, all its frames together.
    fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
        message_bytes_max: usize,
    ) -> Poll<std::io::Result<Read>> {
        loop {
            let need = head_len(&self.buf);
            let mut frame_end = None;
            if self.buf.len() >= need {
                // Checked before anything is allocated for the payload.
                let head = match parse_head(&self.buf[..need], message_bytes_max) {
                    Ok(head) => head,
                    Err(e) => {
                        self.buf = Vec::new();
                        return Poll::Ready(Ok(Read::Bad(e)));
                    }
                };
                if head.opcode == OP_CONTINUATION {
                    if let Err(e) = check_frame_len(self.partial.len() + head.len, message_bytes_max) {
                        self.buf = Vec::new();
                        return Poll::Ready(Ok(Read::Bad(e)));
                    }
                }
                let end = need + head.len;
                if self.buf.len() >= end {
                    let mut payload = self.buf[need..end].to_vec();
                    consume_frame(&mut self.buf, end);
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= head.mask[i % 4];
                    }
                    return Poll::Ready(Ok(Read::Frame(head, payload)));
                }
                frame_end = Some(end);
            }
            if ready!(poll_read_more(cx, io, &mut self.buf, frame_end))? == 0 {
                self.buf = Vec::new();
                return Poll::Ready(Ok(Read::Eof));
            }
        }
    }
}

/// Checks a complete header (`head` is exactly as long as it says); a data
/// frame may carry at most `message_bytes_max` bytes.
fn parse_head(head: &[u8], message_bytes_max: usize) -> Result<Head, FrameError> {
    let malformed = |m: String| FrameError::new(ErrorCode::Malformed, m);
    let (b0, b1) = (head[0], head[1]);
    if b0 & 0x70 != 0 {
        return Err(malformed("reserved bits set (no extension was negotiated)".into()));
    }
    if b1 & 0x80 == 0 {
        return Err(malformed("client frames must be masked".into()));
    }
    let (len, rest) = match b1 & 0x7F {
        126 => (u64::from(u16::from_be_bytes([head[2], head[3]])), &head[4..]),
        127 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&head[2..10]);
            (u64::from_be_bytes(bytes), &head[10..])
        }
        len => (u64::from(len), &head[2..]),
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {
            check_frame_len(usize::try_from(len).unwrap_or(usize::MAX), message_bytes_max)?;
        }
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || len > CONTROL_PAYLOAD_MAX as u64 {
                return Err(malformed("control frames must be whole and at most 125 bytes".into()));
            }
        }
        other => return Err(malformed(format!("unknown opcode {other}"))),
    }
    let mask = [rest[0], rest[1], rest[2], rest[3]];
    Ok(Head { fin, opcode, mask, len: len as usize })
}

/// Upgrades a connection refused over capacity just to tell it why.
pub(crate) async fn reject(mut stream: tokio::net::TcpStream, close: ServerFrame) {
    if handshake(&mut stream).await.is_ok() {
        let mut io = WsIo::new(stream);
        let _ = io.send(&[close]).await;
        io.close(ErrorCode::Overload).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_core::limits::FRAME_BYTES_MAX;
    use hongbao_proto::{ClientFrame, Reply, Request};
    use tokio::io::AsyncReadExt;

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `bytes` in small pieces and collects what the server side reads.
    async fn read_all(bytes: Vec<u8>) -> (Vec<Incoming>, WsIo<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        for chunk in bytes.chunks(5) {
            client.write_all(chunk).await.unwrap();
        }
        client.shutdown().await.unwrap();
        let mut io = WsIo::new(server);
        let mut out = Vec::new();
        loop {
            let incoming = std::future::poll_fn(|cx| io.poll_recv(cx, FRAME_BYTES_MAX)).await;
            let last = !matches!(incoming, Incoming::Frame(_) | Incoming::Heartbeat);
            out.push(incoming);
            if last {
                break;
            }
        }
        (out, io, client)
    }

    fn hello_json() -> Vec<u8> {
        br#"{"id":1,"req":{"hello":{"token":"7"}}}"#.to_vec()
    }

    #[tokio::test]
    async fn text_binary_and_fragmented_messages_decode() {
        let json = hello_json();
        let mut bytes = client_frame(true, OP_TEXT, &json);
        bytes.extend(client_frame(false, OP_TEXT, &json[..10]));
        bytes.extend(client_frame(true, OP_PING, b"hb"));
        bytes.extend(client_frame(false, OP_CONTINUATION, &json[10..20]));
        bytes.extend(client_frame(true, OP_CONTINUATION, &json[20..]));
        let (out, io, _client) = read_all(bytes).await;
        let hello = ClientFrame { id: 1, req: Request::Hello { token: "7".into() } };
        assert!(
            matches!(&out[..], [Incoming::Frame(a), Incoming::Heartbeat, Incoming::Frame(b), Incoming::Closed] if **a == hello && **b == hello),
            "{out:?}"
        );
        assert_eq!(io.encoding, Some(Encoding::Json));
        assert_eq!(io.pong.as_deref(), Some(&[0x80 | OP_PONG, 2, b'h', b'b'][..]));

        let body = binary::encode_client(&hello);
        let (out, io, _client) = read_all(client_frame(true, OP_BINARY, &body[FRAME_HEADER_BYTES..])).await;
        assert!(matches!(&out[..], [Incoming::Frame(a), Incoming::Closed] if **a == hello), "{out:?}");
        assert_eq!(io.encoding, Some(Encoding::Binary));

        // A message longer than one read chunk (read straight into its
        // buffer), between two small ones that share reads with it.
        let token = "9".repeat(3000);
        let long = format!(r#"{{"id":2,"req":{{"hello":{{"token":"{token}"}}}}}}"#);
        let mut bytes = client_frame(true, OP_TEXT, &json);
        bytes.extend(client_frame(true, OP_TEXT, long.as_bytes()));
        bytes.extend(client_frame(true, OP_TEXT, &json));
        let (out, _io, _client) = read_all(bytes).await;
        let long = ClientFrame { id: 2, req: Request::Hello { token } };
        assert!(
            matches!(&out[..], [Incoming::Frame(a), Incoming::Frame(b), Incoming::Frame(c), Incoming::Closed]
                if **a == hello && **b == long && **c == hello),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn bad_frames_are_refused_with_the_right_code() {
        let code = |out: &[Incoming]| match out.last() {
            Some(Incoming::Bad(e)) => Some(e.code),
            _ => None,
        };
        let mut unmasked = client_frame(true, OP_TEXT, b"{}");
        unmasked[1] &= 0x7F;
        let mut reserved = client_frame(true, OP_TEXT, b"{}");
        reserved[0] |= 0x40;
        let mut huge = vec![0x80 | OP_BINARY, 0x80 | 127];
        huge.extend_from_slice(&((FRAME_BYTES_MAX + 1) as u64).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        let too_long_message =
            [client_frame(false, OP_BINARY, &vec![0; FRAME_BYTES_MAX]), client_frame(true, OP_CONTINUATION, &[0])]
                .concat();
        for (bytes, expected) in [
            (unmasked, ErrorCode::Malformed),
            (reserved, ErrorCode::Malformed),
            (client_frame(true, 0x3, b""), ErrorCode::Malformed),
            (client_frame(false, OP_PING, b""), ErrorCode::Malformed),
            (client_frame(true, OP_PING, &[0; 126]), ErrorCode::Malformed),
            (client_frame(true, OP_CONTINUATION, b"x"), ErrorCode::Malformed),
            (client_frame(true, OP_TEXT, &[0xFF, 0xFE]), ErrorCode::Malformed),
            (client_frame(true, OP_TEXT, br#"{"id":1,"req":"fly"}"#), ErrorCode::UnknownOp),
            (huge, ErrorCode::FrameTooLarge),
            (too_long_message, ErrorCode::FrameTooLarge),
        ] {
            let (out, _, _) = read_all(bytes).await;
            assert_eq!(code(&out), Some(expected), "{out:?}");
        }
        // Cut off mid-frame: the peer is gone.
        let json = hello_json();
        let (out, _, _) = read_all(client_frame(true, OP_TEXT, &json)[..10].to_vec()).await;
        assert!(matches!(&out[..], [Incoming::Closed]), "{out:?}");
    }

    #[tokio::test]
    async fn before_hello_frames_and_messages_over_the_hello_limit_are_refused() {
        use crate::limits::HELLO_FRAME_BYTES_MAX;
        let limit = HELLO_FRAME_BYTES_MAX;
        let read = |bytes: Vec<u8>| async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let mut io = WsIo::new(server);
            std::future::poll_fn(|cx| io.poll_recv(cx, limit)).await
        };
        // One frame announcing more (only its header is sent), and a
        // message whose fragments add up to more.
        let mut big = client_frame(true, OP_TEXT, &vec![b' '; limit + 1]);
        big.truncate(8);
        let fragmented =
            [client_frame(false, OP_TEXT, &vec![b' '; limit]), client_frame(true, OP_CONTINUATION, b" ")].concat();
        for bytes in [big, fragmented] {
            let got = read(bytes).await;
            assert!(matches!(&got, Incoming::Bad(e) if e.code == ErrorCode::FrameTooLarge), "{got:?}");
        }
        // A hello within the limit is read.
        assert!(matches!(read(client_frame(true, OP_TEXT, &hello_json())).await, Incoming::Frame(_)));
    }

    #[tokio::test]
    async fn an_upgrade_request_over_its_limit_is_refused() {
        let upgrade = |padding: usize| async move {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            let request = format!(
                "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(padding)
            );
            client.write_all(request.as_bytes()).await.unwrap();
            handshake(&mut server).await
        };
        assert!(upgrade(10).await.is_ok());
        assert!(upgrade(UPGRADE_REQUEST_BYTES_MAX - 300).await.is_ok());
        assert!(upgrade(UPGRADE_REQUEST_BYTES_MAX).await.is_err());
    }

    #[tokio::test]
    async fn server_frames_pongs_and_close_echo_go_out_unmasked() {
        let mut bytes = client_frame(true, OP_TEXT, &hello_json());
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        let (out, mut io, mut client) = read_all(bytes).await;
        assert!(matches!(&out[..], [Incoming::Frame(_), Incoming::Heartbeat, Incoming::Closed]), "{out:?}");
        let reply = ServerFrame::Reply { id: 1, reply: Reply::Pong };
        io.send(std::slice::from_ref(&reply)).await.unwrap();
        io.close(ErrorCode::ShuttingDown).await;
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let json = serde_json::to_vec(&reply).unwrap();
        let mut expected = vec![0x80 | OP_PONG, 1, b'p', 0x80 | OP_TEXT, json.len() as u8];
        expected.extend_from_slice(&json);
        expected.extend_from_slice(&[0x80 | OP_CLOSE, 2, 0x03, 0xE8]);
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_large_frame_leaves_no_large_buffer_behind() {
        // A large frame and the first byte of the next one, then the peer
        // goes quiet: the reader keeps that byte, not the large allocation.
        // (4,308 bytes: the payload grows to 4 KiB, then the last read is a
        // chunk that takes the next byte too.)
        let mut bytes = client_frame(true, OP_BINARY, &[7; 4300]);
        bytes.push(0x80 | OP_TEXT);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&bytes).await.unwrap();
        let mut reader = FrameReader::default();
        let read = std::future::poll_fn(|cx| reader.poll_frame(cx, &mut server, FRAME_BYTES_MAX)).await.unwrap();
        assert!(matches!(&read, Read::Frame(head, payload) if head.opcode == OP_BINARY && payload.len() == 4300));
        assert_eq!(reader.buf, [0x80 | OP_TEXT]);
        let kept = reader.buf.capacity();
        assert!(kept <= crate::codec::BUF_KEPT_BYTES_MAX, "{kept} bytes kept for 1");
    }

    #[test]
    fn long_payloads_use_extended_lengths() {
        let mut out = Vec::new();
        put_frame(&mut out, OP_BINARY, &[7; 300]);
        assert_eq!(&out[..4], &[0x82, 126, 0x01, 0x2C]);
        let mut out = Vec::new();
        put_frame(&mut out, OP_BINARY, &vec![7; 70_000]);
        assert_eq!(&out[..2], &[0x82, 127]);
        assert_eq!(u64::from_be_bytes(out[2..10].try_into().unwrap()), 70_000);
    }
}
