//! `hongbao token`: a client token signed with a data directory's secret,
//! for local testing and for app servers that shell out instead of signing.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use hongbao_admin::TOKEN_TTL_S_MAX;
use hongbao_boundary::{TokenSigner, USER_ID_MAX};

use crate::keys::{self, KeyError};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("{0}")]
    Invalid(String),
}

/// Signs a token for `user` valid for `ttl_s` seconds from now, with
/// `secret` or else the one in `<data>/secret.key`.
pub fn issue(data: &Path, user: u64, ttl_s: u64, secret: Option<String>) -> Result<String, TokenError> {
    // `TokenSigner::issue` asserts on ids no client could use; refuse them
    // here with a message instead.
    if user == 0 || user > USER_ID_MAX {
        return Err(TokenError::Invalid(format!("--user must be between 1 and {USER_ID_MAX}")));
    }
    if ttl_s == 0 || ttl_s > TOKEN_TTL_S_MAX {
        return Err(TokenError::Invalid(format!("--ttl-s must be between 1 and {TOKEN_TTL_S_MAX}")));
    }
    let secret = match secret {
        Some(s) if s.trim().is_empty() => return Err(TokenError::Invalid("--secret must not be empty".into())),
        Some(s) => s,
        None => keys::load(&data.join(keys::SECRET_FILE))?,
    };
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(TokenSigner::new(secret.into_bytes()).issue(user, ttl_s, now_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_the_data_dir_secret() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(issue(tmp.path(), 5, 60, None), Err(TokenError::Keys(KeyError::Missing(_)))));
        let (secret, _) = keys::load_or_create(&tmp.path().join(keys::SECRET_FILE)).unwrap();
        let token = issue(tmp.path(), 5, 60, None).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(TokenSigner::new(secret.into_bytes()).verify(&token, now), Ok(5));
        assert!(matches!(issue(tmp.path(), 0, 60, None), Err(TokenError::Invalid(_))));
        assert!(matches!(issue(tmp.path(), 5, 0, None), Err(TokenError::Invalid(_))));
    }
}
