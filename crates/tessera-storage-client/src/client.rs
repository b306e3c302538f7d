//! The client functions; re-exported at the crate root.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tessera_proto::storage::v1 as pb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_runtime::MAX_MESSAGE_BYTES;
use tessera_segment::{Fragment, FragmentOutput, Mapping, Operation};
use tessera_tls::Channel;
use tonic::Status;

/// Bytes per chunk message a client sends.
pub const CLIENT_CHUNK: usize = 1024 * 1024;

/// A client with Tessera's message limits.
pub fn client(channel: Channel) -> StorageNodeClient<Channel> {
    StorageNodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The messages of a put: header (with the SHA-256), then 1 MiB chunks.
pub fn put_messages(object_id: &str, data: &[u8]) -> Vec<pb::PutRequest> {
    let mut msgs = Vec::with_capacity(data.len() / CLIENT_CHUNK + 2);
    msgs.push(pb::PutRequest {
        part: Some(pb::put_request::Part::Header(pb::PutHeader {
            object_id: object_id.to_owned(),
            size: data.len() as u64,
            sha256: Sha256::digest(data).to_vec(),
        })),
    });
    for chunk in data.chunks(CLIENT_CHUNK) {
        msgs.push(pb::PutRequest {
            part: Some(pb::put_request::Part::Chunk(chunk.to_vec())),
        });
    }
    msgs
}

/// [`put_messages`] of owned bytes, encoded lazily: one chunk copied at a
/// time as the stream is sent, the object released after its last chunk
/// (so a caller streaming several objects holds each once, not twice).
pub fn put_messages_owned(
    object_id: &str,
    data: Vec<u8>,
) -> impl Iterator<Item = pb::PutRequest> + Send + 'static {
    let header = pb::PutRequest {
        part: Some(pb::put_request::Part::Header(pb::PutHeader {
            object_id: object_id.to_owned(),
            size: data.len() as u64,
            sha256: Sha256::digest(&data).to_vec(),
        })),
    };
    std::iter::once(header).chain(
        tessera_wire::stream::owned_chunks_of(data, CLIENT_CHUNK).map(|c| pb::PutRequest {
            part: Some(pb::put_request::Part::Chunk(c)),
        }),
    )
}

/// [`put_object`] of owned bytes: the same messages, encoded lazily (see
/// [`put_messages_owned`]).
pub async fn put_object_owned(
    client: &mut StorageNodeClient<Channel>,
    object_id: &str,
    data: Vec<u8>,
) -> Result<pb::PutResponse, Status> {
    let msgs = put_messages_owned(object_id, data);
    Ok(client.put(tokio_stream::iter(msgs)).await?.into_inner())
}

/// Streams `data` to the node under `object_id`.
pub async fn put_object(
    client: &mut StorageNodeClient<Channel>,
    object_id: &str,
    data: &[u8],
) -> Result<pb::PutResponse, Status> {
    let msgs = put_messages(object_id, data);
    Ok(client.put(tokio_stream::iter(msgs)).await?.into_inner())
}

/// Replaces an object (objects are immutable: delete, then put), e.g. a
/// test or the demo playing a cloud that alters what it holds.
pub async fn replace_object(
    client: &mut StorageNodeClient<Channel>,
    object_id: &str,
    data: &[u8],
) -> Result<pb::PutResponse, Status> {
    client
        .delete(pb::DeleteRequest {
            object_id: object_id.to_owned(),
        })
        .await?;
    put_object(client, object_id, data).await
}

/// Fetches an object and checks it against the SHA-256 the node sent.
pub async fn get_object(
    client: &mut StorageNodeClient<Channel>,
    object_id: &str,
) -> Result<(pb::ObjectInfo, Vec<u8>), Status> {
    let mut stream = client
        .get(pb::GetRequest {
            object_id: object_id.to_owned(),
        })
        .await?
        .into_inner();
    let info = match stream.message().await? {
        Some(pb::GetResponse {
            part: Some(pb::get_response::Part::Info(info)),
        }) => info,
        _ => {
            return Err(Status::internal(
                "get: the first message was not the object info",
            ));
        }
    };
    let mut data = Vec::with_capacity(usize::try_from(info.size).unwrap_or(0).min(1 << 30));
    while let Some(msg) = stream.message().await? {
        match msg.part {
            Some(pb::get_response::Part::Chunk(c)) => data.extend_from_slice(&c),
            _ => return Err(Status::internal("get: unexpected message after the info")),
        }
    }
    if data.len() as u64 != info.size || Sha256::digest(&data)[..] != info.sha256[..] {
        return Err(Status::data_loss(format!(
            "object {object_id}: received bytes do not match the node's SHA-256"
        )));
    }
    Ok((info, data))
}

/// Has the node apply `op` to `fragment` (paper 000: one region per cloud)
/// and returns the processed cores, checked against the fragment we sent:
/// same region, the fragment's tile cores in order, exactly each core's
/// samples (buffers sized from our fragment, never from the answer).
///
/// `mapping` must be given exactly for histogram equalization (the global
/// mapping the caller computed from the whole image, e.g. with
/// `tessera_wire::histeq_mapping`); otherwise INVALID_ARGUMENT before
/// anything is sent. The node's own refusals come back as its status
/// (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED over its limits,
/// PERMISSION_DENIED unless the caller is in its `process.allowed_callers`);
/// a malformed answer is INTERNAL ("the storage node sent a malformed
/// response: ...").
///
/// The request is encoded lazily from a copy of the fragment (the request
/// stream must own its data).
pub async fn process_fragment(
    client: &mut StorageNodeClient<Channel>,
    fragment: &Fragment,
    op: Operation,
    mapping: Option<&Mapping>,
) -> Result<FragmentOutput, Status> {
    match (op.is_global(), mapping) {
        (true, Some(m)) => m
            .validate_for(fragment.spec.format, fragment.spec.frames)
            .map_err(|e| Status::invalid_argument(format!("mapping: {e}")))?,
        (false, None) => {}
        (true, None) => {
            return Err(Status::invalid_argument(format!(
                "{op} needs the image's global mapping"
            )));
        }
        (false, Some(_)) => {
            return Err(Status::invalid_argument(format!("{op} takes no mapping")));
        }
    }
    let requests = tessera_wire::process_requests(Arc::new(fragment.clone()), op, mapping);
    let stream = client
        .process(tokio_stream::iter(requests))
        .await?
        .into_inner();
    tessera_wire::decode_output(stream, fragment, "the storage node").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_messages_are_the_borrowed_ones() {
        for len in [0, 1, CLIENT_CHUNK - 1, CLIENT_CHUNK, 2 * CLIENT_CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let borrowed = put_messages("obj", &data);
            let owned: Vec<_> = put_messages_owned("obj", data.clone()).collect();
            assert_eq!(owned, borrowed, "{len} bytes");
        }
    }
}
