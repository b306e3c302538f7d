//! Upload streams (Store, StoreDicom): the header first, then exactly the
//! declared bytes in bounded chunks; stream errors mapped to the gateway's.

use tessera_runtime::IdleStream;
use tonic::{Code, Status};

use crate::convert;
use crate::error::GatewayError;
use crate::shared::Result;

pub(crate) fn stream_err(s: Status) -> GatewayError {
    match s.code() {
        Code::ResourceExhausted | Code::OutOfRange => GatewayError::TooLarge(s.message().into()),
        Code::DeadlineExceeded => GatewayError::Idle(s.message().into()),
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => {
            GatewayError::InvalidArgument(format!("request stream: {}", s.message()))
        }
    }
}

/// The first message of an upload stream, which must be its header.
pub(crate) async fn first_header<M, H>(
    stream: &mut IdleStream<M>,
    header: impl Fn(M) -> Option<H>,
) -> Result<H> {
    match stream.message().await.map_err(stream_err)? {
        Some(m) => header(m).ok_or_else(|| {
            GatewayError::InvalidArgument("the first message must be the header".into())
        }),
        None => Err(GatewayError::InvalidArgument("empty request stream".into())),
    }
}

/// What a message of an upload stream after its header carries.
pub(crate) enum Part {
    Chunk(Vec<u8>),
    Header,
    Empty,
}

/// Bytes of an upload [`read_exact`] shows its `peek` before reading on:
/// enough for a file's own header (a PNG's IHDR ends at byte 33).
pub(crate) const PEEK_BYTES: usize = 64;

/// Reads exactly `size` bytes of chunks, refusing more before storing them.
/// `peek` sees the first [`PEEK_BYTES`] (or all, if fewer) once they are
/// in: its error ends the upload there, before the rest is read.
pub(crate) async fn read_exact<M>(
    stream: &mut IdleStream<M>,
    size: u64,
    part: impl Fn(M) -> Part,
    mut peek: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size as usize);
    let peek_at = (PEEK_BYTES as u64).min(size) as usize;
    let mut peeked = false;
    while let Some(m) = stream.message().await.map_err(stream_err)? {
        match part(m) {
            Part::Chunk(c) => {
                if c.len() > convert::CHUNK_BYTES {
                    return Err(GatewayError::InvalidArgument(format!(
                        "chunk: {} bytes, at most {} per message",
                        c.len(),
                        convert::CHUNK_BYTES
                    )));
                }
                if data.len() as u64 + c.len() as u64 > size {
                    return Err(GatewayError::InvalidArgument(format!(
                        "chunk: more than the {size} bytes header.size declares"
                    )));
                }
                data.extend_from_slice(&c);
                if !peeked && data.len() >= peek_at {
                    peeked = true;
                    peek(&data[..peek_at])?;
                }
            }
            Part::Header => {
                return Err(GatewayError::InvalidArgument("header: sent twice".into()));
            }
            Part::Empty => {
                return Err(GatewayError::InvalidArgument("chunk: empty message".into()));
            }
        }
    }
    if data.len() as u64 != size {
        return Err(GatewayError::InvalidArgument(format!(
            "chunk: {} bytes received, header.size declares {size}",
            data.len()
        )));
    }
    Ok(data)
}
