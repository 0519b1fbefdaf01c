//! The link's messages, their framing, and the batching queue each side
//! writes through.
//!
//! A message on the wire is a 4-byte little-endian length and a postcard
//! body of at most `MESSAGE_BYTES_MAX`. Each side has one writer task that
//! takes everything queued since its last write and sends it in one
//! `write_all`: under load one syscall carries hundreds of requests or
//! replies, which is what keeps a hop between processes cheap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use hongbao_boundary::GateView;
use hongbao_proto::{Request, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::limits::MESSAGE_BYTES_MAX;
use crate::LinkError;

/// Gateway → core.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Up {
    /// First message: the link key the core gave this gateway, and its pid.
    Hello { key: String, pid: u32 },
    /// The gateway's listeners are up and accepting.
    Listening,
    /// Connection `conn` of this gateway said `hello` as `user`.
    Connect { conn: u64, user: u64 },
    /// Connection `conn` of this gateway, of `user`, sends requests here but
    /// is registered for pushes elsewhere (its home SET): no registration.
    Attach { conn: u64, user: u64 },
    /// A request of connection `conn`; the reply carries `id`.
    Request { conn: u64, id: u64, req: Request },
    /// Connection `conn` is gone.
    Disconnect { conn: u64 },
    /// Shakes this gateway answered itself from its `GateView` since the
    /// last report, so the engine's counters include them.
    InlineShakes { none: u64, not_running: u64 },
}

/// Core → gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Down {
    /// A reply or push for connection `conn` (a `Close` ends it).
    Frame { conn: u64, frame: ServerFrame },
    /// A push for every connection of the gateway (a broadcast).
    ToAll(ServerFrame),
    /// The shards' shake gates, sent on link-up and on every change.
    Gate(GateView),
    /// The server is stopping: close every connection and exit.
    Shutdown,
}

/// Appends one framed message to `buf`.
pub(crate) fn encode<T: Serialize>(msg: &T, buf: &mut Vec<u8>) -> Result<(), LinkError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let mut body = std::mem::take(buf);
    body = postcard::to_extend(msg, body).map_err(|e| LinkError::Encode(e.to_string()))?;
    *buf = body;
    let len = buf.len() - start - 4;
    if len > MESSAGE_BYTES_MAX {
        buf.truncate(start);
        return Err(LinkError::TooLarge(len));
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Reads one message; `Ok(None)` on a clean end of stream between messages.
pub(crate) async fn read<T, R>(reader: &mut R, body: &mut Vec<u8>) -> Result<Option<T>, LinkError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(LinkError::Io(e)),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(LinkError::TooLarge(len));
    }
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body).await.map_err(LinkError::Io)?;
    postcard::from_bytes(body).map(Some).map_err(|e| LinkError::Decode(e.to_string()))
}

/// Why a message was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its bound; shed the message.
    Full,
    /// The link is gone.
    Closed,
}

/// Messages waiting for the writer task. Bounded: `push` refuses past
/// `capacity`. `push_always` exists for the one-per-connection messages
/// that must not be lost (a disconnect, a close); at most one of those per
/// connection is ever queued, so the connection cap bounds them.
pub(crate) struct SendQueue<T> {
    capacity: usize,
    items: Mutex<Vec<T>>,
    closed: AtomicBool,
    ready: Notify,
}

impl<T> SendQueue<T> {
    pub(crate) fn new(capacity: usize) -> SendQueue<T> {
        SendQueue { capacity, items: Mutex::new(Vec::new()), closed: AtomicBool::new(false), ready: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        hongbao_boundary::sync::lock(&self.items)
    }

    pub(crate) fn push(&self, item: T) -> Result<(), Refused> {
        self.push_inner(item, false)
    }

    pub(crate) fn push_always(&self, item: T) -> Result<(), Refused> {
        self.push_inner(item, true)
    }

    fn push_inner(&self, item: T, always: bool) -> Result<(), Refused> {
        let mut items = self.lock();
        // Checked under the lock: the writer's last `take` (which also
        // holds it) then either gets this item or has already seen `closed`.
        if self.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        if !always && items.len() >= self.capacity {
            return Err(Refused::Full);
        }
        let was_empty = items.is_empty();
        items.push(item);
        drop(items);
        if was_empty {
            // A stored permit if the writer is not waiting yet: no lost wake-up.
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Refuses later pushes and wakes the writer so it can finish.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Everything queued, oldest first; waits while there is nothing.
    /// `None` once closed and drained.
    async fn take(&self) -> Option<Vec<T>> {
        loop {
            let (items, closed) = {
                let mut queued = self.lock();
                (std::mem::take(&mut *queued), self.closed.load(Ordering::Acquire))
            };
            if !items.is_empty() {
                return Some(items);
            }
            if closed {
                return None;
            }
            self.ready.notified().await;
        }
    }
}

/// The writer task of one side: sends what is queued, in batches, until the
/// queue is closed and drained or the peer is gone.
pub(crate) async fn write_loop<T: Serialize, W: AsyncWrite + Unpin>(
    queue: &SendQueue<T>,
    mut writer: W,
) -> Result<(), LinkError> {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(batch) = queue.take().await {
        buf.clear();
        for msg in &batch {
            if let Err(e) = encode(msg, &mut buf) {
                // One bad message (e.g. a frame past the size limit) is
                // dropped; the rest of the batch still goes.
                tracing::warn!(error = %e, "link message not sent");
            }
        }
        metrics::histogram!("hongbao_link_batch_messages").record(batch.len() as f64);
        drop(batch);
        if let Err(e) = writer.write_all(&buf).await {
            // Nothing queued from now on could be sent: refuse it.
            queue.close();
            return Err(LinkError::Io(e));
        }
        if buf.capacity() > BUF_KEPT_BYTES {
            // A broadcast's burst should not stay allocated.
            buf = Vec::with_capacity(64 * 1024);
        }
    }
    writer.shutdown().await.map_err(LinkError::Io)
}

/// Write buffer kept between batches; a larger one is freed after use.
const BUF_KEPT_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{ErrorCode, Reply};

    #[tokio::test]
    async fn messages_survive_the_trip_in_order_and_in_batches() {
        let queue = SendQueue::new(16);
        let sent = vec![
            Up::Hello { key: "k".into(), pid: 7 },
            Up::Connect { conn: 1, user: 42 },
            Up::Request { conn: 1, id: 9, req: Request::Shake { campaign: 0, key: None } },
            Up::Disconnect { conn: 1 },
        ];
        for m in &sent {
            queue.push(m.clone()).unwrap();
        }
        queue.close();
        let (a, mut b) = tokio::io::duplex(1 << 16);
        write_loop(&queue, a).await.unwrap();
        let mut body = Vec::new();
        let mut got = Vec::new();
        while let Some(m) = read::<Up, _>(&mut b, &mut body).await.unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn the_queue_is_bounded_except_for_must_not_lose_messages() {
        let queue = SendQueue::new(2);
        assert_eq!(queue.push(1), Ok(()));
        assert_eq!(queue.push(2), Ok(()));
        assert_eq!(queue.push(3), Err(Refused::Full));
        assert_eq!(queue.push_always(4), Ok(()));
        queue.close();
        assert_eq!(queue.push_always(5), Err(Refused::Closed));
    }

    #[tokio::test]
    async fn oversized_and_garbage_messages_are_errors_not_panics() {
        let mut buf = Vec::new();
        let huge = Down::Frame {
            conn: 1,
            frame: ServerFrame::Reply {
                id: 1,
                reply: Reply::error(ErrorCode::Internal, "x".repeat(MESSAGE_BYTES_MAX)),
            },
        };
        assert!(matches!(encode(&huge, &mut buf), Err(LinkError::TooLarge(_))));
        assert!(buf.is_empty(), "nothing half-written");

        let mut body = Vec::new();
        let too_long = (MESSAGE_BYTES_MAX as u32 + 1).to_le_bytes();
        let r = read::<Down, _>(&mut &too_long[..], &mut body).await;
        assert!(matches!(r, Err(LinkError::TooLarge(_))));
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        let r = read::<Down, _>(&mut &garbage[..], &mut body).await;
        assert!(matches!(r, Err(LinkError::Decode(_))));
        let cut = [9u8, 0, 0, 0, 1];
        let r = read::<Down, _>(&mut &cut[..], &mut body).await;
        assert!(matches!(r, Err(LinkError::Io(_))));
    }
}
