//! Client tokens (crates/boundary/src/token.rs): `TokenSigner::verify` and
//! `authenticate`, which the gateway runs on every `hello`.
//!
//! Input: a mode byte, then either a token as the peer sent it, or a genuine
//! token (user, lifetime and clock from the input) with edits from the
//! input applied: bytes replaced, inserted or cut, so the fuzzer works near
//! valid signatures instead of guessing HMACs. Checked:
//! - `verify` accepts a token only if `issue` makes exactly that text for
//!   the user and expiry it names, before the expiry; `Expired` likewise
//!   only for a genuine token; an untouched genuine token is accepted;
//! - another secret's genuine token is refused as a bad signature;
//! - `authenticate` without dev mode is `verify`; with it, it also takes a
//!   bare decimal user id in range, and nothing else;
//! - nothing longer than `TOKEN_BYTES_MAX` is accepted.
#![no_main]

use hongbao_boundary::{AuthError, TokenSigner, TOKEN_BYTES_MAX, USER_ID_MAX};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"the fuzz targets' token secret";
const OTHER_SECRET: &[u8] = b"some other server's token secret";

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    for (i, b) in data.iter().skip(at).take(8).enumerate() {
        bytes[i] = *b;
    }
    u64::from_le_bytes(bytes)
}

/// The user and expiry a `v1.<user>.<expires>.<sig>` token names.
fn named(token: &str) -> Option<(u64, u64)> {
    let mut parts = token.split('.');
    let (_, user, expires) = (parts.next()?, parts.next()?, parts.next()?);
    Some((user.parse().ok()?, expires.parse().ok()?))
}

fn check(signer: &TokenSigner, token: &str, now_s: u64) {
    let verified = signer.verify(token, now_s);
    match verified {
        Ok(user) => {
            let (named_user, expires_s) = named(token).expect("an accepted token names a user and expiry");
            assert_eq!(user, named_user);
            assert_eq!(token, signer.issue(user, expires_s, 0), "accepted a token issue did not make");
            assert!(now_s < expires_s, "accepted after its expiry");
        }
        Err(AuthError::Expired) => {
            let (user, expires_s) = named(token).expect("an expired token names a user and expiry");
            assert_eq!(token, signer.issue(user, expires_s, 0), "called a forged token expired");
            assert!(now_s >= expires_s);
        }
        Err(_) => {}
    }
    if token.len() > TOKEN_BYTES_MAX {
        assert_eq!(verified, Err(AuthError::Malformed));
    }
    assert_eq!(signer.authenticate(token, now_s, false), verified);
    let dev = signer.authenticate(token, now_s, true);
    if dev != verified {
        // Only a bare user id: ASCII digits naming a user in range.
        assert!(!token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()), "dev mode took {token:?}");
        let user: u64 = token.parse().expect("digits in range parse");
        assert!((1..=USER_ID_MAX).contains(&user));
        assert_eq!(dev, Ok(user));
    }
}

fuzz_target!(|data: &[u8]| {
    let signer = TokenSigner::new(SECRET);
    let [mode, rest @ ..] = data else { return };
    if mode & 1 == 0 {
        // A token as the peer sent it.
        let now_s = u64_at(rest, 0) >> (mode >> 2);
        let Ok(token) = std::str::from_utf8(rest.get(8..).unwrap_or_default()) else { return };
        check(&signer, token, now_s);
        return;
    }
    // A genuine token, then edits.
    let user = 1 + u64_at(rest, 0) % USER_ID_MAX;
    let ttl_s = u64_at(rest, 8) >> (mode >> 2);
    let now_s = u64_at(rest, 16) >> (mode >> 4);
    let genuine = signer.issue(user, ttl_s, now_s);
    let expected = if now_s.saturating_add(ttl_s) > now_s { Ok(user) } else { Err(AuthError::Expired) };
    assert_eq!(signer.verify(&genuine, now_s), expected, "{genuine}");
    let forged = TokenSigner::new(OTHER_SECRET).issue(user, ttl_s, now_s);
    assert_eq!(signer.verify(&forged, now_s), Err(AuthError::BadSignature), "{forged}");

    let mut token = genuine.into_bytes();
    for edit in rest.get(24..).unwrap_or_default().chunks_exact(3) {
        let (op, at, byte) = (edit[0], usize::from(edit[1]), edit[2]);
        match op % 3 {
            0 if at < token.len() => token[at] = byte,
            1 if at <= token.len() => token.insert(at, byte),
            2 if at < token.len() => {
                token.remove(at);
            }
            _ => {}
        }
    }
    let Ok(token) = String::from_utf8(token) else { return };
    check(&signer, &token, now_s);
});
