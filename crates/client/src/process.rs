//! Starting a `hongbao` child process (`serve`, or a cluster's `set`,
//! `gateway`, `cluster-admin`) and learning its addresses from the one
//! `HONGBAO_READY {json}` line it prints on stdout. Used by the black-box
//! tests and by `hongbao perf`, which both need real servers.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

/// Where a started server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddrs {
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    /// The extra gateway processes (`serve --gateways N`: N-1 of them)
    /// sharing the client ports; empty with one gateway.
    pub gateway_pids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start the server: {0}")]
    Start(std::io::Error),
    #[error("the server printed no ready line within {0:?}")]
    NotReady(Duration),
    #[error("the server ended (or closed its stdout) before printing a ready line")]
    Exited,
    #[error("unreadable ready line {line:?}: {why}")]
    BadReadyLine { line: String, why: String },
}

/// Spawns `cmd` (a `hongbao serve ...` the caller has set up, stderr
/// included) with stdout piped, and waits up to `timeout` for its ready line.
/// stdout keeps being drained afterwards, so the child never blocks on it.
/// On failure the child is killed and reaped.
pub fn spawn_server(cmd: &mut Command, timeout: Duration) -> Result<(Child, ServerAddrs), SpawnError> {
    let (mut child, line) = spawn_ready_line(cmd, timeout)?;
    match parse_ready(&line) {
        Ok(addrs) => Ok((child, addrs)),
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(SpawnError::BadReadyLine { line, why })
        }
    }
}

/// Spawns any `hongbao` command that prints a ready line (a cluster's `set`,
/// `gateway`, `cluster-admin`, whose lines differ) and returns it as JSON.
pub fn spawn_ready(cmd: &mut Command, timeout: Duration) -> Result<(Child, serde_json::Value), SpawnError> {
    let (mut child, line) = spawn_ready_line(cmd, timeout)?;
    match serde_json::from_str(&line) {
        Ok(json) => Ok((child, json)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(SpawnError::BadReadyLine { line, why: e.to_string() })
        }
    }
}

fn spawn_ready_line(cmd: &mut Command, timeout: Duration) -> Result<(Child, String), SpawnError> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().map_err(SpawnError::Start)?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let (Some(json), Some(tx)) = (line.strip_prefix("HONGBAO_READY "), tx.take()) {
                let _ = tx.send(json.to_owned());
            }
        }
    });
    let fail = |mut child: Child, e: SpawnError| {
        let _ = child.kill();
        let _ = child.wait();
        Err(e)
    };
    match rx.recv_timeout(timeout) {
        Ok(line) => Ok((child, line)),
        Err(RecvTimeoutError::Timeout) => fail(child, SpawnError::NotReady(timeout)),
        Err(RecvTimeoutError::Disconnected) => fail(child, SpawnError::Exited),
    }
}

fn parse_ready(json: &str) -> Result<ServerAddrs, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let addr = |k: &str| -> Result<SocketAddr, String> {
        v[k].as_str().ok_or_else(|| format!("no {k}"))?.parse().map_err(|e| format!("{k}: {e}"))
    };
    let gateway_pids = match v.get("gateway_pids") {
        None => Vec::new(),
        Some(pids) => serde_json::from_value(pids.clone()).map_err(|e| format!("gateway_pids: {e}"))?,
    };
    Ok(ServerAddrs { tcp: addr("tcp")?, ws: addr("ws")?, admin: addr("admin")?, gateway_pids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse_and_bad_ones_say_why() {
        let a = parse_ready(r#"{"tcp":"127.0.0.1:1","ws":"127.0.0.1:2","admin":"127.0.0.1:3","data":"/d","dev":true}"#);
        let a = a.unwrap();
        assert_eq!((a.admin, a.gateway_pids.len()), ("127.0.0.1:3".parse().unwrap(), 0));
        let b = parse_ready(r#"{"tcp":"127.0.0.1:1","ws":"127.0.0.1:2","admin":"127.0.0.1:3","gateway_pids":[11,12]}"#);
        assert_eq!(b.unwrap().gateway_pids, vec![11, 12]);
        assert!(parse_ready(r#"{"tcp":"127.0.0.1:1"}"#).unwrap_err().contains("no ws"));
        assert!(parse_ready("not json").is_err());
    }

    #[test]
    fn a_child_that_never_gets_ready_is_killed() {
        let started = std::time::Instant::now();
        let r = spawn_server(Command::new("sleep").arg("30"), Duration::from_millis(300));
        assert!(matches!(r, Err(SpawnError::NotReady(_))));
        assert!(started.elapsed() < Duration::from_secs(10), "killed, not waited for");
    }

    #[test]
    fn a_child_that_exits_without_a_ready_line_is_told_apart_from_a_slow_one() {
        let r = spawn_server(Command::new("true").arg("serve"), Duration::from_secs(3600));
        assert!(matches!(r, Err(SpawnError::Exited)), "{r:?}");
    }
}
