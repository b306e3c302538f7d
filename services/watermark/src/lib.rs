//! Tessera watermark service: the crypto-watermarking core
//! (`tessera-cryptomark`) behind streaming mutual-TLS gRPC. Study keys are
//! derived at the keyserver under the service's own identity; only the
//! configured callers (the gateway) may use it. See `README.md`.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod convert;
pub mod error;
pub mod keys;
mod pixels;
pub mod service;

pub use app::{App, AppError, RunningApp};
pub use config::Config;
pub use error::WatermarkError;
