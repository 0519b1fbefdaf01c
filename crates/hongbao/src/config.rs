//! `serve` settings: command-line flags, `HONGBAO_*` environment variables,
//! an optional TOML file, and defaults, merged in that order of precedence.
//!
//! Flags and environment are parsed by clap (each flag names its variable)
//! into `Option`s, so "not given" is distinguishable from "given the default"
//! and a TOML value is only used when neither flag nor variable was set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::builder::BoolishValueParser;
use hongbao_core::limits::{PacketRules, SHARDS_MAX};
use hongbao_shard::StoreLocation;
use hongbao_watch::AlertConfig;

/// Most gateway processes one server starts: each is a process with its
/// own runtime (a few MiB), and a million connections at the default 18,000
/// per process take 56 (`bench/run.sh million`).
pub const GATEWAYS_MAX: usize = 64;
use hongbao_gateway as gw;
use serde::Deserialize;

pub const DATA_DEFAULT: &str = "./data";
pub const TCP_DEFAULT: &str = "127.0.0.1:7070";
pub const WS_DEFAULT: &str = "127.0.0.1:7071";
pub const ADMIN_DEFAULT: &str = "127.0.0.1:7080";
pub const SHARDS_DEFAULT: u16 = 4;

/// Flags of `hongbao serve`. Every one can also come from the environment
/// variable named beside it, or from the `--config` file.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Data directory (database, secret.key, admin.key) [default: ./data]
    #[arg(long, env = "HONGBAO_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Store of record: a postgres:// URL (several hosts and
    /// target_session_attrs=read-write are understood) [default: SQLite in
    /// the data directory]
    #[arg(long, env = "HONGBAO_STORE", value_name = "URL", hide_env_values = true)]
    pub store: Option<String>,
    /// Dev mode: bare user ids are accepted as tokens and the admin API is open.
    /// Never in production.
    #[arg(long, env = "HONGBAO_DEV", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new(), value_name = "BOOL")]
    pub dev: Option<bool>,
    /// Raw TCP (binary frames) listen address [default: 127.0.0.1:7070]
    #[arg(long, env = "HONGBAO_TCP", value_name = "ADDR")]
    pub tcp: Option<SocketAddr>,
    /// WebSocket listen address [default: 127.0.0.1:7071]
    #[arg(long, env = "HONGBAO_WS", value_name = "ADDR")]
    pub ws: Option<SocketAddr>,
    /// Admin HTTP API listen address [default: 127.0.0.1:7080]
    #[arg(long, env = "HONGBAO_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Number of shards; fixed for the life of a data directory [default: 4]
    #[arg(long, env = "HONGBAO_SHARDS", value_name = "N")]
    pub shards: Option<u16>,
    /// TOML config file (see hongbao.example.toml)
    #[arg(long, env = "HONGBAO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Token signing secret shared with the app server [default: generated
    /// once and kept in <data>/secret.key]
    #[arg(long, env = "HONGBAO_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Admin API key [default: generated once and kept in <data>/admin.key;
    /// none in dev mode]
    #[arg(long, env = "HONGBAO_ADMIN_KEY", value_name = "KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Seconds between client heartbeats, announced to clients [default: 30]
    #[arg(long, env = "HONGBAO_HEARTBEAT_S", value_name = "S")]
    pub heartbeat_s: Option<u32>,
    /// Seconds without a frame before a connection is closed [default: 90]
    #[arg(long, env = "HONGBAO_IDLE_TIMEOUT_S", value_name = "S")]
    pub idle_timeout_s: Option<u32>,
    /// Seconds a new connection has to send hello [default: 10]
    #[arg(long, env = "HONGBAO_HELLO_TIMEOUT_S", value_name = "S")]
    pub hello_timeout_s: Option<u32>,
    /// Seconds with nothing but heartbeats after which a connection parks
    /// (gives up its task until the client, a push or a deadline wakes it;
    /// less memory per idle connection); 0: never [default: 30]
    #[arg(long, env = "HONGBAO_PARK_AFTER_S", value_name = "S")]
    pub park_after_s: Option<u32>,
    /// Client connections held at once by each gateway process [default: 18000]
    #[arg(long, env = "HONGBAO_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Admin API connections held at once; more are closed as soon as they
    /// are accepted [default: 64]
    #[arg(long, env = "HONGBAO_ADMIN_CONNECTIONS_MAX", value_name = "N")]
    pub admin_connections_max: Option<usize>,
    /// Of those, connections that have not completed hello yet; more are
    /// refused (overload) [default: max-connections / 4, at least 1024]
    #[arg(long, env = "HONGBAO_MAX_PENDING_HELLO", value_name = "N")]
    pub max_pending_hello: Option<usize>,
    /// Connections without hello from one source address (IPv6: one /64);
    /// behind a proxy, set it to max-pending-hello [default:
    /// max-pending-hello / 2, at least 256]
    #[arg(long, env = "HONGBAO_MAX_PENDING_HELLO_PER_IP", value_name = "N")]
    pub max_pending_hello_per_ip: Option<usize>,
    /// Gateway processes sharing the client ports (SO_REUSEPORT): this one
    /// and N-1 children linked to it over a Unix socket. One process may hold
    /// at most ~20,000 files here, so N × max-connections is the server's
    /// connection capacity [default: 1]
    #[arg(long, env = "HONGBAO_GATEWAYS", value_name = "N")]
    pub gateways: Option<u16>,
    /// Seconds until an unopened packet remainder is refunded [default: 86400]
    #[arg(long, env = "HONGBAO_PACKET_EXPIRY_S", value_name = "S")]
    pub packet_expiry_s: Option<u64>,
    /// Largest total of one group packet, fen [default: 20000]
    #[arg(long, env = "HONGBAO_PACKET_AMOUNT_MAX_FEN", value_name = "FEN")]
    pub packet_amount_max_fen: Option<i64>,
    /// Largest number of shares in one group packet [default: 100]
    #[arg(long, env = "HONGBAO_PACKET_COUNT_MAX", value_name = "N")]
    pub packet_count_max: Option<u32>,
    /// Group packets one user may send per second on average; 0: no limit
    /// [default: 10]
    #[arg(long, env = "HONGBAO_SENDS_PER_S", value_name = "N")]
    pub sends_per_s: Option<u32>,
    /// Group packets one user may send at once before the rate applies
    /// [default: 20]
    #[arg(long, env = "HONGBAO_SEND_BURST", value_name = "N")]
    pub send_burst: Option<u32>,
    /// Alerts: seconds of a signal learned before it is judged [default: 120]
    #[arg(long, env = "HONGBAO_ALERT_WARMUP_S", value_name = "S")]
    pub alert_warmup_s: Option<u32>,
    /// Alerts: consecutive seconds out of band before an alert fires
    /// [default: 10]
    #[arg(long, env = "HONGBAO_ALERT_FIRE_AFTER_S", value_name = "S")]
    pub alert_fire_after_s: Option<u32>,
    /// Alerts: consecutive seconds in band before a firing alert clears
    /// [default: 30]
    #[arg(long, env = "HONGBAO_ALERT_CLEAR_AFTER_S", value_name = "S")]
    pub alert_clear_after_s: Option<u32>,
    /// Alerts: width of the band in (floored) standard deviations
    /// [default: 3]
    #[arg(long, env = "HONGBAO_ALERT_SIGMAS", value_name = "K")]
    pub alert_sigmas: Option<f64>,
    /// Alerts: longest a firing alert freezes its baseline before the new
    /// level is accepted, seconds [default: 600]
    #[arg(long, env = "HONGBAO_ALERT_RELEARN_AFTER_S", value_name = "S")]
    pub alert_relearn_after_s: Option<u32>,
    /// Alerts: requests per second below which success ratio and p99 are
    /// not judged [default: 10]
    #[arg(long, env = "HONGBAO_ALERT_MIN_RATE_PER_S", value_name = "N")]
    pub alert_min_rate_per_s: Option<f64>,
}

/// The `--config` TOML file. Every field is optional and named like its flag
/// (with `_` for `-`); unknown fields are an error, so a typo is reported
/// instead of silently ignored. See `hongbao.example.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data directory; relative paths are relative to the working directory.
    pub data: Option<PathBuf>,
    /// Store of record: a `postgres://` URL; without it, SQLite in `data`.
    pub store: Option<String>,
    /// Dev mode (bare user ids as tokens, open admin API).
    pub dev: Option<bool>,
    /// Raw TCP listen address.
    pub tcp: Option<SocketAddr>,
    /// WebSocket listen address.
    pub ws: Option<SocketAddr>,
    /// Admin API listen address.
    pub admin: Option<SocketAddr>,
    /// Number of shards.
    pub shards: Option<u16>,
    /// Token signing secret. Prefer the generated `<data>/secret.key` or the
    /// `HONGBAO_SECRET` variable to writing it into a file others may read.
    pub secret: Option<String>,
    /// Admin API key (same caution as `secret`).
    pub admin_key: Option<String>,
    pub heartbeat_s: Option<u32>,
    pub idle_timeout_s: Option<u32>,
    pub hello_timeout_s: Option<u32>,
    pub park_after_s: Option<u32>,
    pub max_connections: Option<usize>,
    pub admin_connections_max: Option<usize>,
    pub max_pending_hello: Option<usize>,
    pub max_pending_hello_per_ip: Option<usize>,
    pub gateways: Option<u16>,
    pub packet_expiry_s: Option<u64>,
    pub packet_amount_max_fen: Option<i64>,
    pub packet_count_max: Option<u32>,
    pub sends_per_s: Option<u32>,
    pub send_burst: Option<u32>,
    pub alert_warmup_s: Option<u32>,
    pub alert_fire_after_s: Option<u32>,
    pub alert_clear_after_s: Option<u32>,
    pub alert_sigmas: Option<f64>,
    pub alert_relearn_after_s: Option<u32>,
    pub alert_min_rate_per_s: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// Fully resolved `serve` settings. Secrets may still be `None` here: they
/// are loaded or generated from the data directory by `serve`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub data: PathBuf,
    /// Where money is stored: SQLite in `data`, or a PostgreSQL database.
    pub store: StoreLocation,
    pub dev: bool,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub shards: u16,
    pub secret: Option<String>,
    pub admin_key: Option<String>,
    pub heartbeat_s: u32,
    pub idle_timeout_s: u32,
    pub hello_timeout_s: u32,
    pub park_after_s: u32,
    pub max_connections: usize,
    pub admin_connections_max: usize,
    pub max_pending_hello: usize,
    pub max_pending_hello_per_ip: usize,
    pub gateways: u16,
    pub packet_rules: PacketRules,
    /// The live alert detector's parameters (`hongbao_watch::AlertConfig`).
    pub alerts: AlertConfig,
    /// Set by `hongbao set`: this process is one SET of a cluster, with no
    /// client listeners; gateways link to it over TCP.
    pub set_role: Option<SetRole>,
}

/// What makes a server one SET of a cluster (`hongbao set`).
#[derive(Clone, Debug)]
pub struct SetRole {
    pub map: hongbao_core::sets::SetMap,
    /// Where gateways' links are accepted.
    pub link_bind: SocketAddr,
    /// The key every gateway of the cluster presents.
    pub link_key: String,
    /// NATS, for messages to and from the other SETs (none: a cluster of one).
    pub nats: Option<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("default addresses are valid")
}

impl Settings {
    /// Merges flags/environment over the config file (if any) over defaults.
    pub fn resolve(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        Settings::merge(args, file)
    }

    pub(crate) fn merge(args: ServeArgs, file: Config) -> Result<Settings, ConfigError> {
        let rules = PacketRules::default();
        let alerts = AlertConfig::default();
        let idle_timeout_s = args.idle_timeout_s.or(file.idle_timeout_s);
        // Given only an idle timeout shorter than the default heartbeat, keep
        // the default relation (the timeout is three missed heartbeats)
        // instead of refusing to start: the gateway wants idle > heartbeat.
        let heartbeat_s = args.heartbeat_s.or(file.heartbeat_s).unwrap_or(match idle_timeout_s {
            Some(idle) => (idle / 3).clamp(1, gw::HEARTBEAT_S_DEFAULT),
            None => gw::HEARTBEAT_S_DEFAULT,
        });
        let max_connections = args.max_connections.or(file.max_connections).unwrap_or(gw::MAX_CONNECTIONS_DEFAULT);
        let max_pending_hello = args
            .max_pending_hello
            .or(file.max_pending_hello)
            .unwrap_or_else(|| gw::max_pending_hello_default(max_connections));
        let max_pending_hello_per_ip = args
            .max_pending_hello_per_ip
            .or(file.max_pending_hello_per_ip)
            .unwrap_or_else(|| gw::max_pending_hello_per_ip_default(max_pending_hello));
        let data = args.data.or(file.data).unwrap_or_else(|| PathBuf::from(DATA_DEFAULT));
        let store = StoreLocation::resolve(args.store.or(file.store).as_deref(), &data)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let s = Settings {
            data,
            store,
            dev: args.dev.or(file.dev).unwrap_or(false),
            tcp: args.tcp.or(file.tcp).unwrap_or_else(|| addr(TCP_DEFAULT)),
            ws: args.ws.or(file.ws).unwrap_or_else(|| addr(WS_DEFAULT)),
            admin: args.admin.or(file.admin).unwrap_or_else(|| addr(ADMIN_DEFAULT)),
            shards: args.shards.or(file.shards).unwrap_or(SHARDS_DEFAULT),
            secret: args.secret.or(file.secret),
            admin_key: args.admin_key.or(file.admin_key),
            heartbeat_s,
            idle_timeout_s: idle_timeout_s.unwrap_or(gw::IDLE_TIMEOUT_S_DEFAULT),
            hello_timeout_s: args.hello_timeout_s.or(file.hello_timeout_s).unwrap_or(gw::HELLO_TIMEOUT_S_DEFAULT),
            park_after_s: args.park_after_s.or(file.park_after_s).unwrap_or(gw::PARK_AFTER_S_DEFAULT),
            admin_connections_max: args
                .admin_connections_max
                .or(file.admin_connections_max)
                .unwrap_or(hongbao_admin::limits::ADMIN_CONNECTIONS_MAX),
            max_connections,
            max_pending_hello,
            max_pending_hello_per_ip,
            gateways: args.gateways.or(file.gateways).unwrap_or(1),
            packet_rules: PacketRules {
                amount_fen_max: args
                    .packet_amount_max_fen
                    .or(file.packet_amount_max_fen)
                    .unwrap_or(rules.amount_fen_max),
                count_max: args.packet_count_max.or(file.packet_count_max).unwrap_or(rules.count_max),
                expiry_s: args.packet_expiry_s.or(file.packet_expiry_s).unwrap_or(rules.expiry_s),
                sends_per_s: args.sends_per_s.or(file.sends_per_s).unwrap_or(rules.sends_per_s),
                send_burst: args.send_burst.or(file.send_burst).unwrap_or(rules.send_burst),
            },
            alerts: AlertConfig {
                warmup_s: args.alert_warmup_s.or(file.alert_warmup_s).unwrap_or(alerts.warmup_s),
                fire_after_s: args.alert_fire_after_s.or(file.alert_fire_after_s).unwrap_or(alerts.fire_after_s),
                clear_after_s: args.alert_clear_after_s.or(file.alert_clear_after_s).unwrap_or(alerts.clear_after_s),
                sigmas: args.alert_sigmas.or(file.alert_sigmas).unwrap_or(alerts.sigmas),
                relearn_after_s: args
                    .alert_relearn_after_s
                    .or(file.alert_relearn_after_s)
                    .unwrap_or(alerts.relearn_after_s),
                min_rate_per_s: args
                    .alert_min_rate_per_s
                    .or(file.alert_min_rate_per_s)
                    .unwrap_or(alerts.min_rate_per_s),
                ..alerts
            },
            set_role: None,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks what is cheap to check here, so a bad value is reported with
    /// the setting's name before anything starts. The gateway and the
    /// engine check their own inputs again.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.shards == 0 || usize::from(self.shards) > SHARDS_MAX {
            return invalid(format!("shards must be between 1 and {SHARDS_MAX}, got {}", self.shards));
        }
        if self.gateways == 0 || usize::from(self.gateways) > GATEWAYS_MAX {
            return invalid(format!("gateways must be between 1 and {GATEWAYS_MAX}, got {}", self.gateways));
        }
        if self.max_pending_hello == 0 || self.max_pending_hello > self.max_connections {
            return invalid(format!(
                "max_pending_hello must be between 1 and max_connections ({}), got {}",
                self.max_connections, self.max_pending_hello
            ));
        }
        if self.max_pending_hello_per_ip == 0 || self.max_pending_hello_per_ip > self.max_pending_hello {
            return invalid(format!(
                "max_pending_hello_per_ip must be between 1 and max_pending_hello ({}), got {}",
                self.max_pending_hello, self.max_pending_hello_per_ip
            ));
        }
        if self.admin_connections_max < 1 {
            return invalid("admin_connections_max must be at least 1".into());
        }
        if self.packet_rules.amount_fen_max < 1 {
            return invalid("packet_amount_max_fen must be at least 1".into());
        }
        if self.packet_rules.count_max < 1 {
            return invalid("packet_count_max must be at least 1".into());
        }
        if self.packet_rules.expiry_s < 1 {
            return invalid("packet_expiry_s must be at least 1".into());
        }
        if self.packet_rules.send_burst < 1 {
            return invalid("send_burst must be at least 1".into());
        }
        if let Err(e) = self.alerts.validate() {
            return invalid(e.to_string());
        }
        for (name, value) in [("secret", &self.secret), ("admin_key", &self.admin_key)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return invalid(format!("{name} must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(argv: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("hongbao").chain(argv.iter().copied())).unwrap().serve
    }

    #[test]
    fn zero_config_gives_the_defaults() {
        let s = Settings::merge(ServeArgs::default(), Config::default()).unwrap();
        assert_eq!(s.data, PathBuf::from("./data"));
        assert_eq!((s.tcp, s.ws, s.admin), (addr(TCP_DEFAULT), addr(WS_DEFAULT), addr(ADMIN_DEFAULT)));
        assert_eq!((s.shards, s.dev, s.packet_rules.clone()), (4, false, PacketRules::default()));
        assert!(s.secret.is_none() && s.admin_key.is_none());
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file: Config =
            toml::from_str("shards = 8\ntcp = \"0.0.0.0:9000\"\ndev = true\npacket_expiry_s = 60").unwrap();
        let s = Settings::merge(args(&["--shards", "2", "--dev=false"]), file).unwrap();
        assert_eq!(s.shards, 2);
        assert!(!s.dev);
        assert_eq!(s.tcp, addr("0.0.0.0:9000"));
        assert_eq!(s.packet_rules.expiry_s, 60);
        assert!(args(&["--dev"]).dev.unwrap());
    }

    #[test]
    fn a_short_idle_timeout_shortens_the_default_heartbeat() {
        let s = Settings::merge(args(&["--idle-timeout-s", "9"]), Config::default()).unwrap();
        assert_eq!((s.heartbeat_s, s.idle_timeout_s), (3, 9));
        let s = Settings::merge(args(&["--idle-timeout-s", "9", "--heartbeat-s", "4"]), Config::default()).unwrap();
        assert_eq!(s.heartbeat_s, 4);
    }

    #[test]
    fn pending_hello_caps_follow_the_connection_cap_unless_given() {
        let s = Settings::merge(ServeArgs::default(), Config::default()).unwrap();
        assert_eq!((s.max_connections, s.max_pending_hello, s.max_pending_hello_per_ip), (18_000, 4_500, 2_250));
        let s = Settings::merge(args(&["--max-connections", "1000"]), Config::default()).unwrap();
        assert_eq!((s.max_pending_hello, s.max_pending_hello_per_ip), (1000, 500));
        let s = Settings::merge(args(&["--max-connections", "400"]), Config::default()).unwrap();
        assert_eq!((s.max_pending_hello, s.max_pending_hello_per_ip), (400, 256));
        let s = Settings::merge(args(&["--max-connections", "100"]), Config::default()).unwrap();
        assert_eq!((s.max_pending_hello, s.max_pending_hello_per_ip), (100, 100));
        let s = Settings::merge(args(&["--max-pending-hello-per-ip", "4500"]), Config::default()).unwrap();
        assert_eq!((s.max_pending_hello, s.max_pending_hello_per_ip), (4_500, 4_500));
        assert!(Settings::merge(args(&["--max-pending-hello", "18001"]), Config::default()).is_err());
        assert!(Settings::merge(args(&["--max-pending-hello-per-ip", "0"]), Config::default()).is_err());
    }

    #[test]
    fn unknown_or_bad_settings_are_refused() {
        assert!(toml::from_str::<Config>("shard = 8").is_err());
        assert!(Settings::merge(args(&["--shards", "0"]), Config::default()).is_err());
        assert!(Settings::merge(args(&["--secret", " "]), Config::default()).is_err());
        assert!(Settings::merge(args(&["--admin-connections-max", "0"]), Config::default()).is_err());
    }

    #[test]
    fn the_store_is_sqlite_in_the_data_directory_unless_a_postgres_url_is_given() {
        let s = Settings::merge(args(&["--data", "/tmp/d"]), Config::default()).unwrap();
        assert_eq!(s.store, StoreLocation::Sqlite(PathBuf::from("/tmp/d")));
        let file = Config { store: Some("postgres://a@file/db".into()), ..Config::default() };
        let s =
            Settings::merge(args(&["--store", "postgresql://u:pw@db1,db2/hb?target_session_attrs=read-write"]), file)
                .unwrap();
        assert_eq!(s.store.describe(), "postgresql://u:***@db1,db2/hb?target_session_attrs=read-write");
        let from_file = Config { store: Some("postgres://a@file/db".into()), ..Config::default() };
        assert_eq!(Settings::merge(args(&[]), from_file).unwrap().store.describe(), "postgres://a@file/db");
        let err = Settings::merge(args(&["--store", "mysql://x/y"]), Config::default()).unwrap_err();
        assert!(err.to_string().contains("postgres://"), "{err}");
    }

    #[test]
    fn alert_settings_come_from_flags_or_the_file() {
        let s = Settings::merge(ServeArgs::default(), Config::default()).unwrap();
        assert_eq!(s.alerts, AlertConfig::default());
        let file: Config = toml::from_str("alert_warmup_s = 5\nalert_sigmas = 4.5\nalert_fire_after_s = 2").unwrap();
        let s = Settings::merge(args(&["--alert-fire-after-s", "3", "--alert-clear-after-s", "4"]), file).unwrap();
        assert_eq!((s.alerts.warmup_s, s.alerts.fire_after_s, s.alerts.clear_after_s), (5, 3, 4));
        assert_eq!(s.alerts.sigmas, 4.5);
        assert!(Settings::merge(args(&["--alert-fire-after-s", "0"]), Config::default()).is_err());
        assert!(Settings::merge(args(&["--alert-sigmas=-1"]), Config::default()).is_err());
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../../hongbao.example.toml");
        toml::from_str::<Config>(text).unwrap();
    }
}
