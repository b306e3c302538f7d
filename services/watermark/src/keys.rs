//! Study keys from the keyserver: `DeriveKey(study, attributes, "pixels",
//! operation)` over mutual TLS with this service's own certificate. The key
//! lives only for the request that derived it.

use tessera_cryptomark::StudyKey;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::{ClientTls, Identity};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::KeyserverSection;
use crate::convert::{PURPOSE_PIXELS, StudyRef};
use crate::error::WatermarkError;

/// Why the key is derived (audited by the keyserver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Protect,
    Restore,
}

/// A client of the keyserver. Cheap to clone; connects on first use and
/// reconnects, so the service starts even while the keyserver is down.
#[derive(Clone, Debug)]
pub struct KeyClient {
    client: KeyServerClient<Channel>,
}

impl KeyClient {
    /// Loads the client TLS material and prepares a lazy channel that
    /// accepts only `identity` at the other end, with the configured
    /// timeouts.
    pub fn new(cfg: &KeyserverSection, identity: &Identity) -> Result<Self, tessera_tls::TlsError> {
        let channel = ClientTls::from_files(&cfg.tls)?
            .expecting(identity)
            .with_timeouts(cfg.timeouts())
            .connect_lazy(&cfg.address)?;
        Ok(Self {
            client: KeyServerClient::new(channel),
        })
    }

    /// Derives the study's pixel key.
    pub async fn derive(&self, study: &StudyRef, why: Purpose) -> Result<StudyKey, WatermarkError> {
        let operation = match why {
            Purpose::Protect => ks::Operation::Protect,
            Purpose::Restore => ks::Operation::Restore,
        };
        let mut request = tonic::Request::new(ks::DeriveKeyRequest {
            study_id: study.study_id.clone(),
            attributes: study.attributes.clone(),
            purpose: PURPOSE_PIXELS.into(),
            operation: operation.into(),
        });
        // Carry the trace context of this RPC to the keyserver.
        if let Ok(r) = tessera_runtime::telemetry::inject_context(tonic::Request::new(())) {
            *request.metadata_mut() = r.metadata().clone();
        }
        let resp = self
            .client
            .clone()
            .derive_key(request)
            .await
            .map_err(|s| keyserver_error(tessera_tls::deadline_status(s)))?
            .into_inner();
        // The response's copy is wiped here, the StudyKey's when dropped.
        let raw = zeroize::Zeroizing::new(resp.key);
        let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            WatermarkError::KeyserverFailed(format!(
                "derived key is {} bytes, expected 32",
                raw.len()
            ))
        })?;
        Ok(StudyKey::from_bytes(bytes))
    }
}

/// Maps the keyserver's answer to ours. Exhaustive over gRPC codes.
fn keyserver_error(s: Status) -> WatermarkError {
    let m = s.message().to_owned();
    match s.code() {
        Code::PermissionDenied => WatermarkError::KeyDenied(m),
        Code::NotFound => WatermarkError::StudyNotFound(m),
        Code::InvalidArgument => WatermarkError::KeyRequestInvalid(m),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            WatermarkError::KeyserverUnavailable(format!("{:?}: {m}", s.code()))
        }
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => WatermarkError::KeyserverFailed(format!("{:?}: {m}", s.code())),
    }
}
