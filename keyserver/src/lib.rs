//! Tessera keyserver: derives per-study keys from a versioned master secret
//! and the patient attributes, releases them only to an owner-approved
//! requester, and appends every key event to a hash-chained, signed audit
//! log before replying. See `README.md` for the design.
#![forbid(unsafe_code)]

pub mod app;
pub mod bench;
pub mod config;
pub mod core;
pub mod error;
pub mod limits;
pub mod service;

pub use app::{App, AppError, RunningApp};
pub use bench::{BenchOptions, bench_derive};
pub use config::Config;
pub use error::{KeyServerError, Result};
