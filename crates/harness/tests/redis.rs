//! Real `redis-server`s: the append-only file across SIGKILL and restart,
//! nothing kept without it, and that Drop ends the process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use hongbao_harness::{RedisOptions, RedisServer};

/// One RESP command over a fresh raw connection (the real code uses the
/// redis crate): the reply, `None` for a null bulk string.
fn command(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let line = line.trim_end();
    match line.split_at(1) {
        ("+", text) => Some(text.to_owned()),
        ("$", "-1") => None,
        ("$", len) => {
            let len: usize = len.parse().unwrap();
            let mut value = vec![0; len + 2];
            reader.read_exact(&mut value).unwrap();
            value.truncate(len);
            Some(String::from_utf8(value).unwrap())
        }
        _ => panic!("unexpected reply {line:?} to {args:?}"),
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn appendonly_data_survives_kill9_and_restart() {
    let mut server = RedisServer::start_with(RedisOptions { appendonly: true }).unwrap();
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(command(port, &["SET", "k", "v"]).as_deref(), Some("OK"));
    let first_pid = server.pid().unwrap();

    server.kill9().unwrap();
    assert!(!process_exists(first_pid));
    assert!(!port_accepts(port));
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(first_pid));
    assert_eq!(command(port, &["GET", "k"]).as_deref(), Some("v"));
    assert!(server.dir().join("appendonlydir").is_dir());

    // A plain stop and restart keep it too.
    server.stop().unwrap();
    server.restart().unwrap();
    assert_eq!(command(port, &["GET", "k"]).as_deref(), Some("v"));
}

#[test]
fn without_appendonly_a_restart_is_empty() {
    let mut server = RedisServer::start_with(RedisOptions { appendonly: false }).unwrap();
    let port = server.port();
    assert_eq!(command(port, &["SET", "k", "v"]).as_deref(), Some("OK"));
    assert_eq!(command(port, &["GET", "k"]).as_deref(), Some("v"));
    server.kill9().unwrap();
    server.restart().unwrap();
    assert_eq!(command(port, &["GET", "k"]), None);
    assert!(!server.dir().join("appendonlydir").exists());
    // Not even a graceful stop saves anything (`--save ''`).
    assert_eq!(command(port, &["SET", "k", "v"]).as_deref(), Some("OK"));
    server.stop().unwrap();
    server.restart().unwrap();
    assert_eq!(command(port, &["GET", "k"]), None);
}

#[test]
fn the_default_is_appendonly() {
    assert!(RedisOptions::default().appendonly);
    let server = RedisServer::start().unwrap();
    // Redis makes the append-only file's directory when it starts with one.
    assert!(server.dir().join("appendonlydir").is_dir());
}

#[test]
fn a_restart_onto_a_taken_port_fails_clearly() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    server.kill9().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = server.restart().unwrap_err();
    assert!(
        matches!(err, hongbao_harness::HarnessError::PortTaken { .. })
            && err.to_string().starts_with(&format!("cannot restart redis-server on 127.0.0.1 port {port}: ")),
        "{err}"
    );
    drop(squatter);
    server.restart().unwrap();
    assert_eq!(command(port, &["PING"]).as_deref(), Some("PONG"));
}

#[test]
fn two_servers_differ_and_drop_ends_them() {
    let a = RedisServer::start().unwrap();
    let b = RedisServer::start_with(RedisOptions { appendonly: false }).unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    let ports = [a.port(), b.port()];
    let pids = [a.pid().unwrap(), b.pid().unwrap()];
    let dir = a.dir().to_owned();
    drop(a);
    drop(b);
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} outlived its RedisServer");
    }
    assert!(ports.iter().all(|&p| !port_accepts(p)));
    assert!(!dir.exists());
}
