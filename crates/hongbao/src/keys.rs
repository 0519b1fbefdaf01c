//! Secrets kept in the data directory: the token signing secret
//! (`secret.key`) and the admin API key (`admin.key`).
//!
//! Zero-config runs need both without the operator inventing them, and a
//! restart must keep them (or every issued token and every operator script
//! breaks), so the first start generates them from the OS random source and
//! later starts read them back. The file holds the key as text (64 hex
//! digits for a generated one); its bytes, trimmed, are the key, so an app
//! server can read the same file or be handed the same string.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::TryRngCore;

/// File name of the token signing secret inside the data directory.
pub const SECRET_FILE: &str = "secret.key";
/// File name of the admin API key inside the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Random bytes in a generated key (shown as twice as many hex digits).
const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("no {0}: start `hongbao serve` once with this data directory, or pass --secret")]
    Missing(PathBuf),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// Reads the key at `path`; `Missing` if there is none.
pub fn load(path: &Path) -> Result<String, KeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::Missing(path.to_owned())),
        Err(e) => return Err(io(path)(e)),
    };
    let key = text.trim();
    if key.is_empty() {
        return Err(KeyError::Empty(path.to_owned()));
    }
    warn_if_readable_by_others(path);
    Ok(key.to_owned())
}

/// Reads the key at `path`, or generates one and stores it there (mode 0600)
/// if there is none yet. Returns the key and whether it was just created.
pub fn load_or_create(path: &Path) -> Result<(String, bool), KeyError> {
    match load(path) {
        Ok(key) => return Ok((key, false)),
        Err(KeyError::Missing(_)) => {}
        Err(e) => return Err(e),
    }
    let key = random_key()?;
    write_private(path, &key)?;
    Ok((key, true))
}

/// A fresh key from the OS random source, as hex.
pub fn random_key() -> Result<String, KeyError> {
    let mut bytes = [0u8; KEY_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes to a temporary file created with mode 0600, syncs it, then
/// renames it into place: a crash leaves either no key or a whole one, never
/// half a key that a restart would then trust.
fn write_private(path: &Path, key: &str) -> Result<(), KeyError> {
    let tmp = path.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(format!("{key}\n").as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable. Best effort: not every platform
        // lets a directory be opened and synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "key file is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SECRET_FILE);
        assert!(matches!(load(&path), Err(KeyError::Missing(_))));
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(first.len(), 2 * KEY_BYTES);
        let (again, created) = load_or_create(&path).unwrap();
        assert_eq!((again.as_str(), created), (first.as_str(), false));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(load_or_create(&path), Err(KeyError::Empty(_))));
    }
}
