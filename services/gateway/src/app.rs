//! `App::build(config)` and `App::spawn()`: the real gateway, runnable
//! in-process on `127.0.0.1:0` by tests and the launcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tessera_runtime::{
    AdminConfig, GrpcServer, Metrics, Readiness, RunningServer, ServerConfig, ServerError,
};
use tessera_tls::Channel;

use crate::config::Config;
use crate::error::GatewayError;
use crate::service::{GatewayService, Limits, policy};
use crate::upstream::Upstreams;
use crate::vault::{Vault, load_key_file};

/// Opens the configured vault: never another one when it fails.
fn open_vault(
    section: &crate::config::VaultSection,
    key: &[u8; 32],
) -> Result<Vault, GatewayError> {
    match section.backend {
        crate::config::VaultBackend::Redb => Vault::open(&section.path, key),
        crate::config::VaultBackend::Postgres => {
            let url = section.postgres_url().map_err(GatewayError::Vault)?;
            Vault::open_postgres(&url, key, section.lease_secs)
        }
    }
}

/// Renews this replica's lease on a shared vault every third of it, so
/// another replica's recovery leaves this one's stores in flight alone.
async fn heartbeat_forever(vault: Arc<Vault>) {
    let every = Duration::from_secs((vault.lease_secs() / 3).max(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = crate::shared::with_vault(&vault, |v| v.heartbeat()).await {
            tracing::warn!(error = %e, "vault heartbeat failed");
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Client TLS material or the vault key is unusable: a configuration
    /// error.
    #[error("client TLS: {0}")]
    ClientTls(#[from] tessera_tls::TlsError),
    #[error("vault key: {0}")]
    VaultKey(String),
    #[error("vault: {0}")]
    Vault(GatewayError),
    #[error("DICOM SCP: {0}")]
    Scp(std::io::Error),
    #[error("DICOMweb: {0}")]
    DicomWeb(std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl AppError {
    /// True when fixing the configuration fixes the error (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::ClientTls(_)
                | AppError::VaultKey(_)
                | AppError::Server(ServerError::KeyPermissions(_))
        )
    }
}

/// A built (not yet listening) gateway.
pub struct App {
    service: GatewayService,
    server: ServerConfig,
    scp: Option<crate::config::ScpSection>,
    /// Who instances received over C-STORE are recorded as stored by.
    scp_stored_by: String,
    /// Roles of the identities DICOM peers stand for.
    scp_roles: tessera_tls::RoleMap,
    max_image_bytes: u64,
    erasure: Option<crate::config::ErasureSection>,
    admin: Option<AdminConfig>,
    readiness: Readiness,
    dicomweb: Option<crate::config::DicomWebSection>,
}

/// The C-STORE SCP while it serves.
struct RunningScp {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A listening gateway.
pub struct RunningApp {
    server: RunningServer,
    scp: Option<RunningScp>,
    /// The DICOM TLS listener (`dicom.scp.tls_listen`).
    scp_tls: Option<RunningScp>,
    dicomweb: Option<crate::dicomweb::RunningDicomWeb>,
    /// The background repairer (with `[erasure]` and an interval).
    repairer: Option<tokio::task::JoinHandle<()>>,
    /// The lease renewal of a shared (PostgreSQL) vault.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Opens the vault and prepares lazy clients of every peer.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let up = Upstreams::new(config)?;
        let readiness = readiness(
            up.clone(),
            keyserver_health_channel(config, &up.tls)?,
            config,
        );
        let key = load_key_file(&config.vault.key_file).map_err(AppError::VaultKey)?;
        let vault = open_vault(&config.vault, &key).map_err(AppError::Vault)?;
        let g = &config.gateway;
        let service = GatewayService::new(
            up,
            Arc::new(vault),
            Limits {
                max_image_bytes: g.max_image_bytes,
                reidentify_roles: g.reidentify_roles.clone(),
                temporal: config.dicom.temporal,
                deidentify_burned_in: config.dicom.deidentify_burned_in,
                dicom_file_requests: config.dicom.file_requests,
                erasure: config.erasure,
                stream_idle: config.server.stream_idle_timeout(),
            },
            g.max_concurrent_jobs as usize,
            g.max_inflight_mib,
        );
        Ok(Self {
            service,
            server: config.server.clone(),
            scp: config.dicom.scp.clone(),
            erasure: config.erasure,
            scp_stored_by: config
                .dicom
                .scp
                .as_ref()
                .and_then(|s| s.stored_by.clone())
                .unwrap_or_else(|| {
                    format!(
                        "spiffe://{}/service/gateway",
                        config.server.access.trust_domain
                    )
                }),
            scp_roles: config.server.access.role_map(),
            max_image_bytes: g.max_image_bytes,
            admin: config.admin.clone(),
            readiness,
            dicomweb: config.dicomweb.clone(),
        })
    }

    /// The service behind the server: its `Gateway` handlers, called
    /// directly by the handler tests (`tests/handlers.rs`).
    pub fn service(&self) -> &GatewayService {
        &self.service
    }

    /// Serves a bound SCP (plain or DICOM TLS) into the gateway's sink
    /// until its stop signal.
    fn serve_scp(&self, scp: tessera_scp::Scp, section: &crate::config::ScpSection) -> RunningScp {
        let addr = scp.local_addr();
        let sink = crate::scp::GatewaySink::with_peers(
            self.service.clone(),
            section.owner.clone(),
            self.scp_stored_by.clone(),
            Some(section),
            &self.scp_roles,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(scp.serve(sink, async move {
            let _ = stopped.await;
        }));
        RunningScp { addr, stop, task }
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits), then
    /// finishes in the background whatever a crash left half-done.
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        let sweeper = self.service.clone();
        let scp = match &self.scp {
            Some(section) => {
                let scp = tessera_scp::Scp::bind(
                    section.listen,
                    crate::scp::scp_config(section, self.max_image_bytes),
                )
                .await
                .map_err(AppError::Scp)?;
                Some(self.serve_scp(scp, section))
            }
            None => None,
        };
        // DICOM TLS: the same SCP and sink on its own port, each peer the
        // identity of its client certificate.
        let scp_tls = match self.scp.as_ref().and_then(|s| Some((s, s.tls_listen?))) {
            Some((section, listen)) => {
                let tls = tessera_tls::ServerTls::from_files(
                    &self.server.tls,
                    &self.server.access.trust_domain,
                )?;
                if let Some(every) = self.server.tls_reload() {
                    // Follows certificate renewals as the gRPC listener does.
                    drop(tls.watch(every));
                }
                let scp = tessera_scp::Scp::bind_tls(
                    listen,
                    crate::scp::scp_config(section, self.max_image_bytes),
                    tls,
                )
                .await
                .map_err(AppError::Scp)?;
                Some(self.serve_scp(scp, section))
            }
            None => None,
        };
        let dicomweb = match &self.dicomweb {
            Some(w) => {
                let tls = tessera_tls::ServerTls::from_files(
                    &self.server.tls,
                    &self.server.access.trust_domain,
                )?;
                Some(
                    crate::dicomweb::spawn(
                        w.listen,
                        &tls,
                        self.server.tls_reload(),
                        self.service.clone(),
                        self.scp_roles.clone(),
                        w.max_request_bytes,
                    )
                    .await
                    .map_err(AppError::DicomWeb)?,
                )
            }
            None => None,
        };
        let server = GrpcServer::new(&self.server, policy())?
            .with_admin(self.admin.as_ref())
            .with_readiness(self.readiness);
        register_metrics(&server.metrics(), &self.service);
        if let Some(web) = &dicomweb {
            register_dicomweb_metrics(&server.metrics(), web.refusals());
        }
        let server = server
            .add_service(self.service.into_server())
            .spawn()
            .await?;
        let repairer = self
            .erasure
            .filter(|e| e.repair_interval_secs > 0)
            .map(|e| {
                tokio::spawn(sweeper.clone().repair_forever(
                    Duration::from_secs(e.repair_interval_secs),
                    e.repair_objects_per_sec,
                ))
            });
        let vault = sweeper.inner.vault.clone();
        let heartbeat = vault
            .shared()
            .then(|| tokio::spawn(heartbeat_forever(vault)));
        // Say at start when a node's per-object cap is below what
        // gateway.max_image_bytes needs (the probe logs it).
        let up = sweeper.inner.up.clone();
        tokio::spawn(async move { up.probe().await });
        tokio::spawn(async move { sweeper.sweep_unfinished().await });
        Ok(RunningApp {
            server,
            scp,
            scp_tls,
            dicomweb,
            repairer,
            heartbeat,
        })
    }
}

impl RunningApp {
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where the admin listener serves, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Where the C-STORE SCP listens, when configured.
    pub fn dicom_addr(&self) -> Option<SocketAddr> {
        self.scp.as_ref().map(|s| s.addr)
    }

    /// Where DICOM TLS listens, when `dicom.scp.tls_listen` is set.
    pub fn dicom_tls_addr(&self) -> Option<SocketAddr> {
        self.scp_tls.as_ref().map(|s| s.addr)
    }

    /// Where DICOMweb (HTTPS, mutual TLS) listens, when configured.
    pub fn dicomweb_addr(&self) -> Option<SocketAddr> {
        self.dicomweb.as_ref().map(|w| w.addr)
    }

    /// Stops accepting and drains for at most `grace` (the SCP first).
    pub async fn shutdown(self, grace: Duration) {
        if let Some(w) = self.dicomweb {
            w.stop().await;
        }
        for r in [self.repairer, self.heartbeat].into_iter().flatten() {
            r.abort();
            let _ = r.await;
        }
        for scp in [self.scp_tls, self.scp].into_iter().flatten() {
            let _ = scp.stop.send(());
            match tokio::time::timeout(grace, scp.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "DICOM SCP stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "DICOM SCP task failed"),
                Err(_) => tracing::warn!("DICOM SCP did not stop within the grace period"),
            }
        }
        self.server.shutdown(grace).await;
    }
}

/// A channel to the keyserver for its `grpc.health.v1` check alone (the
/// service's clients do not expose theirs).
fn keyserver_health_channel(
    config: &Config,
    tls: &tessera_tls::ClientTls,
) -> Result<Channel, AppError> {
    let id = config
        .upstream_identity("keyserver", &config.keyserver)
        .map_err(|detail| tessera_tls::TlsError::Endpoint {
            endpoint: config.keyserver.address.clone(),
            detail,
        })?;
    Ok(tls.expecting(&id).connect_lazy(&config.keyserver.address)?)
}

/// Ready when the keyserver answers its health check and enough storage
/// nodes answer to place a study (two shares, or k fragments with
/// `[erasure]`).
fn readiness(up: Upstreams, keyserver: Channel, config: &Config) -> Readiness {
    let needed = config.erasure.map_or(2, |e| e.data);
    Arc::new(move || {
        let (up, keyserver) = (up.clone(), keyserver.clone());
        Box::pin(async move {
            tessera_runtime::admin::upstream_serving("keyserver", keyserver, "").await?;
            let (healthy, problems) = up.probe().await;
            if healthy.len() < needed {
                return Err(format!(
                    "{} storage nodes answer, {needed} needed: {}",
                    healthy.len(),
                    problems.join("; ")
                ));
            }
            Ok(())
        })
    })
}

/// The DICOMweb listener's refusals.
fn register_dicomweb_metrics(metrics: &Metrics, refusals: Arc<crate::dicomweb::Refusals>) {
    let r = refusals.clone();
    metrics.counter_fn(
        "dicomweb_forbidden",
        "DICOMweb requests answered 401 or 403 (no role for the route, no grant, not the owner)",
        move || r.forbidden.load(Relaxed),
    );
    metrics.counter_fn(
        "dicomweb_too_large",
        "STOW-RS requests answered 413 (over dicomweb.max_request_bytes)",
        move || refusals.too_large.load(Relaxed),
    );
}

/// The gateway's own counters, read at scrape time from the RPC layer's.
fn register_metrics(metrics: &Metrics, service: &GatewayService) {
    let c = service.repair_counters();
    for (i, (name, help, _)) in c.fields().into_iter().enumerate() {
        let c = c.clone();
        metrics.counter_fn(name, help, move || c.fields()[i].2.load(Relaxed));
    }
    const GW: &str = "tessera.gateway.v1.Gateway";
    metrics.rpc_ok_counter(
        "gateway_studies_stored",
        "Images and DICOM instances stored (Store and StoreDicom answered OK)",
        &[&format!("{GW}/Store"), &format!("{GW}/StoreDicom")],
    );
    metrics.rpc_ok_counter(
        "gateway_retrievals",
        "Retrievals answered OK (Retrieve and RetrieveDicom)",
        &[&format!("{GW}/Retrieve"), &format!("{GW}/RetrieveDicom")],
    );
    let s = service.clone();
    metrics.gauge_fn(
        "gateway_job_permits_in_use",
        "Store, retrieve and process jobs running (of gateway.max_concurrent_jobs)",
        move || i64::try_from(s.capacity_in_use().0).unwrap_or(i64::MAX),
    );
    let s = service.clone();
    metrics.gauge_fn(
        "gateway_memory_budget_in_use_mib",
        "MiB of the in-flight memory budget held by running jobs (of gateway.max_inflight_mib)",
        move || i64::try_from(s.capacity_in_use().1).unwrap_or(i64::MAX),
    );
    let s = service.clone();
    metrics.gauge_fn(
        "gateway_studies",
        "Study records in the vault (-1: the vault could not be read; re-read after this \
         gateway's own changes, else at most every 30 s)",
        move || {
            s.vault()
                .count_studies_cached(crate::vault::STUDY_COUNT_TTL)
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
        },
    );
}
