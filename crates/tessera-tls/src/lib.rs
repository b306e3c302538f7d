//! The one crate that owns rustls in Tessera.
//!
//! * [`ServerTls`] / [`ClientTls`]: rustls configs with the `ring` provider,
//!   client certificates always required ([`rustls::server::WebPkiClientVerifier`],
//!   never unauthenticated), loaded from PEM files.
//! * [`TlsSource`]: the PEM files behind both, re-read when they change
//!   ([`TlsSource::watch`]): certificate renewal without a restart.
//! * [`Channel`]: the client channel; every call carries the W3C trace
//!   context of the current span.
//! * [`ClientTls::expecting`]: a client that accepts one server identity
//!   only (chain, host name, then the URI SAN), with [`ChannelTimeouts`].
//! * [`Identity`]: the caller, parsed from the certificate's single URI SAN
//!   `spiffe://<trust-domain>/<kind>/<name>`.
//! * [`incoming`]: a TLS accept loop for `tonic::transport::Server::serve_with_incoming`
//!   that puts the peer's [`Identity`] on every request.
//! * [`AuthzLayer`]: a tower layer that checks every RPC against one
//!   [`Policy`] table and a [`RoleMap`], failing closed; only
//!   `grpc.health.v1.Health` needs no role.
//! * [`CallerAllowList`]: the identities a service or RPC accepts, narrowing
//!   a role every service holds (failing closed, the denial logged).
//! * [`https`]: plain HTTPS outside the mesh (the keyserver's owner
//!   webhooks), the server verified against a configured CA bundle.
#![forbid(unsafe_code)]

mod allow_list;
mod authz;
mod channel;
mod client;
mod error;
pub mod https;
mod identity;
pub mod matrix;
mod peer;
mod reload;
pub mod security;
mod server;
mod tls_config;

pub use allow_list::CallerAllowList;
pub use authz::{
    AccessConfig, Authz, AuthzLayer, AuthzService, BoxFuture, CallerRoles, DEV_STORAGE_NODES,
    HEALTH_SERVICE_PREFIX, Policy, Refusal, RefusalSink, Role, RoleMap, caller, caller_roles,
};
pub use channel::{Channel, inject_trace_context};
pub use client::{
    ChannelTimeouts, ClientTls, MAX_FRAME_BYTES, MAX_RESOLVE_SECS, Resolver, check_resolve_secs,
    deadline_status, dns_resolver, timed_out,
};
pub use error::TlsError;
pub use identity::{DEFAULT_TRUST_DOMAIN, Identity, IdentityError, SERVICE_KIND, USER_KIND};
pub use peer::{ExpectedPeer, PeerError};
pub use reload::{DEFAULT_RELOAD_INTERVAL, TlsSource};
pub use server::{AcceptLimits, PeerInfo, TlsConn, incoming, incoming_with};
pub use tls_config::{ServerTls, TlsFiles};

/// The one crypto provider of the suite: rustls with `ring`.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
