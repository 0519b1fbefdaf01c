//! The internal link's wire format (crates/link/src/wire.rs):
//! `[u32 LE length][postcard]` messages. The core reads `Up` from gateway
//! processes; a gateway reads `Down` from the core.
//!
//! Input: one byte choosing the direction and how the bytes are cut into
//! reads (plus when a read stalls), then the bytes the peer sends. Checked:
//! - what is read equals what a plain model of the format says, however the
//!   bytes are cut (length, size limit, truncation, postcard);
//! - a message over `MESSAGE_BYTES_MAX` is refused from its header, and the
//!   body buffer never grows past the limit;
//! - every decoded message re-encodes and reads back as itself;
//! - the reader waits only when the socket has nothing.
#![no_main]

use hongbao_fuzz::{block_on, Chunked, Plan};
use hongbao_link::fuzz::{encode, read, Down, Up, MESSAGE_BYTES_MAX};
use hongbao_link::LinkError;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// What `read` must give at the start of `rest`, and the bytes it takes.
fn model<T: DeserializeOwned>(rest: &[u8]) -> (Result<Option<T>, &'static str>, usize) {
    // A stream that ends inside the length counts as a clean end, as
    // `read_exact`'s `UnexpectedEof` is taken there.
    let Some(header) = rest.get(..4) else { return (Ok(None), rest.len()) };
    let len = u32::from_le_bytes(header.try_into().unwrap()) as usize;
    if len > MESSAGE_BYTES_MAX {
        return (Err("too large"), 4);
    }
    let Some(body) = rest.get(4..4 + len) else { return (Err("io"), rest.len()) };
    match postcard::from_bytes(body) {
        Ok(msg) => (Ok(Some(msg)), 4 + len),
        Err(_) => (Err("decode"), 4 + len),
    }
}

fn kind(e: &LinkError) -> &'static str {
    match e {
        LinkError::TooLarge(_) => "too large",
        LinkError::Io(_) => "io",
        LinkError::Decode(_) => "decode",
        other => panic!("read gave {other:?}"),
    }
}

fn check<T: DeserializeOwned + Serialize + PartialEq + Debug>(plan: Plan, stream: &[u8]) {
    let mut io = Chunked::new(stream, plan);
    let stalls = io.stalls();
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (want, len) = model::<T>(&stream[at..]);
        let got = block_on(&stalls, read::<T, _>(&mut io, &mut body));
        assert!(body.capacity() <= 2 * MESSAGE_BYTES_MAX, "body buffer of {} bytes", body.capacity());
        match (&got, &want) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "at byte {at}"),
            (Err(e), Err(w)) => assert_eq!(kind(e), *w, "at byte {at}: {e}"),
            _ => panic!("at byte {at}: read {got:?}, the format says {want:?}"),
        }
        assert_eq!(io.consumed(), at + len, "bytes taken for the message at {at}");
        at += len;
        let Ok(Some(msg)) = got else { return };
        // Re-encoded, it reads back as itself.
        let mut bytes = Vec::new();
        encode(&msg, &mut bytes).expect("a message read re-encodes");
        let mut again = Chunked::new(&bytes, Plan::whole());
        let back = block_on(&again.stalls(), read::<T, _>(&mut again, &mut Vec::new()));
        assert_eq!(back.expect("re-encoded message reads"), Some(msg));
    }
}

fuzz_target!(|data: &[u8]| {
    let [control, rest @ ..] = data else { return };
    let (plan, stream) = match rest {
        [b, stream @ ..] => (Plan::from_control(control >> 1, *b), stream),
        [] => (Plan::whole(), rest),
    };
    if control & 1 == 0 {
        check::<Up>(plan, stream);
    } else {
        check::<Down>(plan, stream);
    }
});
