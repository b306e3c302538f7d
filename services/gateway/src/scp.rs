//! The DIMSE entry: the `tessera-scp` service class provider hands each
//! received instance to [`GatewaySink`], which stores it exactly as
//! StoreDicom does, for the owner the config names. A modality or PACS sends
//! without change; statuses follow PS3.4 Annex B.
//!
//! Query/retrieve (C-FIND, C-GET, C-MOVE, Study Root): the calling AE title
//! of a `[[dicom.scp.peers]]` entry stands for its Tessera identity (only
//! from its networks, checked at association); that identity's roles and
//! grants decide what is answered and read (`flows/dicom/query.rs`,
//! `get_move.rs`), exactly as over gRPC.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_scp::{
    FindOutcome, FindRequest, InstanceSink, QueryKey, Received, RetrieveKind, RetrieveOutcome,
    RetrieveRequest, ScpConfig, StoreOutcome,
};
use tessera_tls::{Identity, Role, RoleMap};

use crate::config::ScpSection;
use crate::error::GatewayError;
use crate::flows::dicom::query::DicomPeer;
use crate::shared::GatewayService;

/// Refused: out of resources.
pub const STATUS_OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: cannot understand.
pub const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;
/// Duplicate SOP instance (same UID, other bytes).
pub const STATUS_DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
/// Processing failure.
pub const STATUS_PROCESSING_FAILURE: u16 = 0x0110;

/// Refused: not authorized (PS3.7 C.5).
pub const STATUS_NOT_AUTHORIZED: u16 = 0x0124;

/// Where received instances go: the gateway's DICOM store; and what
/// query/retrieve peers may see.
pub struct GatewaySink {
    service: GatewayService,
    owner: String,
    /// The configured Tessera identity recorded as `stored_by`.
    stored_by: String,
    /// AE titles that may C-STORE (None: every AE the SCP admits).
    store_aes: Option<Vec<String>>,
    /// Calling AE title -> the peer it stands for.
    peers: Vec<(String, DicomPeer)>,
    /// Roles of certificate identities (DICOM TLS).
    roles: RoleMap,
    /// Calling AE title -> the request whose grant its retrieves spend
    /// (`[[dicom.scp.peers]] request`).
    requests: Vec<(String, String)>,
}

impl GatewaySink {
    /// `stored_by`: the Tessera identity recorded for every instance
    /// received (`dicom.scp.stored_by`); the unauthenticated calling AE
    /// title is only logged and kept in the file's (0002,0016).
    pub fn new(service: GatewayService, owner: String, stored_by: String) -> Arc<Self> {
        Self::with_peers(service, owner, stored_by, None, &RoleMap::new())
    }

    /// As [`Self::new`], with the query/retrieve peers of `section` (their
    /// roles from `roles`) and its C-STORE AE titles.
    pub fn with_peers(
        service: GatewayService,
        owner: String,
        stored_by: String,
        section: Option<&ScpSection>,
        roles: &RoleMap,
    ) -> Arc<Self> {
        let peers = section
            .map(|s| {
                s.peers
                    .iter()
                    .map(|p| {
                        let roles: BTreeSet<Role> = Identity::parse_uri(&p.identity)
                            .map(|id| roles.roles_of(&id))
                            .unwrap_or_default();
                        (
                            p.ae_title.trim().to_string(),
                            DicomPeer {
                                identity: p.identity.clone(),
                                roles,
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let requests = section
            .map(|s| {
                s.peers
                    .iter()
                    .filter_map(|p| Some((p.ae_title.trim().to_string(), p.request.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let store_aes = section.map(|s| {
            s.allowed_calling_aes
                .iter()
                .map(|a| a.trim().to_string())
                .collect()
        });
        Arc::new(Self {
            service,
            owner,
            stored_by,
            store_aes,
            peers,
            roles: roles.clone(),
            requests,
        })
    }

    fn peer(&self, calling_ae: &str) -> Option<&DicomPeer> {
        self.peers
            .iter()
            .find(|(ae, _)| ae == calling_ae.trim())
            .map(|(_, p)| p)
    }

    /// The peer of a query/retrieve request, or the refusal (logged): on
    /// DICOM TLS the client certificate's identity (and its roles), else
    /// the identity the calling AE title is bound to.
    fn peer_or_refuse(
        &self,
        calling_ae: &str,
        tls_identity: Option<&str>,
        peer: SocketAddr,
        op: &str,
    ) -> Result<DicomPeer, (u16, String)> {
        if let Some(id) = tls_identity {
            return Identity::parse_uri(id)
                .map(|parsed| DicomPeer {
                    identity: id.to_string(),
                    roles: self.roles.roles_of(&parsed),
                })
                .map_err(|e| {
                    let reason = format!("client certificate identity {id:?}: {e}");
                    tessera_tls::security::refused("gateway", id, op, &reason);
                    (STATUS_NOT_AUTHORIZED, reason)
                });
        }
        self.peer(calling_ae).cloned().ok_or_else(|| {
            let reason = format!("calling AE title {calling_ae:?} is not a query/retrieve peer");
            tessera_tls::security::refused(
                "gateway",
                &format!("dicom-ae:{calling_ae}@{peer}"),
                op,
                &reason,
            );
            (STATUS_NOT_AUTHORIZED, reason)
        })
    }
}

fn keys_of(keys: &[QueryKey]) -> Vec<((u16, u16), String)> {
    keys.iter().map(|k| (k.tag, k.value.clone())).collect()
}

/// The DIMSE status of a query/retrieve error, and its Error Comment (64
/// characters at most: the whole reason is logged).
fn qr_refusal(e: &GatewayError) -> (u16, String) {
    match e {
        // Error Comment holds 64 characters: the whole reason is in the
        // security log.
        GatewayError::PermissionDenied(m) => (
            STATUS_NOT_AUTHORIZED,
            match crate::flows::dicom::get_move::filed_request(m) {
                Some(rid) => format!("no grant; owner asked: {rid}"),
                None => "no grant: ask with tessera request-key / RequestAccess".into(),
            },
        ),
        GatewayError::InvalidArgument(m) => (tessera_scp::STATUS_IDENTIFIER_MISMATCH, m.clone()),
        GatewayError::WrongKind(m) => (tessera_scp::STATUS_SUBOPS_IMPOSSIBLE, m.clone()),
        GatewayError::NotFound(_)
        | GatewayError::TooLarge(_)
        | GatewayError::AlreadyExists(_)
        | GatewayError::Unavailable(_)
        | GatewayError::DataLoss(_)
        | GatewayError::Upstream { .. }
        | GatewayError::Vault(_)
        | GatewayError::Internal(_)
        | GatewayError::Idle(_) => (0xC001, e.to_string()),
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
        if let Some(aes) = &self.store_aes
            && !aes.iter().any(|a| *a == received.calling_ae.trim())
        {
            let reason = format!(
                "calling AE title {:?} may query and retrieve but not store (dicom.scp.allowed_calling_aes)",
                received.calling_ae
            );
            let caller = received
                .tls_identity
                .clone()
                .unwrap_or_else(|| format!("dicom-ae:{}@{}", received.calling_ae, received.peer));
            tessera_tls::security::refused("gateway", &caller, "dicom:C-STORE", &reason);
            return StoreOutcome::Refused {
                status: STATUS_NOT_AUTHORIZED,
                reason,
            };
        }
        // On DICOM TLS the certificate says who sent it.
        let stored_by = received
            .tls_identity
            .clone()
            .unwrap_or_else(|| self.stored_by.clone());
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

    async fn find(&self, request: FindRequest) -> FindOutcome {
        let peer = match self.peer_or_refuse(
            &request.calling_ae,
            request.tls_identity.as_deref(),
            request.peer,
            "dicom:C-FIND",
        ) {
            Ok(p) => p,
            Err((status, reason)) => return FindOutcome::Refused { status, reason },
        };
        match self
            .service
            .dicom_find(&peer, &request.level, &keys_of(&request.keys))
            .await
        {
            Ok(answers) => FindOutcome::Matches(
                answers
                    .into_iter()
                    .map(|a| {
                        a.into_iter()
                            .map(|(tag, value)| QueryKey { tag, value })
                            .collect()
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(calling_ae = %request.calling_ae, identity = %peer.identity, error = %e, "C-FIND refused");
                let (status, reason) = qr_refusal(&e);
                FindOutcome::Refused { status, reason }
            }
        }
    }

    async fn retrieve(&self, request: RetrieveRequest) -> RetrieveOutcome {
        let op = match &request.kind {
            RetrieveKind::Get => "dicom:C-GET",
            RetrieveKind::Move { .. } => "dicom:C-MOVE",
        };
        let peer = match self.peer_or_refuse(
            &request.calling_ae,
            request.tls_identity.as_deref(),
            request.peer,
            op,
        ) {
            Ok(p) => p,
            Err((status, reason)) => return RetrieveOutcome::Refused { status, reason },
        };
        // The AE-to-request rule applies to AE-bound peers only: over DICOM
        // TLS the AE title is not who calls.
        let pinned = request
            .tls_identity
            .is_none()
            .then(|| {
                self.requests
                    .iter()
                    .find(|(ae, _)| ae == request.calling_ae.trim())
                    .map(|(_, rq)| rq.as_str())
            })
            .flatten();
        match self
            .service
            .dicom_retrieve_with(
                &peer,
                op,
                &keys_of(&request.keys),
                pinned,
                crate::flows::dicom::get_move::GrantUse::Spend,
            )
            .await
        {
            Ok(plan) => RetrieveOutcome::Instances {
                count: plan.count,
                files: plan.files,
            },
            Err(e) => {
                tracing::warn!(calling_ae = %request.calling_ae, identity = %peer.identity, operation = op, error = %e, "retrieve refused");
                let (status, reason) = qr_refusal(&e);
                RetrieveOutcome::Refused { status, reason }
            }
        }
    }

    fn association_refused(&self, calling_ae: &str, peer: SocketAddr, reason: &str) {
        tessera_tls::security::refused(
            "gateway",
            &format!("dicom-ae:{calling_ae}@{peer}"),
            "dicom:A-ASSOCIATE",
            reason,
        );
    }
}

/// The SCP settings of a `[dicom.scp]` section (validated: bad networks
/// were refused at start).
pub fn scp_config(s: &ScpSection, max_instance_bytes: u64) -> ScpConfig {
    let mut allowed = s.allowed_calling_aes.clone();
    allowed.extend(s.peers.iter().map(|p| p.ae_title.clone()));
    ScpConfig {
        ae_title: s.ae_title.clone(),
        allowed_calling_aes: allowed,
        calling_ae_networks: s
            .peers
            .iter()
            .map(|p| {
                let nets = p.networks.iter().filter_map(|n| n.parse().ok()).collect();
                (p.ae_title.clone(), nets)
            })
            .collect(),
        move_destinations: s
            .move_destinations
            .iter()
            .map(|d| (d.ae_title.clone(), d.address.clone()))
            .collect(),
        max_instance_bytes,
        max_associations: s.max_associations as usize,
        idle_timeout: Duration::from_secs(s.idle_timeout_secs),
        artim_timeout: Duration::from_secs(s.artim_timeout_secs),
        ..ScpConfig::default()
    }
}
