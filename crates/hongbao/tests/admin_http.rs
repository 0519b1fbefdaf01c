//! The admin HTTP server's connection handling, against the real binary over
//! raw sockets (issue 9): keep-alive after an error answer, what `/metrics`
//! shows with and without the key, the admin connection cap. Timeouts are
//! tested with short values in `crates/admin/src/tests.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// How long any single step may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(15);

const MONEY_GAUGES: [&str; 5] = [
    "hongbao_user_balances_fen",
    "hongbao_packet_escrow_fen",
    "hongbao_campaign_escrow_fen",
    "hongbao_transit_fen",
    "hongbao_deposits_minus_withdrawals_fen",
];

/// One response read off a connection.
#[derive(Debug)]
struct Head {
    status: u16,
    /// `connection: close` was among the headers.
    close: bool,
    body: String,
}

/// A blocking client connection speaking raw HTTP/1.1.
struct Conn {
    stream: TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Conn { stream, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &str) -> std::io::Result<()> {
        self.stream.write_all(bytes.as_bytes())
    }

    /// One response; Err if the connection ends (or nothing comes) first.
    fn response(&mut self) -> Result<Head, String> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or(head.clone())?;
        let len: usize = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let close = head.split("\r\n").any(|l| l == "connection: close");
        while self.buf.len() < head_end + len {
            self.fill()?;
        }
        let body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        Ok(Head { status, close, body })
    }

    fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(format!("connection closed ({} bytes unparsed)", self.buf.len())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// Reads to the end (EOF or reset); returns what came before it.
    fn until_closed(&mut self) -> Result<Vec<u8>, String> {
        let mut got = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(format!("still open after {WAIT:?}"))
                }
                Err(_) => return Ok(got),
            }
        }
    }
}

fn get(path: &str, key: Option<&str>) -> String {
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n{auth}\r\n")
}

#[test]
fn an_error_answer_with_a_late_body_keeps_the_connection_usable() {
    // The sequence of issue 9, item 4: the body 0.2 s after its head, to a
    // path the server refuses (400), then the next request on the socket.
    let server = Server::dev(&[]);
    let mut c = Conn::open(server.admin_addr);
    let body = r#"{"amount_fen": 100, "key": "late-body"}"#;
    let head =
        format!("POST /v1/accounts/abc/deposit HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n", body.len());
    for round in 0..3 {
        c.send(&head).unwrap_or_else(|e| panic!("round {round}: {e}"));
        std::thread::sleep(Duration::from_millis(200));
        c.send(body).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let r = c.response().unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(r.status, 400, "{r:?}");
        // Either answer is honest; this server keeps the connection.
        assert!(!r.close, "{r:?}");
    }
    c.send(&get("/health", None)).unwrap();
    let r = c.response().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
}

#[test]
fn metrics_show_money_only_with_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(tmp.path(), false, &[]);
    let key = server.admin_key.clone().expect("a generated admin key");
    let mut c = Conn::open(server.admin_addr);
    let body = r#"{"amount_fen": 4321, "key": "metrics-money"}"#;
    c.send(&format!(
        "POST /v1/accounts/9/deposit HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .unwrap();
    assert_eq!(c.response().unwrap().status, 200);

    // A scrape without a key: operational metrics, no money.
    c.send(&get("/metrics", None)).unwrap();
    let open = c.response().unwrap();
    assert_eq!(open.status, 200);
    for name in ["hongbao_writer_queue_depth", "hongbao_users_online", "hongbao_admin_requests_total"] {
        assert!(open.body.contains(name), "{name} missing:\n{}", open.body);
    }
    for name in MONEY_GAUGES {
        assert!(!open.body.contains(name), "{name} shown without the key:\n{}", open.body);
    }
    // With the key (Prometheus' `authorization: Bearer`): the money too.
    c.send(&get("/metrics", Some(&key))).unwrap();
    let keyed = c.response().unwrap();
    assert_eq!(keyed.status, 200);
    for name in MONEY_GAUGES {
        assert!(keyed.body.contains(&format!("\n{name} ")), "{name} missing with the key:\n{}", keyed.body);
    }
    assert!(keyed.body.contains("\nhongbao_user_balances_fen 4321\n"), "{}", keyed.body);
    // A wrong key is refused, as on `/v1`.
    c.send(&get("/metrics", Some("wrong"))).unwrap();
    assert_eq!(c.response().unwrap().status, 401);
}

#[test]
fn dev_metrics_without_a_key_show_everything() {
    let server = Server::dev(&[]);
    let mut c = Conn::open(server.admin_addr);
    c.send(&get("/metrics", None)).unwrap();
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    for name in MONEY_GAUGES {
        assert!(r.body.contains(name), "{name} missing in dev mode:\n{}", r.body);
    }
}

#[test]
fn admin_connections_over_the_cap_are_closed_and_counted() {
    let server = Server::dev(&["--admin-connections-max", "2"]);
    // Two connections that send half a head hold both slots.
    let mut held: Vec<Conn> = (0..2).map(|_| Conn::open(server.admin_addr)).collect();
    for c in &mut held {
        c.send("GET /health HTTP/1.1\r\n").unwrap();
    }
    // The third is closed unanswered.
    let mut over = Conn::open(server.admin_addr);
    let _ = over.send(&get("/health", None));
    let bytes = over.until_closed().unwrap();
    assert!(bytes.is_empty(), "answered over the cap: {}", String::from_utf8_lossy(&bytes));
    // Once they go, the API answers again, and the refusal was counted.
    drop(held);
    let began = Instant::now();
    let metrics = loop {
        let mut c = Conn::open(server.admin_addr);
        if c.send(&get("/metrics", None)).is_ok() {
            if let Ok(r) = c.response() {
                break r.body;
            }
        }
        assert!(began.elapsed() < WAIT, "the admin API did not answer again");
        std::thread::sleep(Duration::from_millis(50));
    };
    // At least the one above; retries of the loop may have been refused too
    // while the held connections were still being let go.
    let rejected: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hongbao_admin_connections_rejected_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rejection count:\n{metrics}"));
    assert!(rejected >= 1, "{metrics}");
}
