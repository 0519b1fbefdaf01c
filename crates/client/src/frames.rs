//! Binary frames on the client side (`[u32 BE length][postcard body]`,
//! `hongbao_proto::binary`): client frames out, server frames in, either
//! split off a buffer that holds whatever has arrived or read one at a time.
//!
//! Like the server, a reader checks a frame's announced length against
//! `FRAME_BYTES_MAX` from its header, before anything is allocated for the
//! body.

use hongbao_proto::{binary, ClientFrame, DecodeError, Request, ServerFrame, FRAME_HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a server frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("server frame: {0}")]
    Decode(#[from] DecodeError),
}

/// The bytes of client frame `id` carrying `req`, header included.
pub fn encode(id: u64, req: Request) -> Vec<u8> {
    binary::encode_client(&ClientFrame { id, req })
}

/// Splits the first whole server frame off the front of `buf`: `Ok(None)`
/// until all of its bytes are there. An oversized length is an error as
/// soon as its header is there, and a body that does not decode is one too
/// (its bytes are removed either way; a client ends the connection on it).
pub fn take(buf: &mut Vec<u8>) -> Result<Option<ServerFrame>, DecodeError> {
    let Some(len) = binary::body_len(buf)? else { return Ok(None) };
    let end = FRAME_HEADER_BYTES + len;
    if buf.len() < end {
        return Ok(None);
    }
    let frame = binary::decode_server(&buf[FRAME_HEADER_BYTES..end]);
    buf.drain(..end);
    frame.map(Some)
}

/// Reads exactly one server frame and nothing past it: the header, then the
/// body into a buffer of the (checked) announced length.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<ServerFrame, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    r.read_exact(&mut header).await?;
    let Some(len) = binary::body_len(&header)? else {
        return Err(DecodeError::Malformed("short header".to_owned()).into());
    };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(binary::decode_server(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{Push, PushBody, Reply};

    fn server(frame: &ServerFrame) -> Vec<u8> {
        binary::encode_server(frame)
    }

    fn pong(id: u64) -> ServerFrame {
        ServerFrame::Reply { id, reply: Reply::Pong }
    }

    #[test]
    fn whole_frames_are_split_off_and_partial_ones_wait() {
        let notice = ServerFrame::Push(Push {
            msg: 0,
            body: PushBody::Notice { topic: "t".into(), text: "新年快乐".into() },
        });
        let mut bytes = server(&pong(1));
        bytes.extend(server(&notice));
        // Byte by byte: each frame comes out once all of it is there.
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for b in bytes {
            buf.push(b);
            while let Some(frame) = take(&mut buf).unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, vec![pong(1), notice]);
        assert!(buf.is_empty());
        // Two frames in one read: both, in order, and the rest stays.
        let mut buf = [server(&pong(2)), server(&pong(3)), vec![0, 0]].concat();
        assert_eq!(take(&mut buf).unwrap(), Some(pong(2)));
        assert_eq!(take(&mut buf).unwrap(), Some(pong(3)));
        assert_eq!(take(&mut buf).unwrap(), None);
        assert_eq!(buf, vec![0, 0]);
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut buf = u32::MAX.to_be_bytes().to_vec();
        assert!(matches!(take(&mut buf), Err(DecodeError::TooLarge { .. })));
        let mut buf = vec![0, 0, 0, 2, 0xff, 0xff];
        assert!(take(&mut buf).is_err());
        assert!(buf.is_empty(), "the bad frame's bytes are gone");
    }

    #[test]
    fn client_frames_encode_with_their_header() {
        let bytes = encode(7, Request::Ping);
        assert_eq!(bytes, binary::encode_client(&ClientFrame { id: 7, req: Request::Ping }));
        let len = binary::body_len(&bytes).unwrap().unwrap();
        assert_eq!(binary::decode_client(&bytes[FRAME_HEADER_BYTES..]).unwrap().id, 7);
        assert_eq!(len + FRAME_HEADER_BYTES, bytes.len());
    }

    #[tokio::test]
    async fn read_takes_one_frame_and_leaves_the_rest() {
        let bytes = [server(&pong(1)), server(&pong(2))].concat();
        let mut r: &[u8] = &bytes;
        assert_eq!(read(&mut r).await.unwrap(), pong(1));
        assert_eq!(r.len(), server(&pong(2)).len());
        assert_eq!(read(&mut r).await.unwrap(), pong(2));
        assert!(matches!(read(&mut r).await, Err(FrameError::Io(_))));
        let mut big: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(read(&mut big).await, Err(FrameError::Decode(DecodeError::TooLarge { .. }))));
    }
}
