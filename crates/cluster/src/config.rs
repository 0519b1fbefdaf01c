//! `cluster.toml`: one file, read by every process of a cluster.
//!
//! ```toml
//! # Relative paths are relative to this file's directory.
//! secrets = "secrets"          # link.key, secret.key, admin.key (`hongbao keys`)
//! nats = "nats://10.0.0.31:4222"   # JetStream: money and notices between SETs
//! admin = "10.0.0.10:7080"     # optional: where `hongbao cluster-admin` listens
//!                              # (its --addr wins; default 127.0.0.1:7080)
//! redis = "redis://10.0.0.32:6379" # optional: the gateway directory (which
//!                              # gateways are alive; GET /v1/gateways)
//!
//! [[set]]                      # SET 0
//! link = "10.0.0.11:7101"      # where gateways dial this SET
//! admin = "10.0.0.11:7180"     # its admin API
//! store = "postgres://hongbao@10.0.0.21/set0"
//! shards = 4
//!
//! [[set]]                      # SET 1
//! link = "10.0.0.12:7101"
//! link_bind = "0.0.0.0:7101"   # what the SET binds, if not `link`
//! admin = "10.0.0.12:7180"
//! store = "/var/lib/hongbao/set1"   # a directory: SQLite
//! ```
//!
//! The number of SETs decides who owns what (`user % sets`, and the SET in
//! every packet id), so it is fixed for the life of the data: the file is
//! checked for a SET count in range and for addresses used twice.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hongbao_core::sets::{SetId, SetMap, SETS_MAX};
use serde::Deserialize;

/// The shared secrets' file names inside `secrets`.
pub const LINK_KEY_FILE: &str = "link.key";
pub const TOKEN_SECRET_FILE: &str = "secret.key";
pub const ADMIN_KEY_FILE: &str = "admin.key";

#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    secrets: PathBuf,
    nats: Option<String>,
    #[serde(default)]
    dev: bool,
    admin: Option<SocketAddr>,
    redis: Option<String>,
    #[serde(default, rename = "set")]
    sets: Vec<RawSet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    link: String,
    link_bind: Option<SocketAddr>,
    admin: SocketAddr,
    store: String,
    shards: Option<u16>,
}

/// One SET as the file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetEntry {
    pub set: SetId,
    /// `host:port` gateways dial.
    pub link: String,
    /// What the SET binds for links.
    pub link_bind: SocketAddr,
    pub admin: SocketAddr,
    /// A `postgres://` URL, or the SQLite data directory (made absolute).
    pub store: String,
    pub shards: u16,
}

/// The cluster file, checked.
#[derive(Clone, Debug)]
pub struct ClusterFile {
    pub path: PathBuf,
    pub sets: Vec<SetEntry>,
    /// The directory of the shared secrets (absolute).
    pub secrets: PathBuf,
    /// Dev mode everywhere: bare user ids as tokens, an open admin API.
    pub dev: bool,
    /// The NATS server(s) carrying cross-SET messages; required with more
    /// than one SET.
    pub nats: Option<String>,
    /// Where the cluster admin (`hongbao cluster-admin`) listens, if the
    /// file says.
    pub admin: Option<SocketAddr>,
    /// The Redis of the gateway directory (`redis://host:port`), if the
    /// cluster has one (`crate::directory`).
    pub redis: Option<String>,
}

/// Shards of a SET when the file does not say.
pub const SHARDS_DEFAULT: u16 = 4;

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile, ClusterConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ClusterConfigError::Read { path: path.to_owned(), source })?;
        ClusterFile::parse(path, &text)
    }

    /// `path` names the file in errors and anchors its relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<ClusterFile, ClusterConfigError> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|source| ClusterConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?;
        let invalid = |message: String| ClusterConfigError::Invalid { path: path.to_owned(), message };
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        if raw.sets.is_empty() || raw.sets.len() > usize::from(SETS_MAX) {
            return Err(invalid(format!(
                "a cluster has 1 to {SETS_MAX} [[set]] entries; this one has {}",
                raw.sets.len()
            )));
        }
        let mut sets = Vec::with_capacity(raw.sets.len());
        for (i, s) in raw.sets.into_iter().enumerate() {
            let set = i as SetId;
            let link_bind = match s.link_bind {
                Some(bind) => bind,
                None => s.link.parse().map_err(|_| {
                    invalid(format!("SET {set}: link {:?} is not an ip:port; give link_bind too", s.link))
                })?,
            };
            let shards = s.shards.unwrap_or(SHARDS_DEFAULT);
            if shards == 0 || usize::from(shards) > hongbao_core::limits::SHARDS_MAX {
                return Err(invalid(format!("SET {set}: shards must be 1 to {}", hongbao_core::limits::SHARDS_MAX)));
            }
            let store = if s.store.starts_with("postgres://") || s.store.starts_with("postgresql://") {
                s.store
            } else {
                base.join(&s.store).display().to_string()
            };
            sets.push(SetEntry { set, link: s.link, link_bind, admin: s.admin, store, shards });
        }
        for (i, a) in sets.iter().enumerate() {
            for b in &sets[i + 1..] {
                if a.link == b.link || a.admin == b.admin || a.store == b.store {
                    return Err(invalid(format!("SETs {} and {} share a link, admin address or store", a.set, b.set)));
                }
            }
        }
        if sets.len() > 1 && raw.nats.is_none() {
            return Err(invalid(format!(
                "a cluster of {} SETs needs `nats = \"nats://host:port\"`: opens and notices across SETs travel there",
                sets.len()
            )));
        }
        if let Some(admin) = raw.admin {
            if let Some(s) = sets.iter().find(|s| s.admin == admin || s.link_bind == admin) {
                return Err(invalid(format!("the cluster admin's address {admin} is SET {}'s too", s.set)));
            }
        }
        if let Some(url) = &raw.redis {
            if !url.starts_with("redis://") {
                return Err(invalid(format!("redis {url:?} is not a redis://host:port URL")));
            }
        }
        Ok(ClusterFile {
            path: path.to_owned(),
            sets,
            secrets: base.join(raw.secrets),
            dev: raw.dev,
            admin: raw.admin,
            nats: raw.nats,
            redis: raw.redis,
        })
    }

    /// How many SETs (1 to `SETS_MAX`).
    pub fn set_count(&self) -> u8 {
        self.sets.len() as u8
    }

    /// SET `set`'s entry and its place in the cluster.
    pub fn set(&self, set: SetId) -> Result<(&SetEntry, SetMap), ClusterConfigError> {
        let entry = self.sets.get(usize::from(set)).ok_or_else(|| ClusterConfigError::Invalid {
            path: self.path.clone(),
            message: format!("there is no SET {set}: the file has {}", self.sets.len()),
        })?;
        let map = SetMap::new(set, self.set_count())
            .map_err(|e| ClusterConfigError::Invalid { path: self.path.clone(), message: e.to_string() })?;
        Ok((entry, map))
    }

    pub fn secret_path(&self, file: &str) -> PathBuf {
        self.secrets.join(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
        secrets = "keys"
        nats = "nats://127.0.0.1:4222"
        [[set]]
        link = "127.0.0.1:7101"
        admin = "127.0.0.1:7180"
        store = "postgres://h@127.0.0.1/set0"
        [[set]]
        link = "set1.internal:7101"
        link_bind = "0.0.0.0:7101"
        admin = "127.0.0.1:7181"
        store = "data/set1"
        shards = 8
    "#;

    #[test]
    fn a_two_set_file_reads_with_its_paths_anchored_at_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        let file = ClusterFile::parse(&path, TWO).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(file.set_count(), 2);
        assert_eq!(file.secrets, root.join("keys"));
        assert_eq!(file.sets[0].shards, SHARDS_DEFAULT);
        assert_eq!(file.sets[0].link_bind, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(file.sets[1].store, root.join("data/set1").display().to_string());
        assert_eq!(file.sets[1].link_bind, "0.0.0.0:7101".parse().unwrap());
        let (entry, map) = file.set(1).unwrap();
        assert_eq!((entry.shards, map.set(), map.sets()), (8, 1, 2));
        assert!(file.set(2).is_err());
        assert_eq!(file.admin, None);
        assert_eq!(file.redis, None);
        let with_redis = format!("redis = \"redis://127.0.0.1:6379\"\n{TWO}");
        assert_eq!(ClusterFile::parse(&path, &with_redis).unwrap().redis.as_deref(), Some("redis://127.0.0.1:6379"));
        let with_admin = format!("admin = \"127.0.0.1:7080\"\n{TWO}");
        assert_eq!(ClusterFile::parse(&path, &with_admin).unwrap().admin, Some("127.0.0.1:7080".parse().unwrap()));
    }

    #[test]
    fn mistakes_are_named() {
        let path = Path::new("c.toml");
        let err = |text: &str| ClusterFile::parse(path, text).unwrap_err().to_string();
        assert!(err("secrets = \"k\"").contains("1 to 32 [[set]]"));
        assert!(err(&TWO.replace("set1.internal:7101", "127.0.0.1:7101")).contains("share"));
        assert!(err(&TWO.replace("link_bind = \"0.0.0.0:7101\"", "")).contains("give link_bind"));
        assert!(err(&TWO.replace("shards = 8", "shards = 0")).contains("shards must be"));
        assert!(err(&format!("{TWO}\nredos = \"x\"")).contains("unknown field"));
        assert!(err(&format!("redis = \"http://x\"\n{TWO}")).contains("not a redis://"));
        assert!(err(&TWO.replace("nats = \"nats://127.0.0.1:4222\"", "")).contains("needs `nats"));
        assert!(err(&format!("admin = \"127.0.0.1:7180\"\n{TWO}")).contains("is SET 0's too"));
        assert!(err(&format!("admin = \"nowhere\"\n{TWO}")).contains("admin"));
    }
}
