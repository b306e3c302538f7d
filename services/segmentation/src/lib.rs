//! Tessera segmentation service: the GA-ES core (`tessera-segment`) behind
//! streaming mutual-TLS gRPC. It segments an image into entropy regions and
//! returns the region map and one fragment per region (its blocks plus the
//! halo of the requested operation). Only the configured callers (the
//! gateway) may use it. See `README.md`.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod convert;
pub mod error;
pub mod service;

pub use app::{App, AppError, RunningApp};
pub use config::Config;
pub use error::SegmentationError;
