//! `decode_json` on its own (crates/gateway/src/codec.rs): the JSON
//! `ClientFrame` of a WebSocket text frame. Structured JSON is hard to reach
//! through the framing, so this target gets the text directly.
//!
//! Checked:
//! - a decoded frame round-trips through both encodings;
//! - a refusal is `malformed` or `unknown_op`, and `unknown_op` only when
//!   `req` names no operation the server knows;
//! - every JSON object serde itself would read as a `ClientFrame` is
//!   accepted, as that frame (the op check in front of serde refuses nothing
//!   valid). Objects only: serde's derive also reads a frame written as an
//!   array, `[8,"ping"]`, which the protocol (docs/protocol.md) does not
//!   define and the gateway refuses as `malformed`.
#![no_main]

use hongbao_fuzz::assert_round_trips;
use hongbao_gateway::fuzz::decode_json;
use hongbao_proto::{ClientFrame, ErrorCode};
use libfuzzer_sys::fuzz_target;

const OPS: [&str; 9] = ["hello", "ping", "shake", "send", "grab", "open", "detail", "balance", "ack"];

/// The operation `req` names, if the text is a JSON object with one.
fn named_op(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    match value.get("req")? {
        serde_json::Value::String(name) => Some(name.clone()),
        serde_json::Value::Object(map) if map.len() == 1 => map.keys().next().cloned(),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let decoded = decode_json(text);
    match &decoded {
        Ok(frame) => assert_round_trips(frame),
        Err((ErrorCode::UnknownOp, _)) => {
            let op = named_op(text).expect("unknown_op names an operation");
            assert!(!OPS.contains(&op.as_str()), "{op} is known");
        }
        Err((code, _)) => assert_eq!(*code, ErrorCode::Malformed),
    }
    let object = serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object());
    if let (true, Ok(frame)) = (object, serde_json::from_str::<ClientFrame>(text)) {
        assert_eq!(decoded, Ok(frame), "serde reads {text:?} as a frame");
    }
});
