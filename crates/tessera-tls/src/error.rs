//! Errors from loading TLS material and building configs.

use std::path::PathBuf;

/// Why TLS material could not be loaded or a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} in {path}: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("our own certificate in {path} has no usable identity: {source}")]
    OwnIdentity {
        path: PathBuf,
        source: crate::IdentityError,
    },
    #[error(
        "{path} now names {now:?}, not {was:?}: a process keeps its identity (restart to change it)"
    )]
    IdentityChanged {
        path: PathBuf,
        was: Option<String>,
        now: Option<String>,
    },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("server verifier: {0}")]
    ServerVerifier(String),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("invalid endpoint {endpoint:?}: {detail}")]
    Endpoint { endpoint: String, detail: String },
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}
