//! Turning bytes from a peer into `ClientFrame`s: the binary frame reader for
//! raw TCP and the JSON decoder for WebSocket text frames.
//!
//! Both reject bad input with a `FrameError` that names the client error code;
//! nothing here panics on peer input.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hongbao_core::limits::FRAME_BYTES_MAX;
use hongbao_proto::{binary, ClientFrame, DecodeError, ErrorCode, FRAME_HEADER_BYTES, REQUEST_OPS};
use tokio::io::{AsyncRead, ReadBuf};

/// A frame the peer sent that we refuse. Always fatal for the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError { code, message: message.into() }
    }
}

impl From<DecodeError> for FrameError {
    fn from(e: DecodeError) -> FrameError {
        FrameError::new(e.code(), e.to_string())
    }
}

/// What reading the next binary frame gave.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    Frame(ClientFrame),
    /// The peer closed cleanly between frames.
    Eof,
    /// The peer closed in the middle of a frame.
    Truncated,
    /// The frame is refused (oversized, unknown op, undecodable).
    Bad(FrameError),
}

/// Reads `[u32 BE length][postcard body]` frames.
///
/// `poll_read_frame` keeps all progress in `self` and holds nothing between
/// polls, so the connection loop can poll it beside its outbox and timers
/// without a stored future and without losing bytes.
///
/// A small frame (most are: a shake is about ten bytes) comes in with one
/// read into a chunk on the poll's stack, header and body together. That
/// read returns fewer bytes than asked, which tells tokio the socket is
/// drained, so the connection does not read again only to hear `EAGAIN`:
/// one `recvfrom` per request instead of three (header, body, `EAGAIN`)
/// when header and body were read exactly.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    /// Bytes received and not yet returned as frames: part of a frame, or
    /// frames that arrived together. Between frames (an idle connection) it
    /// is empty and holds no heap memory; while a frame arrives it grows
    /// with the bytes received (`grow_for_read`: a peer that announces 64 KiB
    /// and sends 4 bytes costs about 1 KiB, not 64).
    buf: Vec<u8>,
}

/// Bytes asked of the socket per read while the frame is small or its
/// length still unknown (on the stack, never kept).
const READ_CHUNK_BYTES: usize = 512;

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// True between frames: nothing received is waiting to be decoded.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    #[cfg(test)]
    pub async fn read_frame<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> std::io::Result<ReadOutcome> {
        std::future::poll_fn(|cx| self.poll_read_frame(cx, io, FRAME_BYTES_MAX)).await
    }

    /// The next frame, whose body may be at most `frame_bytes_max` bytes
    /// (`FRAME_BYTES_MAX`, or less before `hello`).
    pub fn poll_read_frame<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
        frame_bytes_max: usize,
    ) -> Poll<std::io::Result<ReadOutcome>> {
        loop {
            let mut frame_len = None;
            if self.buf.len() >= FRAME_HEADER_BYTES {
                // Checked before anything is allocated for the body.
                let checked = match binary::body_len(&self.buf[..FRAME_HEADER_BYTES]) {
                    Ok(Some(len)) => check_frame_len(len, frame_bytes_max).map(|()| len),
                    Ok(None) => unreachable!("a full header always has a length"),
                    Err(e) => Err(e.into()),
                };
                let body_len = match checked {
                    Ok(len) => len,
                    Err(e) => {
                        self.buf = Vec::new();
                        return Poll::Ready(Ok(ReadOutcome::Bad(e)));
                    }
                };
                debug_assert!(body_len <= frame_bytes_max && body_len <= FRAME_BYTES_MAX);
                let end = FRAME_HEADER_BYTES + body_len;
                if self.buf.len() >= end {
                    let outcome = match binary::decode_client(&self.buf[FRAME_HEADER_BYTES..end]) {
                        Ok(frame) => ReadOutcome::Frame(frame),
                        Err(e) => ReadOutcome::Bad(e.into()),
                    };
                    consume_frame(&mut self.buf, end);
                    return Poll::Ready(Ok(outcome));
                }
                frame_len = Some(end);
            }
            let n = ready!(poll_read_more(cx, io, &mut self.buf, frame_len))?;
            if n == 0 {
                let outcome = if self.buf.is_empty() { ReadOutcome::Eof } else { ReadOutcome::Truncated };
                self.buf = Vec::new();
                return Poll::Ready(Ok(outcome));
            }
        }
    }
}

/// Refuses a frame (or WebSocket message) of `len` bytes over `max`: the
/// connection's limit now, which is smaller before `hello`.
pub(crate) fn check_frame_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len <= max {
        return Ok(());
    }
    let when = if max < FRAME_BYTES_MAX { " before hello" } else { "" };
    Err(FrameError::new(ErrorCode::FrameTooLarge, format!("frame of {len} bytes exceeds the maximum of {max}{when}")))
}

/// Reads more bytes into `buf`, which holds the start of a frame ending at
/// `frame_end` (when its header has told). A small frame, or one whose
/// length is not known yet, is read through a chunk on the stack; the rest
/// of a large one straight into `buf`, grown as its bytes arrive. Returns
/// the bytes added; 0 is end of stream.
pub(crate) fn poll_read_more<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    io: &mut R,
    buf: &mut Vec<u8>,
    frame_end: Option<usize>,
) -> Poll<std::io::Result<usize>> {
    match frame_end {
        Some(end) if end.saturating_sub(buf.len()) > READ_CHUNK_BYTES => {
            let filled = buf.len();
            grow_for_read(buf, filled, end);
            let read = poll_read(cx, io, &mut buf[filled..]);
            let n = match &read {
                Poll::Ready(Ok(n)) => *n,
                _ => 0,
            };
            buf.truncate(filled + n);
            read
        }
        _ => {
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let n = ready!(poll_read(cx, io, &mut chunk))?;
            buf.extend_from_slice(&chunk[..n]);
            Poll::Ready(Ok(n))
        }
    }
}

/// Capacity a reader's buffer may keep for the bytes that came after a
/// frame (at most one read chunk of them).
pub(crate) const BUF_KEPT_BYTES_MAX: usize = 2 * READ_CHUNK_BYTES;

/// Drops the first `end` bytes of `buf`, a frame just decoded, and keeps
/// what came after it. Those are less than one read chunk, so a buffer that
/// grew for a large frame is not kept for them: a peer that sent a large
/// frame and one byte of the next, then went quiet, held the large frame's
/// allocation for as long as it stayed (found by fuzzing, docs/fuzzing.md).
pub(crate) fn consume_frame(buf: &mut Vec<u8>, end: usize) {
    if buf.len() == end {
        *buf = Vec::new();
    } else if buf.capacity() > BUF_KEPT_BYTES_MAX {
        *buf = buf[end..].to_vec();
    } else {
        buf.drain(..end);
    }
}

/// First allocation for a frame body; it doubles from there up to the length
/// the header announced.
const BODY_CHUNK_BYTES: usize = 1024;

/// Makes room in `buf` for the next read of a `len`-byte body of which
/// `filled` bytes have arrived: memory follows the bytes received, so an
/// announced length alone cannot make the server allocate.
pub(crate) fn grow_for_read(buf: &mut Vec<u8>, filled: usize, len: usize) {
    debug_assert!(filled < len);
    if filled == buf.len() {
        let next = (filled * 2).max(BODY_CHUNK_BYTES).min(len);
        buf.resize(next, 0);
    }
}

/// For the fuzz targets (`fuzz/`): the heap the reader holds, to check that
/// memory follows the bytes received and never passes the frame limit.
#[cfg(fuzzing)]
impl FrameReader {
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// One `read` into `buf`; `Ok(0)` is end of stream.
fn poll_read<R: AsyncRead + Unpin>(cx: &mut Context<'_>, io: &mut R, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
    let mut buf = ReadBuf::new(buf);
    ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    Poll::Ready(Ok(buf.filled().len()))
}

/// The snake_case names of every `Request` variant, as they appear in JSON.
const REQUEST_OP_NAMES: [&str; REQUEST_OPS as usize] =
    ["hello", "ping", "shake", "send", "grab", "open", "detail", "balance", "ack"];

/// Decodes a WebSocket text frame.
///
/// The JSON is parsed to a `Value` first so that a `req` naming an operation
/// we do not know (`UnknownOp`, perhaps a newer client) is told apart from
/// JSON that is simply wrong (`Malformed`); serde alone reports both as one
/// error.
pub(crate) fn decode_json(text: &str) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError::new(ErrorCode::Malformed, format!("invalid JSON: {e}")))?;
    let op = match value.get("req") {
        Some(serde_json::Value::String(name)) => name.as_str(),
        Some(serde_json::Value::Object(map)) if map.len() == 1 => map.keys().next().map_or("", String::as_str),
        Some(_) => return Err(FrameError::new(ErrorCode::Malformed, "req must be an operation name or {op: {...}}")),
        None => return Err(FrameError::new(ErrorCode::Malformed, "missing field req")),
    };
    let Some(op) = REQUEST_OP_NAMES.iter().copied().find(|known| *known == op) else {
        // Echo at most a short prefix of the name: it is peer input.
        let shown: String = op.chars().take(32).collect();
        return Err(FrameError::new(ErrorCode::UnknownOp, format!("unknown operation {shown:?}")));
    };
    serde_json::from_value(value).map_err(|e| FrameError::new(ErrorCode::Malformed, format!("invalid {op}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{Request, SplitKind, Target};
    use tokio::io::AsyncWriteExt;

    #[test]
    fn op_names_match_every_request_variant() {
        let all = [
            Request::Hello { token: String::new() },
            Request::Ping,
            Request::Shake { campaign: 0, key: None },
            Request::Send {
                amount_fen: 1,
                count: 1,
                kind: SplitKind::Lucky,
                to: Target::User(1),
                greeting: String::new(),
                key: String::new(),
            },
            Request::Grab { packet: 1 },
            Request::Open { packet: 1 },
            Request::Detail { packet: 1 },
            Request::Balance,
            Request::Ack { msg: 1 },
        ];
        assert_eq!(all.len(), REQUEST_OPS as usize);
        for req in all {
            assert!(REQUEST_OP_NAMES.contains(&req.op_name()), "{req:?}");
            // The serde name is the op name: that is what the JSON check relies on.
            let json = serde_json::to_value(&req).unwrap();
            let serde_name = match &json {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(m) => m.keys().next().unwrap().clone(),
                other => panic!("{other}"),
            };
            assert_eq!(serde_name, req.op_name());
        }
    }

    #[test]
    fn valid_json_frames_decode() {
        assert_eq!(
            decode_json(r#"{"id":1,"req":{"open":{"packet":5}}}"#),
            Ok(ClientFrame { id: 1, req: Request::Open { packet: 5 } })
        );
        assert_eq!(decode_json(r#"{"id":2,"req":"ping"}"#), Ok(ClientFrame { id: 2, req: Request::Ping }));
        assert_eq!(
            decode_json(r#"{"id":3,"req":{"hello":{"token":"abc"}}}"#),
            Ok(ClientFrame { id: 3, req: Request::Hello { token: "abc".into() } })
        );
        assert_eq!(
            decode_json(r#"{"id":4,"req":{"shake":{"campaign":0,"key":null}}}"#),
            Ok(ClientFrame { id: 4, req: Request::Shake { campaign: 0, key: None } })
        );
    }

    #[test]
    fn unknown_operations_are_told_from_malformed_json() {
        let code = |text: &str| decode_json(text).map_err(|e| e.code);
        assert_eq!(code(r#"{"id":1,"req":{"steal":{"packet":5}}}"#), Err(ErrorCode::UnknownOp));
        assert_eq!(code(r#"{"id":1,"req":"teleport"}"#), Err(ErrorCode::UnknownOp));
        // Known op, wrong fields or types.
        assert_eq!(code(r#"{"id":1,"req":{"open":{"packet":"five"}}}"#), Err(ErrorCode::Malformed));
        assert_eq!(code(r#"{"id":1,"req":{"open":{}}}"#), Err(ErrorCode::Malformed));
        // Not a frame at all.
        for text in [
            "",
            "not json",
            "[]",
            r#"{"id":1}"#,
            r#"{"req":"ping"}"#,
            r#"{"id":-1,"req":"ping"}"#,
            r#"{"id":1,"req":7}"#,
            r#"{"id":1,"req":{"open":{"packet":5},"grab":{"packet":5}}}"#,
            r#"{"id":1,"req":{"open":{"packet":5}}"#,
        ] {
            assert_eq!(code(text), Err(ErrorCode::Malformed), "{text}");
        }
    }

    async fn read_all(bytes: Vec<u8>) -> Vec<ReadOutcome> {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            // Write in odd-sized pieces so frames arrive split across reads.
            for chunk in bytes.chunks(7) {
                client.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = FrameReader::new();
        let mut out = Vec::new();
        loop {
            let outcome = reader.read_frame(&mut server).await.unwrap();
            let last = !matches!(outcome, ReadOutcome::Frame(_));
            out.push(outcome);
            if last {
                break;
            }
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn reads_good_frames_then_eof() {
        let a = ClientFrame { id: 1, req: Request::Hello { token: "v1.1.2.sig".into() } };
        let b = ClientFrame { id: 2, req: Request::Open { packet: 1 << 40 } };
        let mut bytes = binary::encode_client(&a);
        bytes.extend(binary::encode_client(&b));
        let out = read_all(bytes).await;
        assert!(
            matches!(&out[..], [ReadOutcome::Frame(x), ReadOutcome::Frame(y), ReadOutcome::Eof] if *x == a && *y == b)
        );
    }

    #[tokio::test]
    async fn large_frames_and_frames_sharing_a_read_come_out_whole() {
        let big = ClientFrame { id: 1, req: Request::Hello { token: "t".repeat(5000) } };
        let small = ClientFrame { id: 2, req: Request::Shake { campaign: 0, key: None } };
        let mut bytes = binary::encode_client(&small);
        bytes.extend(binary::encode_client(&big));
        bytes.extend(binary::encode_client(&small));
        bytes.extend(binary::encode_client(&small));
        let out = read_all(bytes).await;
        assert!(
            matches!(&out[..], [ReadOutcome::Frame(a), ReadOutcome::Frame(b), ReadOutcome::Frame(c), ReadOutcome::Frame(d), ReadOutcome::Eof]
                if *a == small && *b == big && *c == small && *d == small),
            "{out:?}"
        );
        // Several frames in one read, then nothing left behind.
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut three = Vec::new();
        for _ in 0..3 {
            three.extend(binary::encode_client(&small));
        }
        client.write_all(&three).await.unwrap();
        let mut reader = FrameReader::new();
        for _ in 0..3 {
            assert!(matches!(reader.read_frame(&mut server).await.unwrap(), ReadOutcome::Frame(f) if f == small));
        }
        assert_eq!(reader.buf.capacity(), 0, "an idle reader holds no memory");
    }

    #[tokio::test]
    async fn a_large_frame_leaves_no_large_buffer_behind() {
        // A large frame and the first byte of the next one, then the peer
        // goes quiet: the reader keeps that byte, not the large allocation.
        // (4,298 bytes: the body grows to 4 KiB, then the last read is a
        // chunk that takes the next byte too.)
        let big = ClientFrame { id: 1, req: Request::Hello { token: "t".repeat(4290) } };
        let mut bytes = binary::encode_client(&big);
        bytes.push(0);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&bytes).await.unwrap();
        let mut reader = FrameReader::new();
        assert!(matches!(reader.read_frame(&mut server).await.unwrap(), ReadOutcome::Frame(f) if f == big));
        assert_eq!(reader.buf, [0]);
        assert!(reader.buf.capacity() <= BUF_KEPT_BYTES_MAX, "{} bytes kept for 1", reader.buf.capacity());
    }

    #[tokio::test]
    async fn an_announced_length_alone_allocates_little() {
        // Announces the largest body, sends 4 bytes of it, then stalls.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&(FRAME_BYTES_MAX as u32).to_be_bytes()).await.unwrap();
        client.write_all(&[1, 2, 3, 4]).await.unwrap();
        let mut reader = FrameReader::new();
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(50), reader.read_frame(&mut server)).await;
        assert!(stalled.is_err(), "no frame yet");
        assert!(reader.buf.capacity() <= BODY_CHUNK_BYTES, "{} bytes held for 8 received", reader.buf.capacity());
        assert_eq!(reader.buf.len(), 8, "header and the 4 body bytes");
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_the_body() {
        // Only the header is sent: the reader must not wait for 64 KiB + 1.
        let bytes = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
        let out = read_all(bytes).await;
        assert!(matches!(&out[..], [ReadOutcome::Bad(e)] if e.code == ErrorCode::FrameTooLarge), "{out:?}");
    }

    #[test]
    fn the_longest_hello_fits_the_limit_before_hello() {
        use crate::limits::{HELLO_FRAME_BYTES_MAX, HELLO_JSON_OVERHEAD_BYTES_MAX};
        use hongbao_boundary::TOKEN_BYTES_MAX;
        let hello = ClientFrame { id: u64::MAX, req: Request::Hello { token: "t".repeat(TOKEN_BYTES_MAX) } };
        let json = serde_json::to_vec(&hello).unwrap();
        let body = binary::encode_client(&hello).len() - FRAME_HEADER_BYTES;
        assert_eq!(json.len(), TOKEN_BYTES_MAX + HELLO_JSON_OVERHEAD_BYTES_MAX);
        assert_eq!((json.len(), body), (312, 269), "as docs/protocol.md says");
        assert!(json.len() <= HELLO_FRAME_BYTES_MAX && body <= HELLO_FRAME_BYTES_MAX);
        assert_eq!(check_frame_len(HELLO_FRAME_BYTES_MAX, HELLO_FRAME_BYTES_MAX), Ok(()));
        let refused = check_frame_len(HELLO_FRAME_BYTES_MAX + 1, HELLO_FRAME_BYTES_MAX).unwrap_err();
        assert_eq!(refused.code, ErrorCode::FrameTooLarge);
        assert!(refused.message.ends_with("before hello"), "{}", refused.message);
    }

    #[tokio::test]
    async fn a_header_over_the_connections_limit_is_refused_before_the_body() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&513u32.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new();
        let read = std::future::poll_fn(|cx| reader.poll_read_frame(cx, &mut server, 512)).await.unwrap();
        assert!(matches!(&read, ReadOutcome::Bad(e) if e.code == ErrorCode::FrameTooLarge), "{read:?}");
        assert_eq!(reader.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn truncated_frames_are_reported() {
        let bytes = binary::encode_client(&ClientFrame { id: 1, req: Request::Open { packet: 9 } });
        let out = read_all(bytes[..bytes.len() - 1].to_vec()).await;
        assert!(matches!(&out[..], [ReadOutcome::Truncated]), "{out:?}");
        let out = read_all(bytes[..2].to_vec()).await;
        assert!(matches!(&out[..], [ReadOutcome::Truncated]), "{out:?}");
    }

    #[tokio::test]
    async fn undecodable_bodies_are_refused() {
        // id = 1, then op 99.
        let out = read_all(vec![0, 0, 0, 2, 1, 99]).await;
        assert!(matches!(&out[..], [ReadOutcome::Bad(e)] if e.code == ErrorCode::UnknownOp), "{out:?}");
        // id = 1, op = open, packet missing.
        let out = read_all(vec![0, 0, 0, 2, 1, 5]).await;
        assert!(matches!(&out[..], [ReadOutcome::Bad(e)] if e.code == ErrorCode::Malformed), "{out:?}");
    }

    /// The example session in docs/protocol.md must stay true to the types.
    #[test]
    fn protocol_doc_example_parses() {
        let doc = include_str!("../../../docs/protocol.md");
        let example = doc.split("## Example session").nth(1).unwrap();
        let (mut sent, mut received) = (0, 0);
        for line in example.lines() {
            if let Some(json) = line.strip_prefix("→ ") {
                match decode_json(json) {
                    Ok(_) => {}
                    Err(e) => assert_eq!(e.code, ErrorCode::UnknownOp, "{json}"),
                }
                sent += 1;
            } else if let Some(json) = line.strip_prefix("← ") {
                let frame: hongbao_proto::ServerFrame = serde_json::from_str(json).unwrap();
                assert_eq!(serde_json::to_string(&frame).unwrap(), json);
                received += 1;
            }
        }
        assert!(sent >= 6 && received >= 6);
    }
}
