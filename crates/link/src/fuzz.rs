//! Entry points for the fuzz targets in `fuzz/`, compiled only with
//! `--cfg fuzzing` (which `cargo fuzz` sets), so the product's public API
//! does not grow: the link's message framing (`wire`), as each side reads
//! it (the core reads `Up` from gateways, a gateway reads `Down`).

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

pub use crate::limits::MESSAGE_BYTES_MAX;
pub use crate::wire::{Down, Up};
use crate::LinkError;

/// `wire::read`: one `[u32 LE length][postcard]` message; `Ok(None)` on a
/// clean end of stream. `body` is the reader's reused buffer.
pub async fn read<T, R>(reader: &mut R, body: &mut Vec<u8>) -> Result<Option<T>, LinkError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    crate::wire::read(reader, body).await
}

/// `wire::encode`: appends one framed message to `buf`.
pub fn encode<T: Serialize>(msg: &T, buf: &mut Vec<u8>) -> Result<(), LinkError> {
    crate::wire::encode(msg, buf)
}
