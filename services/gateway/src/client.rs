//! Client helpers for callers of the gateway (the `tessera` CLI, tests,
//! benchmarks): chunked store and checked retrieve / process.

use sha2::{Digest, Sha256};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_runtime::MAX_MESSAGE_BYTES;
use tessera_tls::Channel;
use tonic::Status;

use crate::convert::CHUNK_BYTES;

/// A client with Tessera's message limits.
pub fn client(channel: Channel) -> GatewayClient<Channel> {
    GatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The messages of a store: the header (its `size` set from `file`), then
/// 1 MiB chunks.
pub fn store_messages(mut header: pb::StoreHeader, file: &[u8]) -> Vec<pb::StoreRequest> {
    header.size = file.len() as u64;
    let mut msgs = Vec::with_capacity(file.len() / CHUNK_BYTES + 2);
    msgs.push(pb::StoreRequest {
        part: Some(pb::store_request::Part::Header(header)),
    });
    for c in file.chunks(CHUNK_BYTES) {
        msgs.push(pb::StoreRequest {
            part: Some(pb::store_request::Part::Chunk(c.to_vec())),
        });
    }
    msgs
}

/// Stores a file; returns the study handle and placements.
pub async fn store(
    client: &mut GatewayClient<Channel>,
    header: pb::StoreHeader,
    file: &[u8],
) -> Result<pb::StoreResponse, Status> {
    store_with_progress(client, header, file, |_, _| {}).await
}

/// [`store`], calling `progress(sent, total)` as chunks leave.
pub async fn store_with_progress(
    client: &mut GatewayClient<Channel>,
    header: pb::StoreHeader,
    file: &[u8],
    mut progress: impl FnMut(u64, u64) + Send + 'static,
) -> Result<pb::StoreResponse, Status> {
    let total = file.len() as u64;
    let mut sent = 0u64;
    let msgs = store_messages(header, file).into_iter().inspect(move |m| {
        if let Some(pb::store_request::Part::Chunk(c)) = &m.part {
            sent += c.len() as u64;
            progress(sent, total);
        }
    });
    Ok(client.store(tokio_stream::iter(msgs)).await?.into_inner())
}

fn spec_bytes(spec: Option<&tessera_proto::watermark::v1::ImageSpec>) -> Result<u64, Status> {
    let s = spec.ok_or_else(|| Status::internal("the answer carries no image spec"))?;
    let bytes = if s.bits_allocated > 8 { 2u64 } else { 1 };
    let n = u64::from(s.width)
        .checked_mul(u64::from(s.height))
        .and_then(|v| v.checked_mul(u64::from(s.frames.max(1))))
        .and_then(|v| v.checked_mul(u64::from(s.channels)))
        .and_then(|v| v.checked_mul(bytes))
        .filter(|&v| v <= tessera_image::MAX_SAMPLES * 2)
        .ok_or_else(|| Status::internal("the answer's image spec is out of range"))?;
    Ok(n)
}

/// Collects header + chunks, bounding the buffer by the header's spec and
/// checking the SHA-256 the gateway announced.
async fn collect<M, H>(
    mut stream: tonic::Streaming<M>,
    split: impl Fn(M) -> Option<Result<H, Vec<u8>>>,
    spec_of: impl Fn(&H) -> (Option<&tessera_proto::watermark::v1::ImageSpec>, &[u8]),
    mut progress: impl FnMut(u64, u64),
) -> Result<(H, Vec<u8>), Status> {
    let header = match stream.message().await? {
        Some(m) => match split(m) {
            Some(Ok(h)) => h,
            Some(Err(_)) | None => {
                return Err(Status::internal("the first message was not a header"));
            }
        },
        None => return Err(Status::internal("empty answer")),
    };
    let (spec, sha) = spec_of(&header);
    let want = spec_bytes(spec)?;
    let sha = sha.to_vec();
    let mut data = Vec::with_capacity(want as usize);
    while let Some(m) = stream.message().await? {
        match split(m) {
            Some(Err(c)) => {
                if data.len() as u64 + c.len() as u64 > want {
                    return Err(Status::internal("more pixels than the spec holds"));
                }
                data.extend_from_slice(&c);
                progress(data.len() as u64, want);
            }
            Some(Ok(_)) | None => return Err(Status::internal("unexpected message")),
        }
    }
    if data.len() as u64 != want {
        return Err(Status::internal("fewer pixels than the spec holds"));
    }
    if Sha256::digest(&data)[..] != sha[..] {
        return Err(Status::data_loss(
            "pixels do not match the announced SHA-256",
        ));
    }
    Ok((header, data))
}

/// Retrieves a study: the header (spec, report, identity if allowed) and the
/// pixels (little-endian words).
pub async fn retrieve(
    client: &mut GatewayClient<Channel>,
    study_handle: &str,
    key_request_id: &str,
) -> Result<(pb::RetrieveHeader, Vec<u8>), Status> {
    let request = pb::RetrieveRequest {
        study_handle: study_handle.to_owned(),
        key_request_id: key_request_id.to_owned(),
        allow_tampered: false,
    };
    retrieve_with_progress(client, request, |_, _| {}).await
}

/// [`retrieve`] of any request (e.g. `allow_tampered`), calling
/// `progress(received, total)` per chunk.
pub async fn retrieve_with_progress(
    client: &mut GatewayClient<Channel>,
    request: pb::RetrieveRequest,
    progress: impl FnMut(u64, u64),
) -> Result<(pb::RetrieveHeader, Vec<u8>), Status> {
    let stream = client.retrieve(request).await?.into_inner();
    collect(
        stream,
        |m: pb::RetrieveResponse| match m.part {
            Some(pb::retrieve_response::Part::Header(h)) => Some(Ok(h)),
            Some(pb::retrieve_response::Part::Chunk(c)) => Some(Err(c)),
            None => None,
        },
        |h: &pb::RetrieveHeader| (h.spec.as_ref(), h.pixels_sha256.as_slice()),
        progress,
    )
    .await
}

/// Runs a region-wise operation across the storage nodes.
pub async fn process(
    client: &mut GatewayClient<Channel>,
    request: pb::ProcessRequest,
) -> Result<(pb::ProcessHeader, Vec<u8>), Status> {
    let stream = client.process(request).await?.into_inner();
    collect(
        stream,
        |m: pb::ProcessResponse| match m.part {
            Some(pb::process_response::Part::Header(h)) => Some(Ok(h)),
            Some(pb::process_response::Part::Chunk(c)) => Some(Err(c)),
            None => None,
        },
        |h: &pb::ProcessHeader| (h.spec.as_ref(), h.pixels_sha256.as_slice()),
        |_, _| {},
    )
    .await
}

/// Stores one DICOM Part 10 file for `owner`.
pub async fn store_dicom(
    client: &mut GatewayClient<Channel>,
    owner: &str,
    file: &[u8],
) -> Result<pb::StoreDicomResponse, Status> {
    let mut msgs = Vec::with_capacity(file.len() / CHUNK_BYTES + 2);
    msgs.push(pb::StoreDicomRequest {
        part: Some(pb::store_dicom_request::Part::Header(
            pb::StoreDicomHeader {
                owner: owner.to_owned(),
                size: file.len() as u64,
            },
        )),
    });
    for c in file.chunks(CHUNK_BYTES) {
        msgs.push(pb::StoreDicomRequest {
            part: Some(pb::store_dicom_request::Part::Chunk(c.to_vec())),
        });
    }
    Ok(client
        .store_dicom(tokio_stream::iter(msgs))
        .await?
        .into_inner())
}

/// Largest DICOM file a client accepts from the gateway.
pub const MAX_DICOM_FILE_BYTES: u64 = 1 << 31;

/// Retrieves every instance of a DICOM study, calling `on_instance` with
/// each header and file (size and SHA-256 checked) as it arrives.
pub async fn retrieve_dicom(
    client: &mut GatewayClient<Channel>,
    study_handle: &str,
    key_request_id: &str,
    mut on_instance: impl FnMut(pb::DicomInstanceHeader, Vec<u8>) -> Result<(), Status>,
) -> Result<u32, Status> {
    let mut stream = client
        .retrieve_dicom(pb::RetrieveRequest {
            study_handle: study_handle.to_owned(),
            key_request_id: key_request_id.to_owned(),
            allow_tampered: false,
        })
        .await?
        .into_inner();
    let mut current: Option<(pb::DicomInstanceHeader, Vec<u8>)> = None;
    let mut done = 0u32;
    let mut finish =
        |cur: Option<(pb::DicomInstanceHeader, Vec<u8>)>, done: &mut u32| -> Result<(), Status> {
            if let Some((h, data)) = cur {
                if data.len() as u64 != h.size {
                    return Err(Status::data_loss(format!(
                        "instance {}: {} bytes received, {} announced",
                        h.instance_id,
                        data.len(),
                        h.size
                    )));
                }
                if Sha256::digest(&data)[..] != h.sha256[..] {
                    return Err(Status::data_loss(format!(
                        "instance {}: bytes do not match the announced SHA-256",
                        h.instance_id
                    )));
                }
                *done += 1;
                on_instance(h, data)?;
            }
            Ok(())
        };
    while let Some(m) = stream.message().await? {
        match m.part {
            Some(pb::retrieve_dicom_response::Part::Instance(h)) => {
                finish(current.take(), &mut done)?;
                if h.size > MAX_DICOM_FILE_BYTES {
                    return Err(Status::internal("an instance larger than 2 GiB announced"));
                }
                let cap = h.size as usize;
                current = Some((h, Vec::with_capacity(cap)));
            }
            Some(pb::retrieve_dicom_response::Part::Chunk(c)) => {
                let Some((h, data)) = current.as_mut() else {
                    return Err(Status::internal("bytes before an instance header"));
                };
                if data.len() as u64 + c.len() as u64 > h.size {
                    return Err(Status::internal("more bytes than the instance announced"));
                }
                data.extend_from_slice(&c);
            }
            None => return Err(Status::internal("empty message")),
        }
    }
    finish(current.take(), &mut done)?;
    Ok(done)
}
