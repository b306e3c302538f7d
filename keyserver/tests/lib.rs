//! Integration tests: the real keyserver in-process on 127.0.0.1:0 with a
//! generated development PKI, called over mutual TLS by one client per
//! identity. One test binary (`autotests = false` in Cargo.toml); its
//! modules are the files beside this one, the shared kit is `common/`.

mod access;
mod audit;
mod backup;
mod common;
mod gateway;
mod grants;
mod paging;
mod replicas;
mod webhook;
