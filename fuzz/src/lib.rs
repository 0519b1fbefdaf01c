//! What the fuzz targets share: a peer that delivers bytes in pieces
//! (`Chunked`), a driver that polls a reader to completion and checks it
//! only waits when the socket did (`drive`), the round-trip check every
//! decoded `ClientFrame` must pass, and the seed-corpus generator (`seeds`,
//! a test).
//!
//! Built only by `cargo fuzz` (or with `RUSTFLAGS='--cfg fuzzing'`): the
//! product's decoders are reachable only under that cfg.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use hongbao_proto::{binary, ClientFrame, FRAME_HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(test)]
mod seeds;

/// Largest piece a `Plan` may hand out, chosen by the first control byte.
/// The sizes around 512 straddle the gateway readers' stack chunk.
const PIECE_BYTES_MAX: [usize; 12] = [1, 2, 3, 5, 8, 64, 511, 512, 513, 4096, 65_536, usize::MAX];

/// How a `Chunked` peer cuts its bytes: piece sizes and when a read finds
/// nothing yet (the reader must then keep its progress and wait).
#[derive(Clone, Debug)]
pub struct Plan {
    piece_bytes_max: usize,
    /// xorshift state for the piece sizes and stalls.
    state: u32,
    /// A read stalls once every `stall_every` reads; 0 never.
    stall_every: u32,
    reads: u32,
}

impl Plan {
    /// Everything at once (as far as the reader asks), never stalling.
    pub fn whole() -> Plan {
        Plan { piece_bytes_max: usize::MAX, state: 1, stall_every: 0, reads: 0 }
    }

    /// A plan from two control bytes: the first picks the largest piece, the
    /// second seeds the sizes and how often a read stalls.
    pub fn from_control(a: u8, b: u8) -> Plan {
        let piece_bytes_max = PIECE_BYTES_MAX[usize::from(a) % PIECE_BYTES_MAX.len()];
        let stall_every = u32::from(b & 0x3);
        Plan { piece_bytes_max, state: u32::from(b) << 8 | u32::from(a) | 1, stall_every, reads: 0 }
    }

    /// The frame limit the connection is under, also from the second
    /// control byte (its top bit, which the plan does not use): before
    /// `hello` the gateway reads frames of `HELLO_FRAME_BYTES_MAX` at most,
    /// after it `FRAME_BYTES_MAX`.
    pub fn frame_bytes_max(data: &[u8]) -> usize {
        match data {
            [_, b, ..] if b & 0x80 != 0 => hongbao_gateway::limits::HELLO_FRAME_BYTES_MAX,
            _ => hongbao_proto::FRAME_BYTES_MAX,
        }
    }

    /// Splits a fuzz input into its plan (the first two bytes) and the
    /// bytes the peer sends.
    pub fn split(data: &[u8]) -> (Plan, &[u8]) {
        match data {
            [a, b, rest @ ..] => (Plan::from_control(*a, *b), rest),
            _ => (Plan::whole(), data),
        }
    }

    fn next_random(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        x
    }

    fn stall(&mut self) -> bool {
        self.reads = self.reads.wrapping_add(1);
        self.stall_every != 0 && self.reads.is_multiple_of(self.stall_every + 1)
    }

    fn piece_bytes(&mut self) -> usize {
        if self.piece_bytes_max == usize::MAX {
            return usize::MAX;
        }
        // Mostly the largest piece, sometimes any size up to it.
        let r = self.next_random() as usize;
        if r.is_multiple_of(4) {
            1 + (r >> 2) % self.piece_bytes_max
        } else {
            self.piece_bytes_max
        }
    }
}

/// An in-memory socket: reads give the peer's bytes in the pieces a `Plan`
/// says, writes are kept (pongs, close frames).
pub struct Chunked<'a> {
    data: &'a [u8],
    /// Bytes handed to the reader so far.
    pos: usize,
    plan: Plan,
    /// Reads that stalled so far, shared with `drive`.
    stalls: Rc<Cell<u64>>,
    /// Everything the server wrote.
    pub written: Vec<u8>,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], plan: Plan) -> Chunked<'a> {
        Chunked { data, pos: 0, plan, stalls: Rc::new(Cell::new(0)), written: Vec::new() }
    }

    /// Bytes the reader has taken from the socket.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// The stall counter to give `drive`.
    pub fn stalls(&self) -> Rc<Cell<u64>> {
        Rc::clone(&self.stalls)
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plan.stall() {
            this.stalls.set(this.stalls.get() + 1);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let rest = &this.data[this.pos..];
        let n = this.plan.piece_bytes().min(rest.len()).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls `poll` until it is ready, as a runtime would after each wake-up.
///
/// Checks that it returns `Pending` only when the socket did: a reader that
/// waits with no read pending would never be woken, and its connection
/// would hang until the idle timeout.
pub fn drive<T>(stalls: &Cell<u64>, mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let before = stalls.get();
        match poll(&mut cx) {
            Poll::Ready(value) => return value,
            Poll::Pending => {
                assert!(stalls.get() > before, "Pending without the socket pending: nothing would wake it")
            }
        }
    }
}

/// Runs a future that only waits on `Chunked` sockets.
pub fn block_on<F: std::future::Future>(stalls: &Cell<u64>, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    drive(stalls, |cx| future.as_mut().poll(cx))
}

/// Every frame the server accepts, from either transport, must survive both
/// encodings: binary (postcard) and JSON (as a WebSocket text frame).
pub fn assert_round_trips(frame: &ClientFrame) {
    let bytes = binary::encode_client(frame);
    let len = binary::body_len(&bytes).expect("an encoded frame has a valid header").expect("and a whole one");
    assert_eq!(len, bytes.len() - FRAME_HEADER_BYTES);
    let back =
        binary::decode_client(&bytes[FRAME_HEADER_BYTES..]).expect("a decoded frame re-encodes to a decodable one");
    assert_eq!(&back, frame, "binary round trip");

    let json = serde_json::to_string(frame).expect("a frame serialises to JSON");
    let back = hongbao_gateway::fuzz::decode_json(&json).expect("a decoded frame re-encodes to decodable JSON");
    assert_eq!(&back, frame, "JSON round trip of {json}");
}
