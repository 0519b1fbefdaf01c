//! The handshake every connection starts with (docs/protocol.md): the
//! client's first frame is `hello { token }` (request id 1), the server
//! answers `welcome`, or an error and a `close`. Pushes of pending messages
//! follow the welcome.
//!
//! Two ways to read it: `hello` reads into the caller's buffer and leaves
//! what follows the welcome there (a client that goes on reading with that
//! buffer: the simulated user), `hello_exact` reads frame by frame and
//! nothing past the welcome (a lean holder that keeps no buffer).

use hongbao_proto::{ClientFrame, Reply, Request, ServerFrame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frames::{self, FrameError};

/// Request id of the hello: the first request of a connection.
pub const HELLO_ID: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed before the welcome")]
    Closed,
    #[error("expected welcome, got {0:?}")]
    Unexpected(Box<ServerFrame>),
    #[error("welcome for user {got}, expected user {expected}")]
    WrongUser { expected: u64, got: u64 },
}

/// What the server's welcome says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub user: u64,
    pub protocol: u32,
    pub heartbeat_s: u32,
    pub server_time_ms: u64,
}

impl Welcome {
    /// This welcome, if it is for `user` (the token's user).
    pub fn for_user(self, user: u64) -> Result<Welcome, HandshakeError> {
        if self.user == user {
            Ok(self)
        } else {
            Err(HandshakeError::WrongUser { expected: user, got: self.user })
        }
    }
}

/// The hello carrying `token`, in either encoding's frame.
pub fn hello_frame(token: &str) -> ClientFrame {
    ClientFrame { id: HELLO_ID, req: Request::Hello { token: token.to_owned() } }
}

/// What a frame that came while waiting for the welcome means: the welcome;
/// `None` for a push (read on); an error for anything else (an error reply,
/// a close).
pub fn welcome(frame: ServerFrame) -> Result<Option<Welcome>, HandshakeError> {
    match frame {
        ServerFrame::Reply { reply: Reply::Welcome { user, protocol, heartbeat_s, server_time_ms }, .. } => {
            Ok(Some(Welcome { user, protocol, heartbeat_s, server_time_ms }))
        }
        ServerFrame::Push(_) => Ok(None),
        other => Err(HandshakeError::Unexpected(Box::new(other))),
    }
}

/// Sends the hello over a binary-frame connection and reads until the
/// welcome. Reads go into `buf` (it may start empty: it grows only as bytes
/// arrive), and whatever arrived after the welcome stays there for the
/// caller, so no push that follows it is lost. Give it a time limit.
pub async fn hello<S>(stream: &mut S, buf: &mut Vec<u8>, token: &str) -> Result<Welcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bytes = frames::encode(HELLO_ID, Request::Hello { token: token.to_owned() });
    stream.write_all(&bytes).await.map_err(FrameError::from)?;
    loop {
        while let Some(frame) = frames::take(buf).map_err(FrameError::from)? {
            if let Some(welcome) = welcome(frame)? {
                return Ok(welcome);
            }
        }
        if stream.read_buf(buf).await.map_err(FrameError::from)? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// Sends the hello over a binary-frame connection and reads frame by frame
/// until the welcome, nothing past it: what follows stays in the socket for
/// whoever reads the connection next, and no buffer outlives the call.
/// Give it a time limit.
pub async fn hello_exact<S>(stream: &mut S, token: &str) -> Result<Welcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bytes = frames::encode(HELLO_ID, Request::Hello { token: token.to_owned() });
    stream.write_all(&bytes).await.map_err(FrameError::from)?;
    loop {
        if let Some(welcome) = welcome(frames::read(stream).await?)? {
            return Ok(welcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{binary, ErrorCode, Push, PushBody};

    fn welcome_of(user: u64) -> ServerFrame {
        ServerFrame::Reply {
            id: HELLO_ID,
            reply: Reply::Welcome { user, protocol: 1, heartbeat_s: 30, server_time_ms: 5 },
        }
    }

    fn notice() -> ServerFrame {
        ServerFrame::Push(Push { msg: 3, body: PushBody::Notice { topic: "t".into(), text: "x".into() } })
    }

    #[test]
    fn only_a_welcome_ends_the_handshake() {
        let w = welcome(welcome_of(42)).unwrap().unwrap();
        assert_eq!(w, Welcome { user: 42, protocol: 1, heartbeat_s: 30, server_time_ms: 5 });
        assert!(w.for_user(42).is_ok());
        assert!(matches!(w.for_user(7), Err(HandshakeError::WrongUser { expected: 7, got: 42 })));
        assert_eq!(welcome(notice()).unwrap(), None);
        let refused = ServerFrame::Close { code: ErrorCode::BadToken, message: "bad token".into() };
        assert!(matches!(welcome(refused), Err(HandshakeError::Unexpected(_))));
    }

    #[test]
    fn the_hello_is_request_one_with_the_token() {
        let bytes = binary::encode_client(&hello_frame("42"));
        assert_eq!(bytes, frames::encode(1, Request::Hello { token: "42".into() }));
    }

    async fn read_client_frame(r: &mut (impl AsyncRead + Unpin)) -> ClientFrame {
        let mut header = [0u8; hongbao_proto::FRAME_HEADER_BYTES];
        r.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; binary::body_len(&header).unwrap().unwrap()];
        r.read_exact(&mut body).await.unwrap();
        binary::decode_client(&body).unwrap()
    }

    #[tokio::test]
    async fn hello_sends_the_token_and_keeps_what_follows_the_welcome() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let peer = tokio::spawn(async move {
            let hello = read_client_frame(&mut server).await;
            // A push first, then the welcome and a push behind it in one write.
            let bytes =
                [notice(), welcome_of(42), notice()].iter().flat_map(binary::encode_server).collect::<Vec<u8>>();
            server.write_all(&bytes).await.unwrap();
            hello
        });
        let mut buf = Vec::new();
        let w = hello(&mut client, &mut buf, "42").await.unwrap();
        assert_eq!(w.user, 42);
        assert_eq!(peer.await.unwrap(), hello_frame("42"));
        assert_eq!(frames::take(&mut buf).unwrap(), Some(notice()), "the push after the welcome is kept");
    }

    #[tokio::test]
    async fn hello_exact_reads_nothing_past_the_welcome() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let bytes = [notice(), welcome_of(42), notice()].iter().flat_map(binary::encode_server).collect::<Vec<u8>>();
        server.write_all(&bytes).await.unwrap();
        let w = hello_exact(&mut client, "42").await.unwrap();
        assert_eq!(w.user, 42);
        assert_eq!(read_client_frame(&mut server).await, hello_frame("42"));
        assert_eq!(frames::read(&mut client).await.unwrap(), notice(), "the push after the welcome is still there");
    }

    #[tokio::test]
    async fn a_close_or_a_hang_up_fails_the_handshake() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let close = ServerFrame::Close { code: ErrorCode::BadToken, message: "bad token".into() };
        server.write_all(&binary::encode_server(&close)).await.unwrap();
        let r = hello(&mut client, &mut Vec::new(), "x").await;
        assert!(matches!(r, Err(HandshakeError::Unexpected(f)) if *f == close));
        let (mut client, mut server) = tokio::io::duplex(4096);
        server.write_all(&binary::encode_server(&close)).await.unwrap();
        assert!(matches!(hello_exact(&mut client, "x").await, Err(HandshakeError::Unexpected(_))));
        let (mut client, server) = tokio::io::duplex(4096);
        drop(server);
        assert!(matches!(
            hello(&mut client, &mut Vec::new(), "x").await,
            Err(HandshakeError::Frame(_) | HandshakeError::Closed)
        ));
    }
}
