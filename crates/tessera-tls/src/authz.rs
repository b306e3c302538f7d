//! Authorization: one policy table per server, roles from configuration keyed
//! by identity, checked by a tower layer in front of every RPC. It fails
//! closed: no identity, no role, or a method missing from the table is a
//! refusal. Only `grpc.health.v1.Health` needs no role (probes must work
//! before roles are known), and even it is reached only over mutual TLS.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;

use crate::{DEFAULT_TRUST_DOMAIN, Identity, PeerInfo};

/// Paths under this prefix need no role.
pub const HEALTH_SERVICE_PREFIX: &str = "/grpc.health.v1.Health/";

/// What a caller may do, granted by configuration, never by the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns studies; approves or denies key requests.
    Owner,
    Clinician,
    Researcher,
    /// Operators.
    Admin,
    /// The gateway ("CloudSec"): the only service that orchestrates.
    Gateway,
    /// The crypto-watermarking service (derives pixel keys).
    Watermark,
    /// The segmentation service (calls nothing).
    Segmentation,
    /// The keyserver (calls nothing).
    Keyserver,
    /// An untrusted storage node: it calls nothing, so no RPC of the suite
    /// lists this role; it exists so a node's identity is named, not merely
    /// unknown, in the matrix and the refusals.
    Storage,
}

impl Role {
    pub const ALL: [Role; 9] = [
        Role::Owner,
        Role::Clinician,
        Role::Researcher,
        Role::Admin,
        Role::Gateway,
        Role::Watermark,
        Role::Segmentation,
        Role::Keyserver,
        Role::Storage,
    ];

    /// The user roles (people, not services).
    pub const USERS: [Role; 4] = [Role::Owner, Role::Clinician, Role::Researcher, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Clinician => "clinician",
            Role::Researcher => "researcher",
            Role::Admin => "admin",
            Role::Gateway => "gateway",
            Role::Watermark => "watermark",
            Role::Segmentation => "segmentation",
            Role::Keyserver => "keyserver",
            Role::Storage => "storage",
        }
    }

    /// The role of a service identity's name in the development PKI
    /// (`storage-N` nodes are storage), or `None` for an unknown service.
    pub fn of_dev_service(name: &str) -> Option<Role> {
        match name {
            "gateway" => Some(Role::Gateway),
            "watermark" => Some(Role::Watermark),
            "segmentation" => Some(Role::Segmentation),
            "keyserver" => Some(Role::Keyserver),
            n if n
                .strip_prefix("storage-")
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())) =>
            {
                Some(Role::Storage)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many storage node identities (`storage-1` ..) the development role
/// map names.
pub const DEV_STORAGE_NODES: usize = 16;

/// Roles by identity URI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleMap {
    roles: HashMap<String, BTreeSet<Role>>,
}

impl RoleMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The development PKI's defaults: `owner` -> owner, `clinician` and
    /// `clinician2` -> clinician, `researcher` -> researcher, `admin` ->
    /// admin, each service -> its own role (`storage-1` .. `storage-`
    /// [`DEV_STORAGE_NODES`] -> storage), `outsider` -> nothing.
    pub fn dev_default(trust_domain: &str) -> Self {
        let mut map = Self::new();
        let user = |n: &str| format!("spiffe://{trust_domain}/user/{n}");
        map.set(&user("owner"), [Role::Owner]);
        map.set(&user("clinician"), [Role::Clinician]);
        map.set(&user("clinician2"), [Role::Clinician]);
        map.set(&user("researcher"), [Role::Researcher]);
        map.set(&user("admin"), [Role::Admin]);
        let services = ["keyserver", "watermark", "segmentation", "gateway"]
            .map(str::to_owned)
            .into_iter()
            .chain((1..=DEV_STORAGE_NODES).map(|i| format!("storage-{i}")));
        for s in services {
            if let Some(role) = Role::of_dev_service(&s) {
                map.set(&format!("spiffe://{trust_domain}/service/{s}"), [role]);
            }
        }
        map
    }

    /// Replaces the roles of `identity_uri` (an empty set removes them).
    pub fn set(&mut self, identity_uri: &str, roles: impl IntoIterator<Item = Role>) {
        let roles: BTreeSet<Role> = roles.into_iter().collect();
        if roles.is_empty() {
            self.roles.remove(identity_uri);
        } else {
            self.roles.insert(identity_uri.to_owned(), roles);
        }
    }

    pub fn roles_of(&self, identity: &Identity) -> BTreeSet<Role> {
        self.roles.get(&identity.uri()).cloned().unwrap_or_default()
    }
}

/// The `[access]` section every server config shares.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Only certificates whose URI SAN is in this trust domain are accepted.
    pub trust_domain: String,
    /// Start from [`RoleMap::dev_default`] (then apply `roles`).
    pub dev_roles: bool,
    /// Identity URI -> roles; replaces that identity's default roles (an
    /// empty list removes them).
    pub roles: BTreeMap<String, Vec<Role>>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            dev_roles: true,
            roles: BTreeMap::new(),
        }
    }
}

impl AccessConfig {
    /// Checks every identity key, so a typo fails at start, not at first call.
    pub fn validate(&self) -> Result<(), String> {
        Identity::new(&self.trust_domain, "service", "probe")
            .map_err(|_| format!("access.trust_domain {:?} is not valid", self.trust_domain))?;
        for uri in self.roles.keys() {
            let id = Identity::parse_uri(uri).map_err(|e| format!("access.roles: {e}"))?;
            if id.trust_domain() != self.trust_domain {
                return Err(format!(
                    "access.roles: {uri:?} is not in trust domain {:?}",
                    self.trust_domain
                ));
            }
        }
        Ok(())
    }

    pub fn role_map(&self) -> RoleMap {
        let mut map = if self.dev_roles {
            RoleMap::dev_default(&self.trust_domain)
        } else {
            RoleMap::new()
        };
        for (uri, roles) in &self.roles {
            map.set(uri, roles.iter().copied());
        }
        map
    }
}

/// Which roles may call which RPC. Keys are full gRPC paths,
/// `/tessera.keyserver.v1.KeyServer/Approve`, or a whole service,
/// `/tessera.storage.v1.StorageNode/*`. An exact entry wins over the service
/// entry. A path in neither is refused.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: HashMap<String, BTreeSet<Role>>,
}

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `roles` on `path` (builder style). Adding to an existing path
    /// extends its set.
    pub fn allow(mut self, path: &str, roles: impl IntoIterator<Item = Role>) -> Self {
        self.rules.entry(path.to_owned()).or_default().extend(roles);
        self
    }

    /// The roles allowed on `path`, or `None` if the table does not name it.
    pub fn allowed(&self, path: &str) -> Option<&BTreeSet<Role>> {
        if let Some(r) = self.rules.get(path) {
            return Some(r);
        }
        let (service, _method) = path.rsplit_once('/')?;
        self.rules.get(&format!("{service}/*"))
    }
}

/// The roles the authorization layer granted this call (request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerRoles(pub BTreeSet<Role>);

/// A server's access decision: its policy table and role map.
#[derive(Clone, Debug)]
pub struct Authz {
    policy: Policy,
    roles: RoleMap,
}

/// An RPC refused by the layer.
#[derive(Debug, PartialEq, Eq)]
enum Denial {
    /// No verified identity on the request.
    Unauthenticated,
    /// The policy table does not name the method.
    Unlisted,
    /// The caller holds none of the allowed roles.
    Forbidden,
}

impl Authz {
    pub fn new(policy: Policy, roles: RoleMap) -> Self {
        Self { policy, roles }
    }

    fn decide(&self, path: &str, identity: Option<&Identity>) -> Result<BTreeSet<Role>, Denial> {
        if path.starts_with(HEALTH_SERVICE_PREFIX) {
            return Ok(identity.map(|i| self.roles.roles_of(i)).unwrap_or_default());
        }
        let identity = identity.ok_or(Denial::Unauthenticated)?;
        let allowed = self.policy.allowed(path).ok_or(Denial::Unlisted)?;
        let held = self.roles.roles_of(identity);
        if held.iter().any(|r| allowed.contains(r)) {
            Ok(held)
        } else {
            Err(Denial::Forbidden)
        }
    }
}

/// A refusal of the authorization layer, handed to a [`RefusalSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The caller's identity URI, or `<none>`.
    pub caller: String,
    /// The gRPC path.
    pub rpc: String,
    pub reason: &'static str,
}

/// Where a service records the layer's refusals beyond the security log
/// (the keyserver appends them to its audit chain). The layer awaits the
/// returned future before it answers, so the record is written first.
pub trait RefusalSink: Send + Sync + 'static {
    fn record(&self, refusal: Refusal) -> BoxFuture<()>;
}

/// The tower layer; add it with `tonic::transport::Server::builder().layer(..)`.
#[derive(Clone)]
pub struct AuthzLayer {
    authz: Arc<Authz>,
    sink: Option<Arc<dyn RefusalSink>>,
}

impl fmt::Debug for AuthzLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzLayer")
            .field("authz", &self.authz)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl AuthzLayer {
    pub fn new(authz: Authz) -> Self {
        Self {
            authz: Arc::new(authz),
            sink: None,
        }
    }

    /// Also hands every refusal to `sink` (awaited before the reply).
    pub fn with_sink(mut self, sink: Arc<dyn RefusalSink>) -> Self {
        self.sink = Some(sink);
        self
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            authz: self.authz.clone(),
            sink: self.sink.clone(),
        }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    authz: Arc<Authz>,
    sink: Option<Arc<dyn RefusalSink>>,
}

impl<S: fmt::Debug> fmt::Debug for AuthzService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthzService")
            .field("inner", &self.inner)
            .field("authz", &self.authz)
            .finish()
    }
}

/// A boxed, sendable future (what a [`RefusalSink`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthzService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let identity = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.identity.clone());
        match self.authz.decide(&path, identity.as_ref()) {
            Ok(roles) => {
                if let Some(identity) = identity {
                    req.extensions_mut().insert(identity);
                }
                req.extensions_mut().insert(CallerRoles(roles));
                // The clone is the one that was polled ready: take it, leave
                // a fresh clone for the next call (tower's usual dance).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(denial) => {
                let who = identity.map_or_else(|| "<none>".to_owned(), |i| i.uri());
                let reason = match denial {
                    Denial::Unauthenticated => "no client identity",
                    Denial::Unlisted => "rpc not in the authorization matrix",
                    Denial::Forbidden => "no role of the caller is admitted",
                };
                crate::security::refused("authz", &who, &path, reason);
                let mut status = match denial {
                    Denial::Unauthenticated => tonic::Status::unauthenticated("no client identity"),
                    Denial::Unlisted | Denial::Forbidden => {
                        tonic::Status::permission_denied(format!("{who} may not call {path}"))
                    }
                };
                status.metadata_mut().insert(
                    crate::security::REFUSED_BY_HEADER,
                    tonic::metadata::MetadataValue::from_static("authz"),
                );
                match &self.sink {
                    None => Box::pin(std::future::ready(Ok(status.into_http()))),
                    Some(sink) => {
                        let record = sink.record(Refusal {
                            caller: who,
                            rpc: path,
                            reason,
                        });
                        Box::pin(async move {
                            record.await;
                            Ok(status.into_http())
                        })
                    }
                }
            }
        }
    }
}

/// The caller's identity, as put there by the authorization layer.
#[allow(clippy::result_large_err)]
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Identity, tonic::Status> {
    request
        .extensions()
        .get::<Identity>()
        .ok_or_else(|| tonic::Status::unauthenticated("no client identity"))
}

/// The caller's roles, as granted by the authorization layer.
pub fn caller_roles<T>(request: &tonic::Request<T>) -> BTreeSet<Role> {
    request
        .extensions()
        .get::<CallerRoles>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse_uri(s).unwrap()
    }

    fn authz() -> Authz {
        let policy = Policy::new()
            .allow(
                "/tessera.storage.v1.StorageNode/*",
                [Role::Gateway, Role::Admin],
            )
            .allow("/tessera.keyserver.v1.KeyServer/Approve", [Role::Owner]);
        Authz::new(policy, RoleMap::dev_default(DEFAULT_TRUST_DOMAIN))
    }

    #[test]
    fn service_wildcard_and_exact_rules() {
        let a = authz();
        let gw = id("spiffe://tessera.local/service/gateway");
        let owner = id("spiffe://tessera.local/user/owner");
        assert_eq!(
            a.decide("/tessera.storage.v1.StorageNode/Put", Some(&gw)),
            Ok(BTreeSet::from([Role::Gateway]))
        );
        assert_eq!(
            a.decide("/tessera.storage.v1.StorageNode/Put", Some(&owner)),
            Err(Denial::Forbidden)
        );
        assert!(
            a.decide("/tessera.keyserver.v1.KeyServer/Approve", Some(&owner))
                .is_ok()
        );
        assert_eq!(
            a.decide("/tessera.keyserver.v1.KeyServer/Approve", Some(&gw)),
            Err(Denial::Forbidden)
        );
    }

    #[test]
    fn fails_closed() {
        let a = authz();
        let gw = id("spiffe://tessera.local/service/gateway");
        let outsider = id("spiffe://tessera.local/user/outsider");
        // A method nobody listed.
        assert_eq!(
            a.decide("/tessera.keyserver.v1.KeyServer/Request", Some(&gw)),
            Err(Denial::Unlisted)
        );
        assert_eq!(a.decide("/x.Y/Z", Some(&gw)), Err(Denial::Unlisted));
        assert_eq!(a.decide("", Some(&gw)), Err(Denial::Unlisted));
        assert_eq!(a.decide("garbage", Some(&gw)), Err(Denial::Unlisted));
        // No identity.
        assert_eq!(
            a.decide("/tessera.storage.v1.StorageNode/Put", None),
            Err(Denial::Unauthenticated)
        );
        // Identity without roles.
        assert_eq!(
            a.decide("/tessera.storage.v1.StorageNode/Put", Some(&outsider)),
            Err(Denial::Forbidden)
        );
        // Health needs none.
        assert!(
            a.decide("/grpc.health.v1.Health/Check", Some(&outsider))
                .is_ok()
        );
        assert!(a.decide("/grpc.health.v1.Health/Check", None).is_ok());
    }

    /// The layer itself: a refused call answers with the refused-by
    /// metadata, is counted on the security log, and reaches the sink
    /// before the reply; an admitted call reaches the inner service.
    #[tokio::test]
    async fn the_layer_records_every_refusal() {
        use std::sync::Mutex;
        use tower::{Layer, Service, ServiceExt};

        #[derive(Default)]
        struct Sink(Mutex<Vec<Refusal>>);
        impl RefusalSink for Arc<Sink> {
            fn record(&self, r: Refusal) -> BoxFuture<()> {
                self.0.lock().unwrap().push(r);
                Box::pin(async {})
            }
        }
        let sink = Arc::new(Sink::default());
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut svc = AuthzLayer::new(authz())
            .with_sink(Arc::new(sink.clone()))
            .layer(inner);
        let req = |path: &str, who: Option<&str>| {
            let mut r = http::Request::builder().uri(path).body(()).unwrap();
            if let Some(w) = who {
                r.extensions_mut().insert(PeerInfo {
                    identity: id(w),
                    remote_addr: "127.0.0.1:1".parse().unwrap(),
                });
            }
            r
        };
        let before = crate::security::refusal_counts()
            .get(&(
                "authz".to_owned(),
                "no role of the caller is admitted".to_owned(),
            ))
            .copied()
            .unwrap_or(0);
        let path = "/tessera.storage.v1.StorageNode/Put";
        let refused = svc
            .ready()
            .await
            .unwrap()
            .call(req(path, Some("spiffe://tessera.local/user/owner")))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused
                .headers()
                .get(crate::security::REFUSED_BY_HEADER)
                .unwrap(),
            "authz"
        );
        let after = crate::security::refusal_counts()
            .get(&(
                "authz".to_owned(),
                "no role of the caller is admitted".to_owned(),
            ))
            .copied()
            .unwrap_or(0);
        assert!(after > before, "the refusal is counted");
        let recorded = sink.0.lock().unwrap().clone();
        assert_eq!(
            recorded,
            vec![Refusal {
                caller: "spiffe://tessera.local/user/owner".into(),
                rpc: path.into(),
                reason: "no role of the caller is admitted",
            }]
        );
        // No identity at all: UNAUTHENTICATED, recorded as well.
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(req(path, None))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        // Admitted: the inner service answers (no grpc-status header).
        let ok = svc
            .ready()
            .await
            .unwrap()
            .call(req(path, Some("spiffe://tessera.local/service/gateway")))
            .await
            .unwrap();
        assert!(ok.headers().get("grpc-status").is_none());
        assert_eq!(sink.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn access_config_overrides_defaults() {
        let mut cfg = AccessConfig::default();
        cfg.roles.insert(
            "spiffe://tessera.local/user/outsider".into(),
            vec![Role::Admin],
        );
        cfg.roles
            .insert("spiffe://tessera.local/user/owner".into(), vec![]);
        cfg.validate().unwrap();
        let map = cfg.role_map();
        assert_eq!(
            map.roles_of(&id("spiffe://tessera.local/user/outsider")),
            BTreeSet::from([Role::Admin])
        );
        assert!(
            map.roles_of(&id("spiffe://tessera.local/user/owner"))
                .is_empty()
        );
        assert_eq!(
            map.roles_of(&id("spiffe://tessera.local/user/clinician2")),
            BTreeSet::from([Role::Clinician])
        );

        let no_dev = AccessConfig {
            dev_roles: false,
            ..AccessConfig::default()
        };
        assert!(
            no_dev
                .role_map()
                .roles_of(&id("spiffe://tessera.local/service/gateway"))
                .is_empty()
        );
    }

    #[test]
    fn access_config_rejects_bad_keys() {
        for key in [
            "owner",
            "spiffe://other.domain/user/owner",
            "spiffe://tessera.local/u",
        ] {
            let mut cfg = AccessConfig::default();
            cfg.roles.insert(key.into(), vec![Role::Owner]);
            assert!(cfg.validate().is_err(), "{key}");
        }
    }
}
