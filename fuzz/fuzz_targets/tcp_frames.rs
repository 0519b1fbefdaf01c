//! The raw TCP transport: `[u32 BE length][postcard body]` frames read by
//! the gateway's `FrameReader` (crates/gateway/src/codec.rs) and decoded by
//! `hongbao_proto::binary::decode_client`.
//!
//! Input: two control bytes (how the peer's bytes are cut into reads, and
//! when a read stalls), then the bytes the peer sends. Checked:
//! - what is read equals what a plain model of the format says, however the
//!   bytes are cut (length header, size limit, truncation, decoding);
//! - a frame over the limit (`FRAME_BYTES_MAX`, or the one before `hello`,
//!   as the second control byte's top bit says) is refused from its header, before the
//!   body is read, and the buffer never grows past the limit; memory
//!   follows the bytes received (an announced length alone allocates
//!   little);
//! - every decoded frame round-trips through both encodings;
//! - the reader waits only when the socket has nothing.
#![no_main]

use hongbao_fuzz::{assert_round_trips, drive, Chunked, Plan};
use hongbao_gateway::fuzz::{TcpRead, TcpReader};
use hongbao_proto::{binary, ErrorCode, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// The reader's stack chunk (`codec::READ_CHUNK_BYTES`): it may read this
/// far past what it needs.
const READ_CHUNK_BYTES: usize = 512;
/// Its first body allocation (`codec::BODY_CHUNK_BYTES`).
const BODY_CHUNK_BYTES: usize = 1024;
/// The most the reader may ever hold: a whole frame and a chunk past it,
/// with `Vec`'s doubling.
const HELD_BYTES_MAX: usize = 2 * (FRAME_HEADER_BYTES + FRAME_BYTES_MAX + READ_CHUNK_BYTES);

/// The most the reader may hold once `held` bytes of a frame have come: the
/// body grows by doubling as its bytes arrive, and `Vec` doubles again.
fn follows(held: usize) -> usize {
    4 * held + 2 * READ_CHUNK_BYTES + BODY_CHUNK_BYTES
}

/// What the reader must give for `stream`, up to the first outcome that is
/// not a frame, with the offset each outcome starts at.
fn model(stream: &[u8], frame_bytes_max: usize) -> Vec<(usize, TcpRead)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.is_empty() {
            out.push((at, TcpRead::Eof));
            return out;
        }
        let Some(header) = rest.get(..FRAME_HEADER_BYTES) else {
            out.push((at, TcpRead::Truncated));
            return out;
        };
        let len = u32::from_be_bytes(header.try_into().unwrap()) as usize;
        if len > frame_bytes_max {
            out.push((at, TcpRead::Bad((ErrorCode::FrameTooLarge, String::new()))));
            return out;
        }
        let Some(body) = rest.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
            out.push((at, TcpRead::Truncated));
            return out;
        };
        match binary::decode_client(body) {
            Ok(frame) => out.push((at, TcpRead::Frame(frame))),
            Err(e) => {
                out.push((at, TcpRead::Bad((e.code(), String::new()))));
                return out;
            }
        }
        at += FRAME_HEADER_BYTES + len;
    }
}

fn same(got: &TcpRead, want: &TcpRead) -> bool {
    match (got, want) {
        (TcpRead::Bad((a, _)), TcpRead::Bad((b, _))) => a == b,
        _ => got == want,
    }
}

fuzz_target!(|data: &[u8]| {
    let (plan, stream) = Plan::split(data);
    let frame_bytes_max = Plan::frame_bytes_max(data);
    let expected = model(stream, frame_bytes_max);
    let mut io = Chunked::new(stream, plan);
    let stalls = io.stalls();
    let mut reader = TcpReader::new();
    for (at, want) in &expected {
        let got = drive(&stalls, |cx| {
            let poll = reader.poll_read_frame(cx, &mut io, frame_bytes_max);
            if poll.is_pending() {
                // Waiting for the rest of a frame: memory follows what came.
                let (held, capacity) = (io.consumed() - at, reader.buffered_capacity());
                assert!(capacity <= follows(held), "waiting reader holds {capacity} bytes for {held} received");
            }
            poll
        })
        .expect("an in-memory read never fails");
        assert!(same(&got, want), "at byte {at}: read {got:?}, the format says {want:?}");

        // Bytes taken from the socket and not yet returned as frames.
        let held = io.consumed() - at;
        let capacity = reader.buffered_capacity();
        assert!(capacity <= HELD_BYTES_MAX, "reader holds {capacity} bytes");
        match &got {
            TcpRead::Frame(frame) => {
                assert!(capacity <= follows(held), "reader holds {capacity} bytes for {held} received");
                assert_round_trips(frame);
            }
            TcpRead::Bad((ErrorCode::FrameTooLarge, _)) => {
                // Refused from the header: at most one read past it.
                assert!(held <= FRAME_HEADER_BYTES + READ_CHUNK_BYTES, "read {held} bytes of an oversized frame");
                assert_eq!(capacity, 0, "a refused frame's bytes are freed");
            }
            // Refused after its body: the connection closes; bytes after it
            // may still be held.
            TcpRead::Bad(_) => assert!(capacity <= follows(held), "reader holds {capacity} bytes for {held} received"),
            TcpRead::Eof | TcpRead::Truncated => assert_eq!(capacity, 0, "the reader holds nothing at the end"),
        }
    }
});
