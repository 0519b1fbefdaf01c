//! The WebSocket transport after the upgrade (crates/gateway/src/ws.rs:
//! masking, control frames, fragmentation, size limits, UTF-8) and the
//! decoding behind it (JSON text frames through `codec::decode_json`,
//! binary frames through postcard).
//!
//! Input: two control bytes (how the peer's bytes are cut into reads, and
//! when a read stalls), then the bytes the peer sends. Checked:
//! - what is read equals what a plain model of RFC 6455's server side says
//!   (as far as the gateway enforces it), however the bytes are cut;
//! - a message over the limit (`FRAME_BYTES_MAX`, or the one before
//!   `hello`, as the second control byte's top bit says), in one frame or in fragments, is
//!   refused as `frame_too_large`, and the reader never holds more than a
//!   frame and a message;
//! - every decoded frame round-trips through both encodings;
//! - each ping is answered with an unmasked pong of the same payload, and
//!   the close frame the server sends echoes a valid peer close code or
//!   carries the code that matches why it closed;
//! - the reader waits only when the socket has nothing.
#![no_main]

use hongbao_fuzz::{assert_round_trips, block_on, drive, Chunked, Plan};
use hongbao_gateway::fuzz::{decode_json, WsRead, WsReader};
use hongbao_proto::{binary, ErrorCode, FRAME_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// The reader's stack chunk: it may read this far past what it needs.
const READ_CHUNK_BYTES: usize = 512;
/// Longest frame header.
const HEAD_BYTES_MAX: usize = 14;
/// Its first payload allocation.
const BODY_CHUNK_BYTES: usize = 1024;
/// A frame being read and a fragmented message, with `Vec`'s doubling.
const HELD_BYTES_MAX: usize = 2 * (HEAD_BYTES_MAX + FRAME_BYTES_MAX + READ_CHUNK_BYTES) + 2 * FRAME_BYTES_MAX;

/// One step of the model: what the reader gives, the offset of the first
/// byte it may still hold (the frame's, or the fragmented message's), and
/// for a ping the pong payload it owes.
struct Step {
    read: WsRead,
    from: usize,
    pong: Option<Vec<u8>>,
}

/// The most the reader may hold once `held` bytes have come of the frame or
/// message it is reading: a payload grows by doubling as its bytes arrive,
/// and `Vec` doubles again.
fn follows(held: usize) -> usize {
    4 * held + 2 * READ_CHUNK_BYTES + BODY_CHUNK_BYTES + HEAD_BYTES_MAX
}

/// What the reader must give for `stream`, up to the first outcome that
/// ends the connection, and the status of the close frame the peer sent
/// (`Some(None)`: a close frame without a valid code).
fn model(stream: &[u8], frame_bytes_max: usize) -> (Vec<Step>, Option<Option<u16>>) {
    let mut steps = Vec::new();
    let mut partial: Option<(u8, Vec<u8>)> = None;
    // Where the fragmented message in `partial` began.
    let mut message_at = 0;
    let mut at = 0;
    let bad = |code| WsRead::Bad((code, String::new()));
    loop {
        let rest = &stream[at..];
        let from = if partial.is_some() { message_at } else { at };
        let step = |read| Step { read, from, pong: None };
        // Cut off between frames or inside one: the peer is gone.
        let [b0, b1, ..] = *rest else {
            steps.push(step(WsRead::Closed));
            return (steps, None);
        };
        let extended = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = b1 & 0x80 != 0;
        let head_len = 2 + extended + if masked { 4 } else { 0 };
        let Some(head) = rest.get(..head_len) else {
            steps.push(step(WsRead::Closed));
            return (steps, None);
        };
        if b0 & 0x70 != 0 || !masked {
            steps.push(step(bad(ErrorCode::Malformed)));
            return (steps, None);
        }
        let len = match extended {
            2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            8 => u64::from_be_bytes(head[2..10].try_into().unwrap()),
            _ => u64::from(b1 & 0x7F),
        };
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        let refused = match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                let so_far = if opcode == OP_CONTINUATION { partial.as_ref().map_or(0, |(_, p)| p.len()) } else { 0 };
                let too_large = (so_far as u64).saturating_add(len) > frame_bytes_max as u64;
                too_large.then_some(ErrorCode::FrameTooLarge)
            }
            OP_CLOSE | OP_PING | OP_PONG => (!fin || len > 125).then_some(ErrorCode::Malformed),
            _ => Some(ErrorCode::Malformed),
        };
        if let Some(code) = refused {
            steps.push(step(bad(code)));
            return (steps, None);
        }
        let len = len as usize;
        let Some(masked_payload) = rest.get(head_len..head_len + len) else {
            steps.push(step(WsRead::Closed));
            return (steps, None);
        };
        let mask = &head[head_len - 4..];
        let payload: Vec<u8> = masked_payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        at += head_len + len;
        let message = match opcode {
            OP_PING => {
                steps.push(Step { read: WsRead::Heartbeat, from, pong: Some(payload) });
                continue;
            }
            OP_PONG => {
                steps.push(step(WsRead::Heartbeat));
                continue;
            }
            OP_CLOSE => {
                let code = payload
                    .get(..2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999));
                steps.push(step(WsRead::Closed));
                return (steps, Some(code));
            }
            OP_TEXT | OP_BINARY if partial.is_some() => {
                steps.push(step(bad(ErrorCode::Malformed)));
                return (steps, None);
            }
            OP_TEXT | OP_BINARY if !fin => {
                partial = Some((opcode, payload));
                message_at = at - head_len - len;
                continue;
            }
            OP_TEXT | OP_BINARY => (opcode, payload),
            _ => {
                let Some((opcode, mut message)) = partial.take() else {
                    steps.push(step(bad(ErrorCode::Malformed)));
                    return (steps, None);
                };
                message.extend_from_slice(&payload);
                if !fin {
                    partial = Some((opcode, message));
                    continue;
                }
                (opcode, message)
            }
        };
        let read = decode(message.0, &message.1);
        let last = matches!(read, WsRead::Bad(_));
        steps.push(step(read));
        if last {
            return (steps, None);
        }
    }
}

fn decode(opcode: u8, message: &[u8]) -> WsRead {
    let decoded = if opcode == OP_TEXT {
        match std::str::from_utf8(message) {
            Ok(text) => decode_json(text),
            Err(_) => Err((ErrorCode::Malformed, String::new())),
        }
    } else {
        binary::decode_client(message).map_err(|e| (e.code(), String::new()))
    };
    decoded.map_or_else(WsRead::Bad, WsRead::Frame)
}

fn same(got: &WsRead, want: &WsRead) -> bool {
    match (got, want) {
        (WsRead::Bad((a, _)), WsRead::Bad((b, _))) => a == b,
        _ => got == want,
    }
}

/// An unmasked server frame, as the gateway writes it.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
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
    out
}

fuzz_target!(|data: &[u8]| {
    let (plan, stream) = Plan::split(data);
    let frame_bytes_max = Plan::frame_bytes_max(data);
    let (expected, peer_close) = model(stream, frame_bytes_max);
    let io = Chunked::new(stream, plan);
    let stalls = io.stalls();
    let mut ws = WsReader::new(io);
    for (i, want) in expected.iter().enumerate() {
        let got = drive(&stalls, |cx| {
            let poll = ws.poll_recv(cx, frame_bytes_max);
            // Memory follows the bytes received, waiting or not.
            let held = ws.stream_mut().consumed() - want.from;
            let capacity = ws.buffered_capacity();
            assert!(capacity <= HELD_BYTES_MAX, "reader holds {capacity} bytes");
            if !matches!(poll, std::task::Poll::Ready(WsRead::Bad(_))) {
                assert!(capacity <= follows(held), "reader holds {capacity} bytes for {held} received");
            }
            poll
        });
        assert!(same(&got, &want.read), "step {i}: read {got:?}, the format says {:?}", want.read);
        match &got {
            WsRead::Frame(frame) => assert_round_trips(frame),
            WsRead::Heartbeat => {
                // What the connection writes next: the pong it owes, if any.
                ws.stream_mut().written.clear();
                block_on(&stalls, ws.send(&[])).expect("in-memory writes never fail");
                let pong = want.pong.as_deref().map(|p| server_frame(OP_PONG, p)).unwrap_or_default();
                assert_eq!(ws.stream_mut().written, pong, "the pong answers the ping");
            }
            _ => {}
        }
    }
    // How the connection loop ends it: a close frame with a status.
    let why = match expected.last().map(|s| &s.read) {
        Some(WsRead::Bad((code, _))) => *code,
        _ => ErrorCode::ShuttingDown,
    };
    ws.stream_mut().written.clear();
    block_on(&stalls, ws.close(why));
    let status = match peer_close {
        Some(echo) => echo,
        None => Some(match why {
            ErrorCode::ShuttingDown => 1001,
            ErrorCode::FrameTooLarge => 1009,
            _ => 1008,
        }),
    };
    let payload = status.map(u16::to_be_bytes);
    let close = server_frame(OP_CLOSE, payload.as_ref().map_or(&[][..], |s| &s[..]));
    assert_eq!(ws.stream_mut().written, close, "the close frame");
});
