//! The live suite's trust model and durability, one test binary (each
//! integration test file links the whole suite: fewer binaries, faster CI).
//!
//! * [`matrix`]: every RPC as every kind of caller against the matrix;
//! * [`trust`]: ownership, delegation, Verify, tampered retrieve, share relay;
//! * [`durability`]: erasure coding, node loss, corrupt fragments, repair;
//! * [`limits`]: one size limit end to end, refused from the header;
//! * [`ops`]: admin listeners: metrics move with traffic, live and ready;
//! * [`access`]: purposes, standing approvals and break-glass through the gateway;
//! * [`replicas`]: two gateway replicas on one vault on PostgreSQL;
//! * [`spread`]: the gateway's calls spread over every watermark replica.

mod access;
mod durability;
mod limits;
mod matrix;
mod ops;
mod replicas;
mod spread;
mod trust;
