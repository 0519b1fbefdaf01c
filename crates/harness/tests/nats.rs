//! Real `nats-server`s: the text protocol, JetStream, SIGKILL and restart on
//! the same ports and store, and that Drop ends the process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use hongbao_harness::NatsServer;

/// A minimal NATS text-protocol client over a raw socket (the real code uses
/// async-nats).
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    inbox: String,
}

/// A `MSG` the server delivered.
#[derive(Debug)]
struct Msg {
    subject: String,
    sid: String,
    payload: String,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client =
            Client { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream, inbox: String::new() };
        let info = client.line();
        assert!(info.starts_with("INFO {"), "{info}");
        client.send("CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n");
        loop {
            match client.line().as_str() {
                "PONG" => break,
                line if line.starts_with("INFO") => {}
                line => panic!("unexpected {line:?} after CONNECT"),
            }
        }
        client.inbox = "_INBOX.harness".to_owned();
        client.send(&format!("SUB {} 99\r\n", client.inbox));
        client
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "connection closed or truncated line: {line:?}");
        line.trim_end().to_owned()
    }

    fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &str) {
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        self.send(&format!("PUB {subject}{reply} {}\r\n{payload}\r\n", payload.len()));
    }

    /// The next `MSG`, answering the server's `PING`s meanwhile.
    fn next_msg(&mut self) -> Msg {
        loop {
            let line = self.line();
            if line == "PING" {
                self.send("PONG\r\n");
                continue;
            }
            if line == "+OK" || line == "PONG" || line.starts_with("INFO ") {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            // MSG <subject> <sid> [reply-to] <#bytes>
            assert!(parts[0] == "MSG" && (4..=5).contains(&parts.len()), "unexpected {line:?}");
            let len: usize = parts.last().unwrap().parse().unwrap();
            let mut payload = vec![0; len + 2];
            self.reader.read_exact(&mut payload).unwrap();
            assert_eq!(&payload[len..], b"\r\n");
            payload.truncate(len);
            return Msg {
                subject: parts[1].to_owned(),
                sid: parts[2].to_owned(),
                payload: String::from_utf8(payload).unwrap(),
            };
        }
    }

    /// A request with this client's inbox as the reply subject: the reply's
    /// payload.
    fn request(&mut self, subject: &str, payload: &str) -> String {
        let inbox = self.inbox.clone();
        self.publish(subject, Some(&inbox), payload);
        let msg = self.next_msg();
        assert_eq!((msg.subject.as_str(), msg.sid.as_str()), (inbox.as_str(), "99"));
        msg.payload
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn pub_sub_and_jetstream_answer() {
    let server = NatsServer::start().unwrap();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let mut client = Client::connect(server.port());
    client.send("SUB t 1\r\n");
    client.publish("t", None, "hello");
    let msg = client.next_msg();
    assert_eq!((msg.subject.as_str(), msg.sid.as_str(), msg.payload.as_str()), ("t", "1", "hello"));

    let info = client.request("$JS.API.INFO", "");
    assert!(info.contains("\"type\":\"io.nats.jetstream.api.v1.account_info_response\""), "{info}");
    assert!(!info.contains("\"error\""), "{info}");

    let (status, jsz) = server.monitor_get("/jsz").unwrap();
    assert_eq!(status, 200, "{jsz}");
    let store = server.store_dir().to_str().unwrap();
    assert!(jsz.contains(store), "/jsz does not name the store directory {store}: {jsz}");
    assert!(!jsz.contains("\"disabled\":true"), "{jsz}");
}

#[test]
fn a_stream_survives_kill9_and_restart_on_the_same_ports() {
    let mut server = NatsServer::start().unwrap();
    let (port, monitor_port) = (server.port(), server.monitor_port());
    let first_pid = server.pid().unwrap();

    let mut client = Client::connect(port);
    let created = client.request(
        "$JS.API.STREAM.CREATE.RED",
        r#"{"name":"RED","subjects":["red.>"],"storage":"file","num_replicas":1}"#,
    );
    assert!(created.contains("stream_create_response") && !created.contains("\"error\""), "{created}");
    let ack = client.request("red.packet", "one");
    assert!(ack.contains("\"stream\":\"RED\"") && ack.contains("\"seq\":1"), "{ack}");
    drop(client);

    server.kill9().unwrap();
    assert_eq!(server.pid(), None);
    assert!(!process_exists(first_pid));
    assert!(!port_accepts(port));

    server.restart().unwrap();
    assert_eq!((server.port(), server.monitor_port()), (port, monitor_port));
    assert_ne!(server.pid(), Some(first_pid));
    let mut client = Client::connect(port);
    let info = client.request("$JS.API.STREAM.INFO.RED", "");
    assert!(info.contains("\"messages\":1,"), "{info}");

    // A plain stop and restart too.
    server.stop().unwrap();
    assert!(!port_accepts(port));
    server.restart().unwrap();
    let mut client = Client::connect(port);
    client.send("SUB t 1\r\n");
    client.publish("t", None, "again");
    assert_eq!(client.next_msg().payload, "again");
}

#[test]
fn a_restart_onto_a_taken_port_fails_clearly() {
    let mut server = NatsServer::start().unwrap();
    let port = server.port();
    server.kill9().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = server.restart().unwrap_err();
    assert!(
        matches!(err, hongbao_harness::HarnessError::PortTaken { .. })
            && err.to_string().starts_with(&format!("cannot restart nats-server on 127.0.0.1 port {port}: ")),
        "{err}"
    );
    assert!(server.kill9().is_err(), "not running");
    drop(squatter);
    server.restart().unwrap();
    assert!(server.is_running());
}

#[test]
fn two_servers_differ_and_drop_ends_them() {
    let a = NatsServer::start().unwrap();
    let b = NatsServer::start().unwrap();
    let ports = [a.port(), a.monitor_port(), b.port(), b.monitor_port()];
    for (i, p) in ports.iter().enumerate() {
        assert!(!ports[i + 1..].contains(p), "{ports:?}");
    }
    assert_ne!(a.store_dir(), b.store_dir());
    let pids = [a.pid().unwrap(), b.pid().unwrap()];
    let dir = a.store_dir().parent().unwrap().to_owned();
    drop(a);
    drop(b);
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} outlived its NatsServer");
    }
    assert!(ports.iter().all(|&p| !port_accepts(p)));
    assert!(!dir.exists());
}
