//! The seed corpora in `fuzz/corpus/<target>/`, made with the product's own
//! encoders: a valid input of every request and message kind, a few
//! malformed ones. The test checks the committed files are what this
//! generator makes; to rewrite them after a protocol change:
//!
//! ```sh
//! cd fuzz && RUSTFLAGS='--cfg fuzzing' HONGBAO_FUZZ_SEEDS=write cargo test --lib
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hongbao_boundary::{GateState, GateView, TokenSigner};
use hongbao_link::fuzz::{encode, Down, Up};
use hongbao_proto::{
    binary, ClientFrame, ErrorCode, Push, PushBody, Reply, Request, ServerFrame, ShakeResult, SplitKind, Target,
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};

/// Control bytes of the framing targets (`Plan::from_control`).
const WHOLE: [u8; 2] = [11, 0];
const ONE_BYTE_STALLING: [u8; 2] = [0, 1];
const ODD_PIECES: [u8; 2] = [6, 0x5a];

/// One request of each kind.
fn requests() -> Vec<(&'static str, ClientFrame)> {
    let frame = |id, req| ClientFrame { id, req };
    vec![
        ("hello", frame(1, Request::Hello { token: "v1.42.1700003600.c2lnbmF0dXJl".into() })),
        ("hello_dev", frame(1, Request::Hello { token: "42".into() })),
        ("ping", frame(2, Request::Ping)),
        ("shake", frame(3, Request::Shake { campaign: 0, key: None })),
        ("shake_keyed", frame(4, Request::Shake { campaign: 7, key: Some("s-42-1".into()) })),
        (
            "send_group",
            frame(
                5,
                Request::Send {
                    amount_fen: 888,
                    count: 3,
                    kind: SplitKind::Lucky,
                    to: Target::Group(9),
                    greeting: "恭喜发财".into(),
                    key: "pkt-42-0001".into(),
                },
            ),
        ),
        (
            "send_users",
            frame(
                6,
                Request::Send {
                    amount_fen: 300,
                    count: 3,
                    kind: SplitKind::Fixed,
                    to: Target::Users(vec![43, 44, 45]),
                    greeting: String::new(),
                    key: "k".into(),
                },
            ),
        ),
        (
            "send_user",
            frame(
                7,
                Request::Send {
                    amount_fen: 100,
                    count: 1,
                    kind: SplitKind::Lucky,
                    to: Target::User(43),
                    greeting: "hi".into(),
                    key: "k2".into(),
                },
            ),
        ),
        ("grab", frame(8, Request::Grab { packet: 1 << 40 | 5 })),
        ("open", frame(9, Request::Open { packet: 1 << 40 | 5 })),
        ("detail", frame(10, Request::Detail { packet: 5 })),
        ("balance", frame(11, Request::Balance)),
        ("ack", frame(u64::MAX, Request::Ack { msg: 3 })),
    ]
}

fn body(frame: &ClientFrame) -> Vec<u8> {
    binary::encode_client(frame)[FRAME_HEADER_BYTES..].to_vec()
}

fn with(control: [u8; 2], bytes: &[u8]) -> Vec<u8> {
    [&control[..], bytes].concat()
}

fn tcp_frames() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut all = Vec::new();
    for (name, frame) in requests() {
        let bytes = binary::encode_client(&frame);
        all.extend_from_slice(&bytes);
        out.push((name.to_string(), with(WHOLE, &bytes)));
    }
    out.push(("all_one_byte_stalling".into(), with(ONE_BYTE_STALLING, &all)));
    out.push(("all_odd_pieces".into(), with(ODD_PIECES, &all)));
    let big = ClientFrame { id: 1, req: Request::Hello { token: "t".repeat(3000) } };
    out.push(("large_then_small".into(), with(ODD_PIECES, &[binary::encode_client(&big), all].concat())));
    // Malformed: oversized header, announced but not sent, unknown op,
    // missing field, truncated header.
    out.push(("oversized".into(), with(WHOLE, &((FRAME_BYTES_MAX + 1) as u32).to_be_bytes())));
    out.push((
        "announced_max".into(),
        with(ONE_BYTE_STALLING, &[&(FRAME_BYTES_MAX as u32).to_be_bytes()[..], &[1, 2, 3, 4]].concat()),
    ));
    out.push(("unknown_op".into(), with(WHOLE, &[0, 0, 0, 2, 1, 99])));
    out.push(("missing_field".into(), with(WHOLE, &[0, 0, 0, 2, 1, 5])));
    out.push(("truncated_header".into(), with(WHOLE, &[0, 0])));
    out
}

/// A masked client frame.
fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
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

fn ws_frames() -> Vec<(String, Vec<u8>)> {
    let (text, binary, ping, pong, close, continuation) = (0x1, 0x2, 0x9, 0xA, 0x8, 0x0);
    let mut out = Vec::new();
    let mut all_text = Vec::new();
    let mut all_binary = Vec::new();
    for (name, frame) in requests() {
        let json = serde_json::to_vec(&frame).unwrap();
        all_text.extend(ws_frame(true, text, &json));
        all_binary.extend(ws_frame(true, binary, &body(&frame)));
        out.push((format!("text_{name}"), with(WHOLE, &ws_frame(true, text, &json))));
        out.push((format!("binary_{name}"), with(WHOLE, &ws_frame(true, binary, &body(&frame)))));
    }
    out.push(("all_text_odd_pieces".into(), with(ODD_PIECES, &all_text)));
    out.push(("all_binary_one_byte_stalling".into(), with(ONE_BYTE_STALLING, &all_binary)));
    // A fragmented message with a ping between its fragments, a pong, then
    // a close with a status.
    let json = serde_json::to_vec(&requests()[0].1).unwrap();
    let fragmented = [
        ws_frame(false, text, &json[..10]),
        ws_frame(true, ping, b"hb"),
        ws_frame(false, continuation, &json[10..20]),
        ws_frame(true, continuation, &json[20..]),
        ws_frame(true, pong, b""),
        ws_frame(true, close, &1000u16.to_be_bytes()),
    ]
    .concat();
    out.push(("fragmented_ping_close".into(), with(ODD_PIECES, &fragmented)));
    let long = format!(r#"{{"id":2,"req":{{"hello":{{"token":"{}"}}}}}}"#, "9".repeat(3000));
    out.push(("long_text".into(), with(WHOLE, &ws_frame(true, text, long.as_bytes()))));
    // Malformed.
    let mut unmasked = ws_frame(true, text, b"{}");
    unmasked[1] &= 0x7F;
    out.push(("unmasked".into(), with(WHOLE, &unmasked)));
    let mut reserved = ws_frame(true, text, b"{}");
    reserved[0] |= 0x40;
    out.push(("reserved_bits".into(), with(WHOLE, &reserved)));
    let mut huge = vec![0x80 | binary, 0x80 | 127];
    huge.extend_from_slice(&((FRAME_BYTES_MAX + 1) as u64).to_be_bytes());
    huge.extend_from_slice(&[0; 4]);
    out.push(("oversized".into(), with(WHOLE, &huge)));
    out.push(("bad_utf8".into(), with(WHOLE, &ws_frame(true, text, &[0xFF, 0xFE]))));
    out.push(("unknown_op".into(), with(WHOLE, &ws_frame(true, text, br#"{"id":1,"req":"fly"}"#))));
    out.push(("long_ping".into(), with(WHOLE, &ws_frame(true, ping, &[0; 126]))));
    out.push(("lone_continuation".into(), with(WHOLE, &ws_frame(true, continuation, b"x"))));
    out
}

fn json_client_frame() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> =
        requests().into_iter().map(|(name, frame)| (name.to_string(), serde_json::to_vec(&frame).unwrap())).collect();
    for (name, text) in [
        ("op_name_only", r#"{"id":2,"req":"ping"}"#),
        ("unknown_op", r#"{"id":1,"req":{"steal":{"packet":5}}}"#),
        ("wrong_type", r#"{"id":1,"req":{"open":{"packet":"five"}}}"#),
        ("two_ops", r#"{"id":1,"req":{"open":{"packet":5},"grab":{"packet":5}}}"#),
        ("negative_id", r#"{"id":-1,"req":"ping"}"#),
        ("unclosed", r#"{"id":1,"req":{"open":{"packet":5}}"#),
        // serde reads this as a frame; the protocol has objects only.
        ("array_form", r#"[8,"ping"]"#),
        ("escapes", r#"{"id":1,"req":{"hello":{"token":"\u0041\ud83d\ude00\n"}}}"#),
    ] {
        out.push((name.to_string(), text.as_bytes().to_vec()));
    }
    out
}

fn link_wire() -> Vec<(String, Vec<u8>)> {
    // First byte: bit 0 picks `Down`, the rest the plan (11: whole reads).
    let (up, down) = ([11 << 1, 0], [11 << 1 | 1, 0]);
    let ups = vec![
        ("hello", Up::Hello { key: "link-key".into(), pid: 4242 }),
        ("listening", Up::Listening),
        ("connect", Up::Connect { conn: 1, user: 42 }),
        ("attach", Up::Attach { conn: 2, user: 43 }),
        ("request_shake", Up::Request { conn: 1, id: 3, req: Request::Shake { campaign: 0, key: None } }),
        ("request_send", Up::Request { conn: 1, id: 5, req: requests()[5].1.req.clone() }),
        ("disconnect", Up::Disconnect { conn: 1 }),
        ("inline_shakes", Up::InlineShakes { none: 1000, not_running: 3 }),
    ];
    let downs = vec![
        ("reply", Down::Frame { conn: 1, frame: ServerFrame::Reply { id: 3, reply: Reply::Shake(ShakeResult::None) } }),
        (
            "won",
            Down::Frame {
                conn: 1,
                frame: ServerFrame::Reply {
                    id: 3,
                    reply: Reply::Shake(ShakeResult::Won { campaign: 1, packet: 5, amount_fen: 88 }),
                },
            },
        ),
        (
            "close",
            Down::Frame { conn: 2, frame: ServerFrame::Close { code: ErrorCode::Overload, message: "full".into() } },
        ),
        (
            "to_all",
            Down::ToAll(ServerFrame::Push(Push {
                msg: 0,
                body: PushBody::Notice { topic: "all".into(), text: "新年快乐".into() },
            })),
        ),
        (
            "gate",
            Down::Gate(GateView {
                gates: vec![GateState { open: true, ready: false }, GateState { open: true, ready: true }],
                sets: 1,
            }),
        ),
        ("shutdown", Down::Shutdown),
    ];
    let mut out = Vec::new();
    let mut all = Vec::new();
    for (name, msg) in ups {
        let mut bytes = Vec::new();
        encode(&msg, &mut bytes).unwrap();
        all.extend_from_slice(&bytes);
        out.push((format!("up_{name}"), with(up, &bytes)));
    }
    out.push(("up_all_odd_pieces".into(), with([ODD_PIECES[0] << 1, ODD_PIECES[1]], &all)));
    let mut all = Vec::new();
    for (name, msg) in downs {
        let mut bytes = Vec::new();
        encode(&msg, &mut bytes).unwrap();
        all.extend_from_slice(&bytes);
        out.push((format!("down_{name}"), with(down, &bytes)));
    }
    out.push(("down_all_one_byte_stalling".into(), with([1, ONE_BYTE_STALLING[1]], &all)));
    out.push(("oversized".into(), with(up, &(hongbao_link::fuzz::MESSAGE_BYTES_MAX as u32 + 1).to_le_bytes())));
    out.push(("garbage".into(), with(down, &[3, 0, 0, 0, 0xff, 0xff, 0xff])));
    out.push(("cut".into(), with(up, &[9, 0, 0, 0, 1])));
    out
}

fn tokens() -> Vec<(String, Vec<u8>)> {
    let le = |v: u64| v.to_le_bytes();
    let now_s: u64 = 1_700_000_000;
    // Mode 1: a genuine token for (user, ttl, now), then edits (op, at, byte).
    let genuine = |user: u64, ttl: u64, edits: &[[u8; 3]]| {
        let mut out = vec![1];
        out.extend_from_slice(&le(user - 1));
        out.extend_from_slice(&le(ttl));
        out.extend_from_slice(&le(now_s));
        out.extend(edits.iter().flatten());
        out
    };
    // Mode 0: the clock, then a token as sent.
    let raw = |token: &str| [&[0u8][..], &le(now_s), token.as_bytes()].concat();
    let signer = TokenSigner::new(b"the fuzz targets' token secret".to_vec());
    vec![
        ("genuine".into(), genuine(42, 3600, &[])),
        ("genuine_expired".into(), genuine(42, 0, &[])),
        ("edited_signature".into(), genuine(42, 3600, &[[0, 60, b'A']])),
        ("edited_user".into(), genuine(42, 3600, &[[1, 3, b'0']])),
        ("cut_signature".into(), genuine(7, 60, &[[2, 70, 0], [2, 70, 0]])),
        ("raw_genuine".into(), raw(&signer.issue(42, 3600, now_s))),
        ("raw_dev_user".into(), raw("42")),
        ("raw_dev_zero".into(), raw("0")),
        ("raw_malformed".into(), raw("v1.42")),
        ("raw_bad_base64".into(), raw("v1.42.1700000060.not*base64")),
    ]
}

fn admin_bodies() -> Vec<(String, Vec<u8>)> {
    // First byte: the body type, in `Body::ALL` order.
    let bodies: [(&str, u8, &str); 12] = [
        ("money", 0, r#"{"amount_fen": 10000, "key": "dep-42-0001"}"#),
        ("group", 1, r#"{"members": [42, 43, 44]}"#),
        ("members", 2, r#"{"add": [45], "remove": [43]}"#),
        (
            "send",
            3,
            r#"{"sender": 42, "amount_fen": 888, "count": 3, "kind": "lucky", "to": {"group": 9}, "greeting": "恭喜发财", "key": "pkt-42-0001"}"#,
        ),
        (
            "campaign_count",
            4,
            r#"{"funder": 1, "total_fen": 1000000, "rule": {"count": {"packets": 10000}}, "rate_per_s": 200, "win_cap_per_user": 3, "key": "camp-2026"}"#,
        ),
        (
            "campaign_range",
            4,
            r#"{"funder": 1, "total_fen": 1000, "rule": {"range": {"min_fen": 1, "max_fen": 10}}, "rate_per_s": 5, "key": "c"}"#,
        ),
        (
            "push",
            5,
            r#"{"target": {"group": 9}, "persistent": true, "topic": "event", "text": "Shake starts at 20:00"}"#,
        ),
        ("push_users", 5, r#"{"target": {"users": [1, 2]}, "topic": "t", "text": "x"}"#),
        ("broadcast", 6, r#"{"topic": "all", "text": "新年快乐"}"#),
        ("token", 7, r#"{"user": 42, "ttl_s": 3600}"#),
        ("unknown_field", 0, r#"{"amount_fen": 1, "key": "k", "extra": 1}"#),
        ("empty", 7, ""),
    ];
    let mut out: Vec<(String, Vec<u8>)> = bodies
        .iter()
        .map(|(name, which, text)| (name.to_string(), [&[*which][..], text.as_bytes()].concat()))
        .collect();
    // Not UTF-8 inside a field the rule skips: once taken as JSON.
    let not_utf8 = b"{\"funder\": 1, \"total_fen\": 50, \"rule\": {\"range\": {\"min_fen\": 1, \"max_fen\": 9, \"x\": \"\xa3\"}}, \"rate_per_s\": 5, \"key\": \"c\"}";
    out.push(("campaign_not_utf8".into(), [&[4u8][..], &not_utf8[..]].concat()));
    out
}

fn all() -> BTreeMap<&'static str, Vec<(String, Vec<u8>)>> {
    BTreeMap::from([
        ("tcp_frames", tcp_frames()),
        ("ws_frames", ws_frames()),
        ("json_client_frame", json_client_frame()),
        ("link_wire", link_wire()),
        ("tokens", tokens()),
        ("admin_bodies", admin_bodies()),
    ])
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

#[test]
fn seed_corpora_are_what_the_encoders_make() {
    let write = std::env::var("HONGBAO_FUZZ_SEEDS").is_ok_and(|v| v == "write");
    let mut total_bytes = 0;
    for (target, seeds) in all() {
        let dir = corpus_dir().join(target);
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        for (name, bytes) in seeds {
            let path = dir.join(&name);
            total_bytes += bytes.len();
            if write {
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(committed, bytes, "{} is stale: rewrite the seeds (see seeds.rs)", path.display());
            }
        }
    }
    assert!(total_bytes < 1 << 20, "seed corpora stay small: {total_bytes} bytes");
}
