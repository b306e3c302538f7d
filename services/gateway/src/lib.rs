//! Tessera gateway ("CloudSec", paper 000 section 3.1): the trusted entry
//! point. It keeps patient identity in an encrypted identity vault, gives
//! every study a random pseudonymous handle, and orchestrates the keyserver,
//! the watermark and segmentation services and the untrusted storage nodes.
//! See `README.md`.
#![forbid(unsafe_code)]

mod access;
pub mod app;
pub mod client;
pub mod config;
pub mod convert;
pub mod dicomweb;
pub mod durability;
pub mod envelope;
pub mod error;
mod flows;
pub mod scp;
pub mod service;
pub mod shared;
pub mod sizes;
pub mod upstream;
pub mod vault;
pub mod vault_backup;

pub use app::{App, AppError, RunningApp};
pub use config::Config;
pub use error::GatewayError;
