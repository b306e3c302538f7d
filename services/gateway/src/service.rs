//! The gRPC edge of the gateway: the generated `Gateway` trait, each method
//! reading the caller's identity and roles and handing the request to its
//! flow (`crate::flows`: image, DICOM, process, delete/repair). Roles are
//! checked before this by the `tessera_tls::AuthzLayer` driven by
//! [`policy`]; ownership and grants are checked in the flows.

use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_server::{Gateway, GatewayServer};
use tessera_runtime::MAX_MESSAGE_BYTES;
use tessera_tls::Policy;
use tonic::{Request, Response, Status, Streaming};

use crate::shared::{BoxStream, caller_uri};
pub use crate::shared::{GatewayService, Limits};

/// gRPC service name, for the policy table and health.
pub const SERVICE: &str = "tessera.gateway.v1.Gateway";

/// Who may call what: this service's rows of the one authorization matrix
/// ([`tessera_tls::matrix::MATRIX`]). Ownership, delegation and grants are
/// checked in the handlers.
pub fn policy() -> Policy {
    Policy::for_service(SERVICE)
}

impl GatewayService {
    /// The generated server with explicit message limits.
    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn store(
        &self,
        request: Request<Streaming<pb::StoreRequest>>,
    ) -> Result<Response<pb::StoreResponse>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.store_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn request_access(
        &self,
        request: Request<pb::RequestAccessRequest>,
    ) -> Result<Response<pb::RequestAccessResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.request_access_inner(caller, request.into_inner())
                .await?,
        ))
    }

    type RetrieveStream = BoxStream<pb::RetrieveResponse>;

    async fn retrieve(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<Self::RetrieveStream>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.retrieve_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyStudyRequest>,
    ) -> Result<Response<pb::VerifyStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.verify_inner(caller, request.into_inner()).await?,
        ))
    }

    type ProcessStream = BoxStream<pb::ProcessResponse>;

    async fn process(
        &self,
        request: Request<pb::ProcessRequest>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.process_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.locate_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn repair(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        Ok(Response::new(
            self.repair_inner(request.into_inner()).await?,
        ))
    }

    type FetchShareStream = BoxStream<pb::FetchShareResponse>;

    async fn fetch_share(
        &self,
        request: Request<pb::FetchShareRequest>,
    ) -> Result<Response<Self::FetchShareStream>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.fetch_share_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteStudyRequest>,
    ) -> Result<Response<pb::DeleteStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.delete_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn store_dicom(
        &self,
        request: Request<Streaming<pb::StoreDicomRequest>>,
    ) -> Result<Response<pb::StoreDicomResponse>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.store_dicom_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn find_dicom_study(
        &self,
        request: Request<pb::FindDicomStudyRequest>,
    ) -> Result<Response<pb::FindDicomStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.find_dicom_study_inner(caller, request.into_inner())
                .await?,
        ))
    }

    type RetrieveDicomStream = BoxStream<pb::RetrieveDicomResponse>;

    async fn retrieve_dicom(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<Self::RetrieveDicomStream>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.retrieve_dicom_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }
}
