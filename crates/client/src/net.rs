//! Client connections from a chosen loopback source address.
//!
//! From 127.0.0.1 alone, one server port takes only as many connections as
//! there are ephemeral ports (~28,000 here: 32768–60999), and one process
//! may hold at most 20,000 open files. So the tools spread connections over
//! processes, each connecting from its own loopback address (all of
//! 127.0.0.0/8 is loopback on Linux), and bind the source ports themselves.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// Source ports the tools bind explicitly: below the ephemeral range
/// (32768–60999 here), so they never collide with a port the system hands
/// out, and above the fixed ports servers use (7070, …).
///
/// They are chosen by the tools, not by bind(port 0): that would take them
/// from the ephemeral range, and the kernel's connect() skips every port
/// some socket was bound to explicitly, whatever its address, so 100,000
/// such sockets would leave no port for any other connect() on the machine.
pub const SOURCE_PORTS: Range<u16> = 10_000..32_768;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// The source address and port could not be bound (`AddrInUse`: taken).
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddrV4, source: std::io::Error },
    #[error("connect {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("no source port left on {ip} in {SOURCE_PORTS:?}")]
    NoPortLeft { ip: Ipv4Addr },
}

/// A connection to `server` from `source`, with Nagle off. The port may be
/// bound again at once after a close (`SO_REUSEADDR`), and closing sends a
/// reset (`SO_LINGER` 0) instead of leaving the connection in TIME_WAIT for
/// a minute: a client that reconnects, or the next run, binds the same
/// addresses and ports.
pub async fn connect_from(server: SocketAddr, source: SocketAddrV4) -> Result<TcpStream, ConnectError> {
    let socket = if server.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(ConnectError::Socket)?;
    socket.set_reuseaddr(true).map_err(ConnectError::Socket)?;
    socket.bind(source.into()).map_err(|e| ConnectError::Bind { addr: source, source: e })?;
    socket.set_zero_linger().map_err(ConnectError::Socket)?;
    socket.set_nodelay(true).map_err(ConnectError::Socket)?;
    socket.connect(server).await.map_err(|e| ConnectError::Connect { addr: server, source: e })
}

/// One loopback address's source ports, handed out in order: many
/// connections from one address, each from a port of its own.
#[derive(Debug)]
pub struct SourcePorts {
    ip: Ipv4Addr,
    /// The next port to try; past `SOURCE_PORTS.end` there is none left.
    next: AtomicU32,
}

impl SourcePorts {
    pub fn new(ip: Ipv4Addr) -> SourcePorts {
        SourcePorts { ip, next: AtomicU32::new(SOURCE_PORTS.start.into()) }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The next port not tried yet.
    fn take(&self) -> Option<u16> {
        let port = self.next.fetch_add(1, Ordering::Relaxed);
        u16::try_from(port).ok().filter(|p| SOURCE_PORTS.contains(p))
    }

    /// Connects to `server` from the next free port (`connect_from`); a port
    /// already taken (say, by a listener on every address) is skipped.
    pub async fn connect(&self, server: SocketAddr) -> Result<TcpStream, ConnectError> {
        loop {
            let port = self.take().ok_or(ConnectError::NoPortLeft { ip: self.ip })?;
            match connect_from(server, SocketAddrV4::new(self.ip, port)).await {
                Err(ConnectError::Bind { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse => continue,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_in_order_until_the_range_ends() {
        let ports = SourcePorts::new(Ipv4Addr::new(127, 0, 0, 9));
        assert_eq!((ports.take(), ports.take()), (Some(SOURCE_PORTS.start), Some(SOURCE_PORTS.start + 1)));
        ports.next.store((SOURCE_PORTS.end - 1).into(), Ordering::Relaxed);
        assert_eq!(ports.take(), Some(SOURCE_PORTS.end - 1));
        assert_eq!(ports.take(), None);
        assert_eq!(ports.take(), None);
    }

    #[tokio::test]
    async fn connections_come_from_the_chosen_address_and_skip_taken_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let ip = Ipv4Addr::new(127, 0, 3, 7);
        // Another socket holds the first port this address would use.
        let squatter = std::net::TcpListener::bind((ip, SOURCE_PORTS.start));
        let ports = SourcePorts::new(ip);
        let stream = ports.connect(server).await.unwrap();
        let local = stream.local_addr().unwrap();
        assert_eq!(local.ip(), ip);
        let (accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, local);
        if squatter.is_ok() {
            assert_ne!(local.port(), SOURCE_PORTS.start);
        }
        assert!(stream.nodelay().unwrap());
        drop(accepted);
    }
}
