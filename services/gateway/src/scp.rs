//! The C-STORE entry: the `tessera-scp` service class provider hands each
//! received instance to [`GatewaySink`], which stores it exactly as
//! StoreDicom does, for the owner the config names. A modality or PACS sends
//! without change; statuses follow PS3.4 Annex B.

use std::sync::Arc;
use std::time::Duration;

use tessera_scp::{InstanceSink, Received, ScpConfig, StoreOutcome};

use crate::config::ScpSection;
use crate::error::GatewayError;
use crate::shared::GatewayService;

/// Refused: out of resources.
pub const STATUS_OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: cannot understand.
pub const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;
/// Duplicate SOP instance (same UID, other bytes).
pub const STATUS_DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
/// Processing failure.
pub const STATUS_PROCESSING_FAILURE: u16 = 0x0110;

/// Where received instances go: the gateway's DICOM store.
pub struct GatewaySink {
    service: GatewayService,
    owner: String,
    /// The configured Tessera identity recorded as `stored_by`.
    stored_by: String,
}

impl GatewaySink {
    /// `stored_by`: the Tessera identity recorded for every instance
    /// received (`dicom.scp.stored_by`); the unauthenticated calling AE
    /// title is only logged and kept in the file's (0002,0016).
    pub fn new(service: GatewayService, owner: String, stored_by: String) -> Arc<Self> {
        Arc::new(Self {
            service,
            owner,
            stored_by,
        })
    }
}

/// The C-STORE status of a store error.
pub fn status_of(e: &GatewayError) -> u16 {
    match e {
        GatewayError::InvalidArgument(_) => STATUS_CANNOT_UNDERSTAND,
        GatewayError::TooLarge(_) => STATUS_OUT_OF_RESOURCES,
        GatewayError::AlreadyExists(_) => STATUS_DUPLICATE_SOP_INSTANCE,
        GatewayError::NotFound(_)
        | GatewayError::PermissionDenied(_)
        | GatewayError::Unavailable(_)
        | GatewayError::WrongKind(_)
        | GatewayError::DataLoss(_)
        | GatewayError::Upstream { .. }
        | GatewayError::Vault(_)
        | GatewayError::Internal(_)
        | GatewayError::Idle(_) => STATUS_PROCESSING_FAILURE,
    }
}

impl InstanceSink for GatewaySink {
    async fn store(&self, received: Received) -> StoreOutcome {
        let stored_by = self.stored_by.clone();
        let peer = received.peer;
        let result = match self.service.job_permit(received.file.len() as u64).await {
            Ok(_permit) => {
                self.service
                    .store_dicom_file(stored_by, self.owner.clone(), received.file)
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(r) => {
                tracing::info!(%peer, calling_ae = %received.calling_ae, study = %r.study_handle, instance = %r.instance_id, duplicate = r.duplicate, "C-STORE stored");
                StoreOutcome::Stored
            }
            Err(e) => {
                tracing::warn!(%peer, calling_ae = %received.calling_ae, error = %e, "C-STORE refused");
                StoreOutcome::Refused {
                    status: status_of(&e),
                    reason: e.to_string(),
                }
            }
        }
    }
}

/// The SCP settings of a `[dicom.scp]` section.
pub fn scp_config(s: &ScpSection, max_instance_bytes: u64) -> ScpConfig {
    ScpConfig {
        ae_title: s.ae_title.clone(),
        allowed_calling_aes: s.allowed_calling_aes.clone(),
        max_instance_bytes,
        max_associations: s.max_associations as usize,
        idle_timeout: Duration::from_secs(s.idle_timeout_secs),
        artim_timeout: Duration::from_secs(s.artim_timeout_secs),
        ..ScpConfig::default()
    }
}
