//! The gateway directory: which gateways of a cluster are alive, in Redis.
//!
//! Each gateway with `redis` in its cluster file keeps one key,
//! `hb:gateway:<id>` (`id`: the TCP address clients dial), set every
//! [`DIRECTORY_REFRESH`] to a JSON [`GatewayEntry`] with a TTL of
//! [`DIRECTORY_TTL_MS`]: a gateway that dies (even by SIGKILL) is gone from
//! the directory within the TTL; one that stops cleanly deletes its key
//! first. The cluster admin lists the keys (`GET /v1/gateways`) for clients
//! looking for a gateway and for operators.
//!
//! The directory is advice, not state: presence and pushes live in the
//! SETs, so a Redis that is away costs only the listing. A gateway keeps
//! serving its clients, says so once per outage, counts
//! `hongbao_directory_errors_total`, and its entry is back within one
//! refresh of Redis' return (the `redis` crate's `ConnectionManager`
//! reconnects by itself; nothing restarts).
//!
//! This module is the one place that knows the key format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Every gateway key starts with this; the rest is the gateway's id.
pub const KEY_PREFIX: &str = "hb:gateway:";
/// How often a gateway writes its entry again.
pub const DIRECTORY_REFRESH: Duration = Duration::from_secs(2);
/// How long an entry lives unless written again: three refreshes, so one
/// slow or lost write does not drop a live gateway.
pub const DIRECTORY_TTL_MS: u64 = 6_000;
/// At most this many entries in one listing (a cluster has far fewer
/// gateways; the bound keeps a polluted keyspace from sizing an answer).
pub const GATEWAYS_LISTED_MAX: usize = 10_000;
/// `SCAN … COUNT` and the keys per `MGET`.
const SCAN_COUNT: usize = 1_000;
/// One directory operation at most, connecting included: a Redis that is
/// away must not hold a refresh or an operator's request for long.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(1_500);
/// The connection manager's own bounds (each within `OPERATION_TIMEOUT`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_RETRIES: usize = 2;
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// One gateway as the directory shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayEntry {
    /// The advertised TCP address (the key is `hb:gateway:<id>`).
    pub id: String,
    /// Where clients dial raw TCP.
    pub tcp: String,
    /// Where clients dial WebSocket.
    pub ws: String,
    pub pid: u32,
    /// Connections open at the last refresh.
    pub connections: u64,
    /// When the gateway started, ms since the Unix epoch.
    pub started_ms: u64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("the redis URL {url:?} is not valid: {message}")]
    Url { url: String, message: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {} ms", OPERATION_TIMEOUT.as_millis())]
    TimedOut,
    #[error("the entry cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The directory's client: cheap to clone, one connection (reconnected as
/// needed) shared by the clones. Made without contacting Redis, so a
/// process starts while Redis is away.
#[derive(Clone)]
pub struct Directory {
    conn: ConnectionManager,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").finish_non_exhaustive()
    }
}

/// The key of gateway `id`.
pub fn key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

impl Directory {
    /// A client of the Redis at `url` (`redis://host:port`). Must be called
    /// inside a tokio runtime.
    pub fn new(url: &str) -> Result<Directory, DirectoryError> {
        let invalid = |e: redis::RedisError| DirectoryError::Url { url: url.to_owned(), message: e.to_string() };
        let client = redis::Client::open(url).map_err(invalid)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_DELAY_MIN)
            .set_max_delay(RECONNECT_DELAY_MAX);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
        Ok(Directory { conn })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, DirectoryError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(OPERATION_TIMEOUT, cmd.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(DirectoryError::TimedOut),
        }
    }

    /// Writes `entry` under its id, to live `ttl_ms` unless written again.
    pub async fn register(&self, entry: &GatewayEntry, ttl_ms: u64) -> Result<(), DirectoryError> {
        let json = serde_json::to_string(entry)?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key(&entry.id)).arg(json).arg("PX").arg(ttl_ms.max(1));
        self.query::<()>(cmd).await
    }

    /// Deletes gateway `id`'s entry (nothing if there is none).
    pub async fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key(id));
        self.query::<i64>(cmd).await.map(drop)
    }

    /// The live gateways, least loaded first (then by id), at most `max`.
    /// An entry that expires between the scan and the read is left out, and
    /// so is one that is not a gateway entry (logged).
    pub async fn list(&self, max: usize) -> Result<Vec<GatewayEntry>, DirectoryError> {
        let pattern = format!("{KEY_PREFIX}*");
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT);
            let (next, batch): (u64, Vec<String>) = self.query(cmd).await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= max {
                break;
            }
        }
        // SCAN may return a key twice.
        keys.sort_unstable();
        keys.dedup();
        keys.truncate(max);
        let mut entries = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(SCAN_COUNT) {
            let mut cmd = redis::cmd("MGET");
            cmd.arg(chunk);
            let values: Vec<Option<String>> = self.query(cmd).await?;
            for (key, value) in chunk.iter().zip(values) {
                let Some(value) = value else { continue };
                match serde_json::from_str::<GatewayEntry>(&value) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => tracing::warn!(key, error = %e, "directory: not a gateway entry; left out"),
                }
            }
        }
        entries.sort_by(|a, b| a.connections.cmp(&b.connections).then_with(|| a.id.cmp(&b.id)));
        Ok(entries)
    }
}

/// How a gateway keeps its entry: every `refresh`, for `ttl_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Refresh {
    pub every: Duration,
    pub ttl_ms: u64,
}

impl Default for Refresh {
    fn default() -> Self {
        Refresh { every: DIRECTORY_REFRESH, ttl_ms: DIRECTORY_TTL_MS }
    }
}

/// A gateway's directory task: writes `entry()` every `refresh.every` until
/// `stop` becomes `true` (or its sender is dropped), then deletes the entry.
/// A failed write is counted (`hongbao_directory_errors_total`) and tried
/// again at the next refresh; an outage is logged once when it starts and
/// once when it ends.
pub async fn keep_registered(
    directory: Directory,
    refresh: Refresh,
    entry: impl Fn() -> GatewayEntry,
    mut stop: watch::Receiver<bool>,
) {
    let errors = metrics::counter!("hongbao_directory_errors_total");
    let mut ticker = tokio::time::interval(refresh.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut away: Option<u64> = None;
    let id = entry().id;
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        }
        match directory.register(&entry(), refresh.ttl_ms).await {
            Ok(()) => {
                if let Some(failures) = away.take() {
                    tracing::info!(id, failures, "directory: registered again; redis is back");
                }
            }
            Err(e) => {
                errors.increment(1);
                match &mut away {
                    Some(failures) => *failures += 1,
                    None => {
                        away = Some(1);
                        tracing::warn!(id, error = %e, "directory: cannot register; still serving clients, retrying every refresh (logged again when redis is back)");
                    }
                }
            }
        }
    }
    match directory.remove(&id).await {
        Ok(()) => tracing::info!(id, "directory: entry removed"),
        Err(e) => {
            errors.increment(1);
            tracing::warn!(id, error = %e, "directory: cannot remove the entry; it expires with its TTL");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use hongbao_harness::{RedisOptions, RedisServer};

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(20);

    fn entry(id: &str, connections: u64) -> GatewayEntry {
        GatewayEntry {
            id: id.to_owned(),
            tcp: id.to_owned(),
            ws: format!("{id}-ws"),
            pid: 7,
            connections,
            started_ms: now_ms(),
        }
    }

    async fn ids(directory: &Directory) -> Vec<String> {
        directory.list(GATEWAYS_LISTED_MAX).await.unwrap().into_iter().map(|e| e.id).collect()
    }

    /// Polls `check` until it is true, for at most `PATIENCE`.
    async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
        let deadline = Instant::now() + PATIENCE;
        while !check().await {
            assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn entries_are_listed_least_loaded_first_and_expire_or_are_removed() {
        let redis = RedisServer::start().unwrap();
        let directory = Directory::new(&redis.url()).unwrap();
        assert!(directory.list(GATEWAYS_LISTED_MAX).await.unwrap().is_empty());
        directory.register(&entry("10.0.0.1:7000", 5), 60_000).await.unwrap();
        directory.register(&entry("10.0.0.2:7000", 1), 60_000).await.unwrap();
        directory.register(&entry("10.0.0.3:7000", 3), 60_000).await.unwrap();
        let listed = directory.list(GATEWAYS_LISTED_MAX).await.unwrap();
        assert_eq!(listed[0], entry("10.0.0.2:7000", 1).with_started(listed[0].started_ms));
        assert_eq!(ids(&directory).await, ["10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.1:7000"]);
        assert_eq!(directory.list(2).await.unwrap().len(), 2, "bounded");
        // Written again: one entry, the new load.
        directory.register(&entry("10.0.0.1:7000", 0), 60_000).await.unwrap();
        assert_eq!(ids(&directory).await, ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]);
        directory.remove("10.0.0.3:7000").await.unwrap();
        directory.remove("10.0.0.3:7000").await.unwrap();
        assert_eq!(ids(&directory).await, ["10.0.0.1:7000", "10.0.0.2:7000"]);
        // A short TTL: gone without a delete.
        directory.register(&entry("10.0.0.4:7000", 0), 300).await.unwrap();
        eventually("the short-lived entry expires", || async {
            !ids(&directory).await.contains(&"10.0.0.4:7000".to_owned())
        })
        .await;
        assert_eq!(ids(&directory).await, ["10.0.0.1:7000", "10.0.0.2:7000"]);
    }

    #[tokio::test]
    async fn a_key_that_is_not_an_entry_is_left_out() {
        let redis = RedisServer::start().unwrap();
        let directory = Directory::new(&redis.url()).unwrap();
        directory.register(&entry("a:1", 0), 60_000).await.unwrap();
        let mut cmd = redis::cmd("SET");
        cmd.arg(key("junk")).arg("not json");
        directory.query::<()>(cmd).await.unwrap();
        assert_eq!(ids(&directory).await, ["a:1"]);
    }

    #[tokio::test]
    async fn the_client_outlives_a_redis_killed_and_restarted() {
        let mut redis = RedisServer::start().unwrap();
        let directory = Directory::new(&redis.url()).unwrap();
        directory.register(&entry("a:1", 0), 60_000).await.unwrap();
        redis.kill9().unwrap();
        assert!(directory.register(&entry("a:1", 0), 60_000).await.is_err());
        assert!(directory.list(GATEWAYS_LISTED_MAX).await.is_err());
        redis.restart().unwrap();
        eventually("register succeeds again on the same client", || async {
            directory.register(&entry("b:2", 0), 60_000).await.is_ok()
        })
        .await;
        // The append-only file kept `a:1`.
        assert_eq!(ids(&directory).await, ["a:1", "b:2"]);
    }

    #[tokio::test]
    async fn a_client_made_while_redis_is_away_works_once_it_is_there() {
        let mut redis = RedisServer::start().unwrap();
        redis.kill9().unwrap();
        let directory = Directory::new(&redis.url()).unwrap();
        assert!(directory.register(&entry("a:1", 0), 60_000).await.is_err());
        redis.restart().unwrap();
        eventually("register succeeds", || async { directory.register(&entry("a:1", 0), 60_000).await.is_ok() }).await;
    }

    #[tokio::test]
    async fn the_task_keeps_the_entry_through_an_outage_and_deletes_it_on_stop() {
        // Nothing persisted: after the restart only the task's refresh can
        // bring the entry back.
        let mut redis = RedisServer::start_with(RedisOptions { appendonly: false }).unwrap();
        let directory = Directory::new(&redis.url()).unwrap();
        let refresh = Refresh { every: Duration::from_millis(100), ttl_ms: 1_000 };
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(keep_registered(directory.clone(), refresh, || entry("g:1", 2), rx));
        let listed = || async { directory.list(GATEWAYS_LISTED_MAX).await.is_ok_and(|e| e.len() == 1) };
        eventually("the task registers", listed).await;
        redis.kill9().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.restart().unwrap();
        eventually("the entry is back after the restart", listed).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(directory.list(GATEWAYS_LISTED_MAX).await.unwrap().is_empty(), "removed on stop");
    }

    impl GatewayEntry {
        fn with_started(mut self, started_ms: u64) -> GatewayEntry {
            self.started_ms = started_ms;
            self
        }
    }
}
