//! Signed user tokens.
//!
//! The app server issues a token per user; the gateway only verifies it. A
//! token is `v1.<user>.<expires_unix_s>.<sig>` where `sig` is the unpadded
//! base64url HMAC-SHA256 of `v1.<user>.<expires_unix_s>` under a shared
//! secret. The signature is compared in constant time (`Mac::verify_slice`),
//! so timing does not leak how much of a forged signature was right.
//!
//! In dev mode a bare decimal user id is also accepted, so local runs and
//! demos need no token issuer. Dev mode must never be on in production: it
//! lets anyone be anyone.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use hongbao_proto::ErrorCode;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Version tag of the only token format so far.
const TOKEN_VERSION: &str = "v1";
/// Largest token accepted, in bytes. A real token is under 80 bytes; the cap
/// keeps a hostile `hello` from making us hash megabytes.
pub const TOKEN_BYTES_MAX: usize = 256;
/// Largest user id: ids must survive a round trip through a JavaScript
/// number (2^53 - 1) because web clients speak JSON.
pub const USER_ID_MAX: u64 = (1 << 53) - 1;
/// Bytes of an HMAC-SHA256 tag.
const SIG_BYTES: usize = 32;

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not shaped like a token (or, in dev mode, like a user id).
    #[error("malformed token")]
    Malformed,
    /// Shaped right, but not signed with our secret.
    #[error("bad token signature")]
    BadSignature,
    /// Genuine but past its expiry.
    #[error("token expired")]
    Expired,
}

impl AuthError {
    /// The error code a client sees when its `hello` is refused.
    pub fn code(self) -> ErrorCode {
        match self {
            AuthError::Malformed | AuthError::BadSignature => ErrorCode::BadToken,
            AuthError::Expired => ErrorCode::TokenExpired,
        }
    }
}

/// Issues and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct TokenSigner {
    /// The HMAC key shared with the app server that issues tokens.
    secret: Vec<u8>,
}

// The secret must never reach a log line.
impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").field("secret", &format_args!("<{} bytes>", self.secret.len())).finish()
    }
}

impl TokenSigner {
    pub fn new(secret: impl Into<Vec<u8>>) -> TokenSigner {
        TokenSigner { secret: secret.into() }
    }

    /// Length of the secret in bytes (the gateway refuses short secrets
    /// outside dev mode).
    pub fn secret_len(&self) -> usize {
        self.secret.len()
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `user` valid until `now_s + ttl_s` (unix seconds).
    ///
    /// Panics if `user` is outside `1..=USER_ID_MAX`: issuing a token for an
    /// id no client can use is a bug in the caller.
    pub fn issue(&self, user: u64, ttl_s: u64, now_s: u64) -> String {
        assert!((1..=USER_ID_MAX).contains(&user), "user id {user} out of range");
        let expires_s = now_s.saturating_add(ttl_s);
        let payload = format!("{TOKEN_VERSION}.{user}.{expires_s}");
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// Checks a signed token and returns its user. The signature is checked
    /// before the expiry, so `Expired` is only ever said of a genuine token.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<u64, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::Malformed);
        }
        let (payload, sig_text) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
        let mut parts = payload.split('.');
        let (Some(version), Some(user), Some(expires), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        if version != TOKEN_VERSION {
            return Err(AuthError::Malformed);
        }
        let user = parse_user(user)?;
        let expires_s = parse_decimal(expires).ok_or(AuthError::Malformed)?;
        let sig = URL_SAFE_NO_PAD.decode(sig_text).map_err(|_| AuthError::Malformed)?;
        if sig.len() != SIG_BYTES {
            return Err(AuthError::Malformed);
        }
        self.mac(payload).verify_slice(&sig).map_err(|_| AuthError::BadSignature)?;
        if now_s >= expires_s {
            return Err(AuthError::Expired);
        }
        Ok(user)
    }

    /// What the gateway calls on `hello`: `verify`, plus (only when `dev`)
    /// a bare decimal user id.
    pub fn authenticate(&self, token: &str, now_s: u64, dev: bool) -> Result<u64, AuthError> {
        if dev && !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            return parse_user(token);
        }
        self.verify(token, now_s)
    }
}

/// True if `given` equals the secret `expected`, in a time that tells an
/// attacker neither how many leading bytes of a guess were right nor the
/// secret's length: both are hashed (SHA-256, whose time depends on the
/// length only), and the digests compared in constant time (`subtle`,
/// through `digest::CtOutput`). For every key a peer presents: the link key
/// here, the admin API key.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    use hmac::digest::{CtOutput, Digest};
    CtOutput::<Sha256>::new(Sha256::digest(given)) == CtOutput::<Sha256>::new(Sha256::digest(expected))
}

/// Plain ASCII digits only: `u64::from_str` would also take a leading `+`,
/// which no issuer writes.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_user(s: &str) -> Result<u64, AuthError> {
    match parse_decimal(s) {
        Some(user) if (1..=USER_ID_MAX).contains(&user) => Ok(user),
        _ => Err(AuthError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_S: u64 = 1_700_000_000;

    fn signer() -> TokenSigner {
        TokenSigner::new("a test secret of reasonable length")
    }

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"the link key", b"the link key"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"the link key", b"the link kez"));
        assert!(!constant_time_eq(b"xhe link key", b"the link key"));
        assert!(!constant_time_eq(b"the link key", b"the link key "));
        assert!(!constant_time_eq(b"", b"k"));
    }

    #[test]
    fn round_trip() {
        let s = signer();
        let token = s.issue(42, 3600, NOW_S);
        assert!(token.starts_with("v1.42.1700003600."), "{token}");
        assert_eq!(s.verify(&token, NOW_S), Ok(42));
        assert_eq!(s.verify(&token, NOW_S + 3599), Ok(42));
        assert!(s.issue(USER_ID_MAX, 1, NOW_S).len() <= TOKEN_BYTES_MAX);
        assert_eq!(s.verify(&s.issue(USER_ID_MAX, 1, NOW_S), NOW_S), Ok(USER_ID_MAX));
    }

    #[test]
    fn tampered_signature_is_refused() {
        let s = signer();
        let token = s.issue(42, 3600, NOW_S);
        // Flip one character of the signature.
        let mut bytes = token.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(bytes).unwrap();
        assert_eq!(s.verify(&forged, NOW_S), Err(AuthError::BadSignature));
        // Same signature, another user or a later expiry.
        let sig = token.rsplit_once('.').unwrap().1;
        assert_eq!(s.verify(&format!("v1.43.1700003600.{sig}"), NOW_S), Err(AuthError::BadSignature));
        assert_eq!(s.verify(&format!("v1.42.1800003600.{sig}"), NOW_S), Err(AuthError::BadSignature));
    }

    #[test]
    fn wrong_secret_is_refused() {
        let token = TokenSigner::new("another secret entirely!").issue(42, 3600, NOW_S);
        assert_eq!(signer().verify(&token, NOW_S), Err(AuthError::BadSignature));
    }

    #[test]
    fn expired_token_is_refused() {
        let s = signer();
        let token = s.issue(42, 60, NOW_S);
        assert_eq!(s.verify(&token, NOW_S + 60), Err(AuthError::Expired));
        assert_eq!(AuthError::Expired.code(), ErrorCode::TokenExpired);
        // A forged token is a bad token even when it is also expired.
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert_ne!(s.verify(&forged, NOW_S + 60), Err(AuthError::Expired));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let s = signer();
        let good = s.issue(42, 60, NOW_S);
        let sig = good.rsplit_once('.').unwrap().1;
        for bad in [
            "".to_string(),
            "42".to_string(),
            "v1.42".to_string(),
            format!("v2.42.1700000060.{sig}"),
            format!("v1.+42.1700000060.{sig}"),
            format!("v1.0.1700000060.{sig}"),
            format!("v1.{}.1700000060.{sig}", USER_ID_MAX + 1),
            format!("v1.42.1700000060.{sig}.extra"),
            "v1.42.1700000060.not*base64".to_string(),
            "v1.42.1700000060.c2hvcnQ".to_string(),
            "9".repeat(TOKEN_BYTES_MAX + 1),
        ] {
            assert_eq!(s.verify(&bad, NOW_S), Err(AuthError::Malformed), "{bad}");
            assert_eq!(AuthError::Malformed.code(), ErrorCode::BadToken);
        }
    }

    #[test]
    fn bare_user_id_is_accepted_only_in_dev_mode() {
        let s = signer();
        assert_eq!(s.authenticate("42", NOW_S, true), Ok(42));
        assert_eq!(s.authenticate("42", NOW_S, false), Err(AuthError::Malformed));
        assert_eq!(s.authenticate("0", NOW_S, true), Err(AuthError::Malformed));
        assert_eq!(s.authenticate(&(USER_ID_MAX + 1).to_string(), NOW_S, true), Err(AuthError::Malformed));
        assert_eq!(s.authenticate("99999999999999999999999", NOW_S, true), Err(AuthError::Malformed));
        // Signed tokens still work in dev mode.
        assert_eq!(s.authenticate(&s.issue(7, 60, NOW_S), NOW_S, true), Ok(7));
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let text = format!("{:?}", signer());
        assert!(!text.contains("secret of"), "{text}");
    }
}
